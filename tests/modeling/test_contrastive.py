import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from soco_d2.modeling.contrastive import FeatureQueue, check_queue_size, info_nce


def test_info_nce_matches_hand_computed_value():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0]], requires_grad=True)
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    loss = info_nce(q, k, queue, temperature=0.5)
    # Query 1: logits 1.2 (positive), 0, -2. Query 2: logits 2 (positive), 2, 0.
    l1 = -math.log(math.exp(1.2) / (math.exp(1.2) + 1 + math.exp(-2)))
    l2 = -math.log(math.exp(2) / (2 * math.exp(2) + 1))
    assert loss.item() == pytest.approx((l1 + l2) / 2, rel=1e-6)
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None  # keys are targets: no gradient through them


def test_queue_starts_normalised_and_is_in_state_dict():
    qu = FeatureQueue(dim=4, size=6)
    assert set(qu.state_dict()) == {"queue", "ptr"}
    torch.testing.assert_close(qu.queue.norm(dim=1), torch.ones(6))
    assert int(qu.ptr) == 0


def test_enqueue_advances_pointer_and_wraps_around():
    qu = FeatureQueue(dim=2, size=5)
    a = torch.arange(6.0).view(3, 2)
    qu.enqueue(a)
    torch.testing.assert_close(qu.queue[:3], a)
    assert int(qu.ptr) == 3
    b = -torch.arange(1.0, 7.0).view(3, 2)
    qu.enqueue(b)
    torch.testing.assert_close(qu.queue[[3, 4, 0]], b)
    torch.testing.assert_close(qu.queue[1:3], a[1:])
    assert int(qu.ptr) == 1
    with pytest.raises(ValueError, match="QUEUE_SIZE"):
        qu.enqueue(torch.zeros(6, 2))


