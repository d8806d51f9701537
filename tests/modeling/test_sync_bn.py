import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fvcore.nn.precise_bn import get_bn_modules
from torch import nn

from soco_d2.modeling.sync_bn import (
    AllReduceBatchNorm, batch_norm_per_group, convert_sync_batchnorm, sync_batchnorm_to_gloo,
)


def test_sync_batchnorm_to_gloo_replaces_torchs_syncbn_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), nn.Sequential(nn.BatchNorm2d(4)))
    running = model[1].running_mean
    out = sync_batchnorm_to_gloo(model)
    assert isinstance(out[1], AllReduceBatchNorm) and type(out[2][0]) is nn.BatchNorm2d
    assert out[1].running_mean is running  # buffers shared, names kept
    assert set(out.state_dict()) == set(model.state_dict())
    # one process: plain batch norm
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(out[1](x), nn.functional.batch_norm(x, None, None, training=True))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_conversion_is_the_all_reduce_bn_on_every_device(device):
    """torch's SyncBatchNorm syncs the host on every call: a CUDA model gets the all-reduce BN
    too. fvcore's precise BN looks BN layers up by type; the converted layers are among them."""
    model = convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm1d(4)),
                                   torch.device(device))
    assert [type(m) for m in get_bn_modules(model)] == [AllReduceBatchNorm, AllReduceBatchNorm]
    y = model[2](torch.randn(6, 4))  # still accepts 2D input (a converted BatchNorm1d)
    assert y.shape == (6, 4)


def _bn(kind, momentum):
    torch.manual_seed(0)
    bn = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "sync": AllReduceBatchNorm}[kind](5, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.num_batches_tracked += 3
    return bn


@pytest.mark.parametrize("kind", ["1d", "2d", "sync"])
@pytest.mark.parametrize("sizes", [[4, 4, 4], [3, 4, 5]])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_per_group_norm_equals_one_call_per_group(kind, sizes, momentum, channels_last):
    """Outputs, gradients and running statistics of one call with per-group statistics equal
    those of one call per group, in order."""
    if channels_last and kind == "1d":
        pytest.skip("channels_last is 4-D only")
    bn = _bn(kind, momentum)
    ref = copy.deepcopy(bn)
    x = torch.randn((12, 5) if kind == "1d" else (12, 5, 3, 3)) * 3 + 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = batch_norm_per_group(bn, x1, sizes)
    y2 = torch.cat([ref(part) for part in x2.split(sizes)])
    (y1 * dy).sum().backward()
    (y2 * dy).sum().backward()
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad)
    torch.testing.assert_close(bn.bias.grad, ref.bias.grad)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(bn.state_dict()[name], value, msg=name)
    assert y1.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.relu_(y1)  # the output is no view: in-place ReLU after it is allowed
    bn.eval()
    torch.testing.assert_close(batch_norm_per_group(bn, x, sizes), ref.eval()(x))


def test_per_group_norm_checks_the_sizes():
    with pytest.raises(ValueError, match=r"group sizes \[2, 2\] do not add up to the 5 rows"):
        batch_norm_per_group(nn.BatchNorm1d(3), torch.randn(5, 3), [2, 2])


# Two processes: process r holds rows LAYOUTS[layout][r][g] of group g of 5 rows (uneven shares; in the
# "uneven" layout the groups of one process differ in size too, in "empty" some have no row).
LAYOUTS = {
    "even": [[slice(0, 2)] * 3, [slice(2, 5)] * 3],
    "uneven": [[slice(0, 2), slice(0, 1), slice(0, 3)], [slice(2, 5), slice(1, 5), slice(3, 5)]],
    "empty": [[slice(0, 0), slice(0, 2), slice(0, 5)], [slice(0, 5), slice(2, 5), slice(5, 5)]],
}
SIZES = [5, 5, 5]


def _data(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(SIZES), SIZES[0], *shape, generator=g) * 3 + 2  # (groups, rows, C, ...)
    dy = torch.randn(x.shape, generator=g)
    return x, dy


CASES = [("2d", False, "even"), ("1d", True, "even"), ("2d", True, "even"), ("2d", True, "uneven"),
         ("2d", True, "empty")]  # "empty": a group without rows on one process


def _mine(t, rows, groups):
    return torch.cat([t[g, rows[g]] for g in range(groups)])


def _run_case(rank, kind, grouped, layout):
    calls = []
    all_reduce = dist.all_reduce
    dist.all_reduce = lambda t, *a, **k: (calls.append(t.numel()), all_reduce(t, *a, **k))[1]
    try:
        bn = convert_sync_batchnorm(_bn(kind, 0.1))
        x, dy = _data((5,) if kind == "1d" else (5, 3, 3))
        rows, groups = LAYOUTS[layout][rank], len(SIZES) if grouped else 1
        mine = _mine(x, rows, groups).requires_grad_()
        sizes = [rows[g].stop - rows[g].start for g in range(groups)]
        y = batch_norm_per_group(bn, mine, sizes) if grouped else bn(mine)
        (y * _mine(dy, rows, groups)).sum().backward()
    finally:
        dist.all_reduce = all_reduce
    bn.eval()
    return {"y": y.detach(), "dx": mine.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
            "state": bn.state_dict(), "eval": bn(x.flatten(0, 1)), "calls": calls}


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.save([_run_case(rank, *case) for case in CASES], os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_batch_norm_of_the_whole_batch(tmp_path):
    """torch's SyncBatchNorm computes batch norm over the rows of all processes; the all-reduce BN
    gives the same outputs, input gradients, summed weight and bias gradients, running
    statistics (unbiased variance with the global count) and evaluation, with one all-reduce
    per call in forward and one in backward (all groups at once)."""
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    got = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    for case, (kind, grouped, layout) in enumerate(CASES):
        ref = _bn(kind, 0.1)
        x, dy = _data((5,) if kind == "1d" else (5, 3, 3))
        groups = len(SIZES) if grouped else 1
        xr = x.clone().requires_grad_()
        ys = torch.stack([ref(xr[g]) for g in range(groups)])
        (ys * dy[:groups]).sum().backward()
        for r in range(2):
            part, msg = got[r][case], f"{kind} grouped={grouped} {layout} rank {r}"
            rows = LAYOUTS[layout][r]
            torch.testing.assert_close(part["y"], _mine(ys, rows, groups).detach(), msg=msg)
            dx = _mine(xr.grad, rows, groups)
            torch.testing.assert_close(part["dx"], dx, rtol=1e-4, atol=1e-5, msg=msg)
            for name, value in ref.state_dict().items():
                torch.testing.assert_close(part["state"][name], value, msg=f"{msg} {name}")
            torch.testing.assert_close(part["eval"], ref.eval()(x.flatten(0, 1)), msg=msg)
            ref.train()
            assert len(part["calls"]) == 2, (msg, part["calls"])
        torch.testing.assert_close(got[0][case]["dw"] + got[1][case]["dw"], ref.weight.grad)
        torch.testing.assert_close(got[0][case]["db"] + got[1][case]["db"], ref.bias.grad)
