import itertools

import numpy as np
import pytest
import torch

from soco_d2.config import get_cfg
from soco_d2.data.loader import build_pretrain_loader, per_process_batch_size
from soco_d2.data.samplers import ResumableInfiniteSampler, sample_seed


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_epochs_are_seeded_permutations():
    s = ResumableInfiniteSampler(10, seed=7)
    stream = take(s, 30)
    for e in range(3):
        idx = [i for i, _ in stream[10 * e: 10 * (e + 1)]]
        assert sorted(idx) == list(range(10))
        assert idx == np.random.default_rng([7, e]).permutation(10).tolist()
    assert [seed for _, seed in stream] == [sample_seed(7, p) for p in range(30)]
    assert sample_seed(7, 3) == int(np.random.SeedSequence([7, 3]).generate_state(1)[0])
    assert len({seed for _, seed in stream}) == 30
    assert take(ResumableInfiniteSampler(10, seed=7), 30) == stream
    assert [i for i, _ in take(ResumableInfiniteSampler(10, seed=8), 10)] != [i for i, _ in stream[:10]]


def test_ranks_interleave_and_resume_continues_the_stream():
    full = take(ResumableInfiniteSampler(7, seed=1), 40)
    r0 = take(ResumableInfiniteSampler(7, seed=1, rank=0, world_size=2), 20)
    r1 = take(ResumableInfiniteSampler(7, seed=1, rank=1, world_size=2), 20)
    assert r0 == full[0::2] and r1 == full[1::2]
    resumed = take(ResumableInfiniteSampler(7, seed=1, rank=1, world_size=2, start_position=12), 14)
    assert resumed == full[13::2]


def test_no_shuffle_and_bad_arguments():
    assert [i for i, _ in take(ResumableInfiniteSampler(3, seed=0, shuffle=False), 7)] == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError, match="empty"):
        ResumableInfiniteSampler(0, seed=0)
    with pytest.raises(ValueError, match="rank"):
        ResumableInfiniteSampler(5, seed=0, rank=2, world_size=2)


class SeedEcho(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, key):
        index, seed = key
        return {"index": index, "seed": seed}


def _cfg(workers=0):
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.SOLVER.GRAD_ACCUM_STEPS = 2
    cfg.DATALOADER.NUM_WORKERS = workers
    cfg.SEED = 5
    return cfg


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_and_resume(workers):
    cfg = _cfg(workers)
    assert per_process_batch_size(cfg, 1) == 2
    fresh = build_pretrain_loader(cfg, SeedEcho(), start_iter=0)
    batches = [next(fresh) for _ in range(6)]
    expected = take(ResumableInfiniteSampler(6, seed=5), 12)
    got = [(int(i), int(s)) for b in batches for i, s in zip(b["index"], b["seed"])]
    assert got == expected
    # one step = 2 micro-batches of 2: resuming at iteration 2 starts at the 5th micro-batch
    resumed = build_pretrain_loader(cfg, SeedEcho(), start_iter=2)
    for want in batches[4:6]:
        b = next(resumed)
        assert torch.equal(b["index"], want["index"]) and torch.equal(b["seed"], want["seed"])


def test_batch_must_divide():
    cfg = _cfg()
    cfg.SOLVER.IMS_PER_BATCH = 6
    with pytest.raises(ValueError, match="divisible"):
        per_process_batch_size(cfg, 4)