class _ScalarReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts tensor reads on the host (``int(t)``, ``.item()``: a device sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ == "_local_scalar_dense"
        return func(*args, **(kwargs or {}))


def test_enqueue_keeps_its_pointer_on_the_host_and_a_loaded_one_continues():
    qu = FeatureQueue(dim=2, size=4)
    with _ScalarReads() as reads:
        for _ in range(3):
            qu.enqueue(torch.ones(2, 2))
    assert reads.count == 0 and int(qu.ptr) == 2
    resumed = FeatureQueue(dim=2, size=4)
    resumed.load_state_dict({"queue": torch.zeros(4, 2), "ptr": torch.tensor(3)})
    resumed.enqueue(torch.full((2, 2), 5.0))  # at 3, then wraps to 0
    assert resumed.queue[:, 0].tolist() == [5.0, 0.0, 0.0, 5.0] and int(resumed.ptr) == 1
    assert set(resumed.state_dict()) == {"queue", "ptr"}


def test_negatives_is_a_copy():
    qu = FeatureQueue(dim=2, size=2)
    neg = qu.negatives()
    qu.enqueue(torch.ones(2, 2))
    assert not torch.equal(neg, qu.queue)


def test_queue_size_must_be_a_multiple_of_the_keys_per_step():
    assert check_queue_size(65536, 256) == 256
    assert check_queue_size(64, 256, grad_accum_steps=4) == 64
    with pytest.raises(ValueError, match=r"QUEUE_SIZE \(100\).*IMS_PER_BATCH.*multiple of 32"):
        check_queue_size(100, 32)
    with pytest.raises(ValueError, match="QUEUE_SIZE"):
        check_queue_size(16, 32)


def test_resume_restores_queue_and_pointer_exactly():
    qu = FeatureQueue(dim=3, size=4)
    qu.enqueue(torch.randn(3, 3))
    fresh = FeatureQueue(dim=3, size=4)
    fresh.load_state_dict(qu.state_dict())
    assert torch.equal(fresh.queue, qu.queue) and int(fresh.ptr) == 3


def test_loading_a_queue_of_another_size_names_the_config_key():
    saved = FeatureQueue(dim=3, size=8).state_dict()
    with pytest.raises(ValueError, match=r"MODEL.DETCO.QUEUE_SIZE = 8"):
        FeatureQueue(dim=3, size=4).load_state_dict(saved)


def test_info_nce_with_more_queries_than_dimensions():
    # N = 3 queries of dimension 2, one negative: each loss is -log(e^(pos/T) / (e^(pos/T) + e^(neg/T))).
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    queue = torch.tensor([[0.0, -1.0]])
    per_query = [
        -math.log(math.exp(1) / (math.exp(1) + 1)),
        -math.log(math.exp(1) / (math.exp(1) + math.exp(-1))),
        -math.log(1 / 2),
    ]
    assert info_nce(q, k, queue, temperature=1.0).item() == pytest.approx(sum(per_query) / 3, rel=1e-6)


def test_keys_per_step_boundaries():
    assert check_queue_size(4, 1) == 1  # one key per step
    assert check_queue_size(8, 8, grad_accum_steps=3) == 2  # 8 // 3 keys per accumulation step
    assert isinstance(check_queue_size(8, 8, grad_accum_steps=3), int)
    assert check_queue_size(8, 8, grad_accum_steps=0) == 8  # no accumulation
    # Fewer images per step than accumulation steps: no key at all per step.
    with pytest.raises(ValueError, match=r"1 / 2 = 0\."):
        check_queue_size(8, 1, grad_accum_steps=2)


def test_queue_size_error_suggests_a_multiple():
    message = (
        "MODEL.DETCO.QUEUE_SIZE (100) must be a positive multiple of the keys enqueued per step, "
        "SOLVER.IMS_PER_BATCH / SOLVER.GRAD_ACCUM_STEPS = 64 / 1 = 64. Set MODEL.DETCO.QUEUE_SIZE "
        "to a multiple of 64 (e.g. 64) or change SOLVER.IMS_PER_BATCH."
    )
    with pytest.raises(ValueError) as err:
        check_queue_size(100, 64)
    assert str(err.value) == message
    with pytest.raises(ValueError, match=r"\(e.g. 192\)"):
        check_queue_size(200, 64)


def test_queue_sizes_and_repr():
    qu = FeatureQueue(dim=1, size=1)  # smallest valid queue
    assert qu.queue.shape == (1, 1) and qu.size == 1
    assert repr(FeatureQueue(dim=3, size=8)) == "FeatureQueue(size=8, dim=3)"
    assert FeatureQueue(dim=3, size=8).state_dict()["ptr"].dtype == torch.long
    for size, dim in ((0, 3), (8, 0)):
        with pytest.raises(ValueError, match=f"^FeatureQueue needs size >= 1 and dim >= 1, got {size} x {dim}$"):
            FeatureQueue(dim=dim, size=size)


def test_loading_error_message_in_full():
    saved = FeatureQueue(dim=3, size=8).state_dict()
    with pytest.raises(ValueError) as err:
        FeatureQueue(dim=2, size=4).load_state_dict(saved)
    assert str(err.value) == (
        "Checkpoint queue queue has shape (8, 3) (size x dim) but the model's is (4, 2): set "
        "MODEL.DETCO.QUEUE_SIZE = 8 and MODEL.DETCO.FEATURE_DIM = 3 to resume it, or start a new run."
    )


def _gather_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        qu = FeatureQueue(dim=2, size=8)
        torch.manual_seed(0)
        qu.enqueue(torch.full((2, 2), float(rank + 1)))  # rank 0 -> 1s, rank 1 -> 2s
        qu.enqueue(torch.full((2, 2), float(10 * (rank + 1))))
        torch.save({"queue": qu.queue, "ptr": qu.ptr}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_keys_from_two_processes_land_in_rank_order(tmp_path):
    mp.start_processes(_gather_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    expected = torch.tensor([1.0] * 2 + [2.0] * 2 + [10.0] * 2 + [20.0] * 2)[:, None].expand(8, 2)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(got["queue"], expected)
        assert int(got["ptr"]) == 0
