"""The pretraining forwards on a fake ``cuda:0`` (torch's FakeTensorMode, no GPU needed): every
tensor they make or meet is on the device, and they make no host sync (tests/fake_cuda.py says
what counts as one and how it is found).

Each model is built from its shipped config (made tiny: R18, small views and heads) under the
fake device, moved and converted to channels_last as the trainer does, and fed a batch of the
real view mapper's samples moved to the device as the trainer moves it, under fp16 autocast
(the SoCo recipe's AMP). Only forwards run: the autograd engine needs a real device, so the
backward pass is not covered here (benchmarks/bench_gpu.py checks whole steps on a GPU with
``torch.cuda.set_sync_debug_mode("error")``).
"""
import os
import sys

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError
from torch.utils.data._utils.collate import default_collate

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
import fake_cuda  # noqa: E402

from soco_d2.config import load_config  # noqa: E402
from soco_d2.data import build_mapper  # noqa: E402
from soco_d2.modeling import build_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY_SOCO = ["MODEL.RESNETS.DEPTH", 18, "MODEL.FPN.OUT_CHANNELS", 16, "MODEL.ROI_BOX_HEAD.NUM_CONV", 1,
             "MODEL.ROI_BOX_HEAD.CONV_DIM", 8, "MODEL.ROI_BOX_HEAD.FC_DIM", 24,
             "MODEL.SOCO.PROJECTOR_HIDDEN_DIM", 16, "MODEL.SOCO.PROJECTOR_OUT_DIM", 8,
             "MODEL.SOCO.PREDICTOR_HIDDEN_DIM", 16, "INPUT.SOCO.VIEW1_SIZE", 64,
             "INPUT.SOCO.VIEW2_SIZE", 64, "INPUT.SOCO.VIEW3_SIZE", 32, "SOLVER.IMS_PER_BATCH", 2]
TINY_SOCO_STAR = TINY_SOCO + ["INPUT.SOCO.VIEW3_SIZE", 48, "INPUT.SOCO.VIEW4_SIZE", 32]
TINY_DETCO = ["MODEL.RESNETS.DEPTH", 18, "MODEL.DETCO.QUEUE_SIZE", 16, "MODEL.DETCO.FEATURE_DIM", 8,
              "MODEL.DETCO.HEAD_HIDDEN_DIM", 16, "MODEL.DETCO.SHUFFLE_BN_SPLITS", 2,
              "SOLVER.IMS_PER_BATCH", 4, "INPUT.DETCO.GLOBAL_SIZE", 32,
              "INPUT.DETCO.LOCAL_CROP_SIZE", 48, "INPUT.DETCO.PATCH_SIZE", 16]

# The one host sync left in a pretraining forward, in the non-default head modes (the recipe's
# "faithful" mode has none): the per-level box counts that split the boxes for roi_align.
LEVEL_COUNTS = ("SoCo._assigned_level_outputs' .tolist() of the per-level box counts (per_view / "
                "all head modes: the boxes are split by level for roi_align)")


def _known_syncs(reason):
    return pytest.mark.xfail(strict=True, raises=fake_cuda.HostSyncsFound, reason=reason)


def tiny_cfg(config, overrides, **extra):
    opts = ["MODEL.DEVICE", "cuda"] + overrides + [x for kv in extra.items() for x in kv]
    return load_config(os.path.join(ROOT, "configs", config), opts)


def mapper_batch(cfg, seed=0):
    """``SOLVER.IMS_PER_BATCH`` samples of the config's view mapper, collated as the loader does."""
    mapper = build_mapper(cfg)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(cfg.SOLVER.IMS_PER_BATCH):
        image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
        xy = rng.uniform(0, 80, (30, 2))
        proposals = np.concatenate([xy, xy + rng.uniform(12, 48, (30, 2))], axis=1)
        samples.append(mapper(image, proposals.astype(np.float32), rng))
    return default_collate(samples)


def build_on_fake_device(cfg):
    """The model as the trainer places it: on the device, channels_last, in training mode."""
    with torch.device(fake_cuda.DEVICE):
        model = build_model(cfg).to(fake_cuda.DEVICE)
    if cfg.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def forward_on_fake_cuda(cfg, before_forward=None):
    """The losses of one forward on the fake device; raises ``HostSyncsFound`` on a host sync."""
    batch = mapper_batch(cfg)
    with fake_cuda.fake_cuda() as mode:
        model = build_on_fake_device(cfg)
        if before_forward is not None:
            before_forward(model)
        batch = fake_cuda.to_fake_device(mode, batch)
        with fake_cuda.fake_autocast():
            return fake_cuda.run_without_host_syncs(model, batch)


@pytest.mark.parametrize("config, overrides, head_mode", [
    ("soco/soco_fpn_r50_100ep.yaml", TINY_SOCO, "faithful"),
    pytest.param("soco/soco_fpn_r50_100ep.yaml", TINY_SOCO, "per_view", marks=_known_syncs(LEVEL_COUNTS)),
    pytest.param("soco/soco_fpn_r50_100ep.yaml", TINY_SOCO, "all", marks=_known_syncs(LEVEL_COUNTS)),
    ("soco/soco_star_fpn_r50_400ep.yaml", TINY_SOCO_STAR, "faithful"),
])
def test_soco_forward_on_fake_cuda(config, overrides, head_mode):
    cfg = tiny_cfg(config, overrides, **{"MODEL.SOCO.HEAD_MODE": head_mode})
    losses = forward_on_fake_cuda(cfg)
    pairs = ["v2", "v3", "v4"] if cfg.INPUT.SOCO.VIEW4_SIZE else ["v2", "v3"]
    assert sorted(losses) == [f"loss_v1_{v}" for v in pairs]
    assert all(v.device == fake_cuda.DEVICE and v.shape == () for v in losses.values())


def test_detco_forward_on_fake_cuda():
    cfg = tiny_cfg("detco/detco_r50_200ep.yaml", TINY_DETCO)
    losses = forward_on_fake_cuda(cfg)
    assert {"loss_global_global", "loss_local_local", "loss_local_global"} <= set(losses)
    assert all(v.device == fake_cuda.DEVICE for v in losses.values())


def test_a_host_tensor_in_the_forward_is_a_device_mismatch():
    """The check can fail: SoCo's pixel mean left on the host takes the images there, and the
    first convolution meets them with its weights on the device."""
    cfg = tiny_cfg("soco/soco_fpn_r50_100ep.yaml", TINY_SOCO)

    def mean_on_host(model):
        model.pixel_mean = torch.zeros(1, 3, 1, 1, device="cpu")

    with pytest.raises(FakeTensorDeviceMismatchError):
        forward_on_fake_cuda(cfg, before_forward=mean_on_host)
