"""The host syncs and collectives of a training step stay counted (benchmarks/bench_step_syncs.py,
tiny models): no host sync beyond the gradient scaler's (SoCo per_view: plus its one read of the
level counts), one collective per BN layer call in forward and one in its backward, DetCo's
shuffle-BN exchanging uint8 pixels in a fixed number of collectives."""
import importlib
import os
import sys

import pytest
from torch.nn.modules.batchnorm import _BatchNorm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCALER = {"scalar _local_scalar_dense @ soco_d2/engine/trainer.py": 1}


@pytest.fixture(scope="module")
def bench():
    # Imported by name, not from its path: the spawned processes find its worker by name (they
    # start with this process's sys.path).
    if os.path.join(ROOT, "benchmarks") not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    return importlib.import_module("bench_step_syncs")


def _sites(counts):
    """Host syncs per call site, line numbers left out."""
    out = {}
    for site, n in counts["host_sync_sites"].items():
        key = site.rsplit(":", 1)[0]
        out[key] = out.get(key, 0) + n
    return out


def _bn_layers(cfg, *parts):
    from soco_d2.modeling import build_model

    model = build_model(cfg)
    return sum(1 for p in parts for m in getattr(model, p).modules() if isinstance(m, _BatchNorm))


@pytest.mark.slow
def test_one_and_two_processes(bench):
    one = bench.run(1, ("soco_faithful", "soco_per_view", "detco"), steps=1)
    two = bench.run(2, ("soco_faithful", "detco"), steps=1)

    for counts in (one["soco_faithful"][0], one["detco"][0], two["soco_faithful"][0], two["detco"][0]):
        assert _sites(counts) == SCALER
    per_view = _sites(one["soco_per_view"][0])
    assert per_view == {**SCALER, "to_host tolist @ soco_d2/modeling/meta_arch/soco.py": 1}
    assert all(c["collectives"] == 0 for c in (one["soco_faithful"][0], one["detco"][0]))

    # SoCo faithful, 2 processes: one all-reduce per BN layer call (each backbone once per view
    # and network, each head layer once for all its groups) in forward, one per online call in
    # backward, and DDP's buckets.
    cfg = bench.tiny_cfg("soco_faithful", 2, "unused")
    views = 3
    backbone = _bn_layers(cfg, "backbone")
    heads = _bn_layers(cfg, "box_head", "projector", "predictor")
    target_heads = _bn_layers(cfg, "target_box_head", "target_projector")
    online_calls = views * backbone + heads
    kinds = two["soco_faithful"][0]["collectives_by_kind"]
    assert kinds["all_reduce"]["calls"] == 2 * online_calls + views * backbone + target_heads
    assert set(kinds) == {"all_reduce", "ddp_bucket_all_reduce"}

    # DetCo, 2 processes (shuffle-BN, per-process BN): the key batch's uint8 pixels and patch
    # orders gathered (one collective per dtype), rank 0's permutation broadcast, the keys
    # gathered back, the keys of the eight queues gathered at once; then DDP's buckets.
    kinds = two["detco"][0]["collectives_by_kind"]
    assert {k: v["calls"] for k, v in kinds.items() if k != "ddp_bucket_all_reduce"} == {
        "all_gather": 4, "broadcast": 1}
    n, world, levels, dim = 2, 2, 4, 16  # images per process, processes, levels, FEATURE_DIM
    pixels = world * n * (3 * 32 * 32 + 9 * 3 * 16 * 16)  # uint8: one byte each
    orders = world * n * 9 * 8  # int64 patch orders
    keys = world * n * 2 * levels * dim * 4  # fp32 global and local keys per level
    assert kinds["all_gather"]["bytes"] == pixels + orders + 2 * keys
    assert kinds["broadcast"]["bytes"] == world * n * 8
