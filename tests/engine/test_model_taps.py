import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from monitor_toy import tiny_method  # noqa: E402

from soco_d2.engine.model_taps import embedding_module, probe_feature_fn  # noqa: E402


def _probe_features(arch, size):
    """(cfg, model, two random images of ``size`` px, their probe features)."""
    cfg, model = tiny_method(arch)
    fn = probe_feature_fn(model, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD)
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        return cfg, model, images, fn(images)


def test_soco_probe_features_are_res5_and_the_whole_image_box():
    cfg, model, images, out = _probe_features("SoCo", 64)
    with torch.no_grad():
        x = (images.float() - torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(
            cfg.MODEL.PIXEL_STD).view(1, 3, 1, 1)
        res5 = model.backbone.body(x)["3"].mean(dim=(2, 3))
        # the whole-image box (64 px) goes to P2 at canonical size 96 ... computed independently:
        p = model.backbone(x)
        level = int(model.pooler.assign_levels(torch.tensor([[0.0, 0.0, 64.0, 64.0]])))
        from torchvision.ops import roi_align

        feat = list(p.values())[level]
        pooled = roi_align(feat, [torch.tensor([[0.0, 0.0, 64.0, 64.0]])] * 2, 7,
                           spatial_scale=feat.shape[-1] / 64, sampling_ratio=-1, aligned=True)
        box = model.box_head(pooled)
    assert sorted(out) == ["box", "res5"]
    torch.testing.assert_close(out["res5"], res5)
    assert out["box"].shape == (2, 24)
    torch.testing.assert_close(out["box"], box)


def test_detco_probe_features_and_health_hook():
    _, model, _, out = _probe_features("DetCo", 32)
    assert list(out) == ["res5"] and out["res5"].shape == (2, 512)
    # the health hook sits on the last layer of the deepest global head
    assert embedding_module(model) is model.encoder_q.global_heads["res5"][-1]
    _, soco = tiny_method("SoCo")
    assert embedding_module(soco) is soco.embedding_tap
