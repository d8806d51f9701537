import math
import re

import pytest
import torch

from soco_d2.config import get_cfg
from soco_d2.modeling.pooler import ScaleAwareRoIPooler, build_soco_pooler

SIDES = [47.9, 48.0, 95.0, 96.0, 191.0, 192.0, 300.0]
# torchvision's rule with canonical size 96 at level 4: s < 48 -> P2, < 96 -> P3, < 192 -> P4.
EXPECTED_LEVEL = [2, 3, 3, 4, 4, 5, 5]


def _square_boxes(sides, x0=1.0):
    return torch.tensor([[x0, x0, x0 + s, x0 + s] for s in sides])


def test_level_assignment_hand_computed():
    pooler = ScaleAwareRoIPooler(level_assignment="torchvision")
    levels = pooler.assign_levels(_square_boxes(SIDES)) + 2
    assert levels.tolist() == EXPECTED_LEVEL
    # Non-square boxes use sqrt(w h): 24 x 96 -> s = 48 -> P3; 24 x 95 -> s < 48 -> P2.
    boxes = torch.tensor([[0.0, 0.0, 24.0, 96.0], [0.0, 0.0, 24.0, 95.0]])
    assert (pooler.assign_levels(boxes) + 2).tolist() == [3, 2]


def test_official_level_assignment_hand_computed():
    """The official rule: corners truncated to integers, s = sqrt((x2 - x1 + 1)(y2 - y1 + 1)),
    s <= 48 -> P2, <= 96 -> P3, <= 192 -> P4, else P5 (the default)."""
    pooler = build_soco_pooler(get_cfg())
    assert pooler.level_assignment == "official"
    boxes = torch.tensor([
        [0.0, 0.0, 47.0, 47.0],     # s = 48 -> P2 (torchvision: 47 -> P2)
        [0.0, 0.0, 47.9, 47.9],     # truncated to 47: s = 48 -> P2 (torchvision: 47.9 -> P2)
        [0.0, 0.0, 48.0, 48.0],     # s = 49 -> P3 (torchvision: 48 -> P3)
        [0.5, 0.5, 48.4, 48.4],     # truncated 0..48: s = 49 -> P3 (torchvision: 47.9 -> P2)
        [0.0, 0.0, 95.0, 95.0],     # s = 96 -> P3 (torchvision: 95 -> P3)
        [0.0, 0.0, 96.0, 96.0],     # s = 97 -> P4 (torchvision: 96 -> P4)
        [0.0, 0.0, 191.0, 191.0],   # s = 192 -> P4
        [0.0, 0.0, 192.0, 192.0],   # s = 193 -> P5
        [0.0, 0.0, 224.0, 224.0],   # s = 225 -> P5 (the official code assigns no level)
        [0.0, 0.0, 23.0, 95.0],     # s = sqrt(24 * 96) = 48 -> P2 (torchvision: s < 48 -> P2)
        [0.0, 0.0, 24.0, 95.0],     # s = sqrt(25 * 96) = 48.99 -> P3 (torchvision: sqrt(24 * 95) = 47.7 -> P2)
    ])
    assert (pooler.assign_levels(boxes) + 2).tolist() == [2, 2, 3, 3, 3, 4, 4, 5, 5, 2, 3]
    # (N, K, 4) input is flattened image-major.
    assert pooler.assign_levels(boxes[:8].view(2, 4, 4)).tolist() == [0, 0, 1, 1, 1, 2, 2, 3]
    torchvision = ScaleAwareRoIPooler(level_assignment="torchvision")
    assert (torchvision.assign_levels(boxes) + 2).tolist() == [2, 2, 3, 2, 3, 4, 4, 5, 5, 2, 2]


def test_official_level_of_a_flipped_box_reads_its_corners_before_the_flip():
    """(10, 0, 58.5, 46) in a 64 px view, flipped: (5.5, 0, 54, 46). Before the flip its integer
    corners give sqrt(49 * 47) = 47.99 -> P2; the flipped corners truncated would give
    sqrt(50 * 47) -> P3. Flagged as flipped, its x corners are rounded up: P2."""
    pooler = ScaleAwareRoIPooler()
    unflipped = torch.tensor([[[10.0, 0.0, 58.5, 46.0]], [[10.0, 0.0, 58.5, 46.0]]])
    flipped = torch.tensor([[[5.5, 0.0, 54.0, 46.0]], [[5.5, 0.0, 54.0, 46.0]]])
    assert pooler.assign_levels(unflipped).tolist() == [0, 0]
    assert pooler.assign_levels(flipped).tolist() == [1, 1]
    assert pooler.assign_levels(flipped, torch.tensor([True, False])).tolist() == [0, 1]
    order, counts = pooler.level_plan(flipped, torch.tensor([True, True]))
    assert counts.tolist() == [2, 0, 0, 0]


def test_unknown_level_assignment_lists_the_valid_ones():
    cfg = get_cfg()
    cfg.MODEL.SOCO.LEVEL_ASSIGNMENT = "detectron2"
    with pytest.raises(ValueError, match=r"LEVEL_ASSIGNMENT = 'detectron2'.*official.*torchvision"):
        build_soco_pooler(cfg)


def _ramp_features(n, view):
    """P2..P5 maps whose value encodes image, level, row and column: 10000 n + 1000 l + 100 y + x."""
    feats = []
    for lvl in range(2, 6):
        side = math.ceil(view / 2**lvl)
        y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        base = (1000 * lvl + 100 * y + x).float()
        feats.append(torch.stack([base + 10000 * i for i in range(n)])[:, None].repeat(1, 2, 1, 1))
    return feats


def test_pools_each_box_on_its_level_with_aligned_roi_align():
    pooler = ScaleAwareRoIPooler(output_size=7, sampling_ratio=0, level_assignment="torchvision")
    feats = _ramp_features(2, 224)
    # Image 0: a P2 box and a P3 box; image 1: the P3 box and the P2 box (order must be kept).
    p2_box = [16.0, 16.0, 44.0, 44.0]    # s = 28 -> P2
    p3_box = [8.0, 8.0, 120.0, 64.0]     # s = sqrt(112 * 56) = 79.2 -> P3
    boxes = torch.tensor([[p2_box, p3_box], [p3_box, p2_box]])
    out = pooler(feats, boxes, (224, 224))
    assert out.shape == (4, 2, 7, 7)
    i = torch.arange(7.0)
    # aligned=True: feature coordinate = box / stride - 0.5; bin centres of a linear ramp.
    # P2 box: x, y start 16/4 - 0.5 = 3.5, bin 1  -> 4 + i.
    p2 = 2000 + 100 * (4 + i)[:, None] + (4 + i)[None, :]
    # P3 box: x start 0.5, bin 2 -> 1.5 + 2i; y start 0.5, bin 1 -> 1 + j.
    p3 = 3000 + 100 * (1 + i)[:, None] + (1.5 + 2 * i)[None, :]
    expected = torch.stack([p2, p3, p3 + 10000, p2 + 10000])
    torch.testing.assert_close(out[:, 0], expected, rtol=0, atol=1e-3)
    torch.testing.assert_close(out[:, 1], expected, rtol=0, atol=1e-3)
    order, counts = pooler.level_plan(boxes)
    assert counts.tolist() == [2, 2, 0, 0]
    torch.testing.assert_close(pooler(feats, boxes, (224, 224), plan=(order, counts.tolist())), out)


def test_112_view_scales_and_gradients_reach_only_used_levels():
    pooler = ScaleAwareRoIPooler(level_assignment="torchvision")
    feats = [f.requires_grad_() for f in _ramp_features(1, 112)]
    assert [tuple(f.shape[-2:]) for f in feats][-1] == (4, 4)
    assert pooler.feature_scales(feats, (112, 112)) == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    boxes = torch.tensor([[[10.0, 10.0, 40.0, 40.0], [0.0, 0.0, 100.0, 100.0]]])  # P2, P4
    out = pooler(feats, boxes, (112, 112))
    # P4 box: starts at 0 / 16 - 0.5, bins of 100 / 16 / 7; centre of bin (3, 3) in x and y.
    torch.testing.assert_close(out[1, 0, 3, 3], torch.tensor(4000 + 101 * (-0.5 + 100 / 16 * 3.5 / 7)))
    out.sum().backward()
    used = [f.grad is not None and f.grad.abs().sum().item() > 0 for f in feats]
    assert used == [True, False, True, False]


def test_wrong_feature_maps_raise():
    pooler = ScaleAwareRoIPooler()
    feats = _ramp_features(1, 224)
    with pytest.raises(ValueError, match="stride"):
        pooler(feats, torch.zeros(1, 1, 4), (112, 112))
    with pytest.raises(ValueError, match="feature maps"):
        pooler(feats[:3], torch.zeros(1, 1, 4), (224, 224))


def test_pool_all_levels_scales_each_level_by_its_exact_size_ratio():
    """Every box on every level; each map scaled by its size over the view's, per axis (the
    official code's normalised boxes times the map's height and width): P5 of a 112 px view is
    4 x 4, scale 4 / 112 (not 1 / 32)."""
    pooler = ScaleAwareRoIPooler()
    feats = _ramp_features(2, 112)
    boxes = torch.tensor([[[14.0, 28.0, 70.0, 84.0]], [[0.0, 0.0, 112.0, 112.0]]])
    out = pooler.pool_all_levels(feats, boxes, (112, 112))
    assert out.shape == (4, 2, 2, 7, 7)
    i = torch.arange(7.0)
    for level, feat in enumerate(feats):
        r = feat.shape[-1] / 112  # 1/4, 1/8, 1/16, 4/112
        # aligned: map coordinate = box * r - 0.5; bin centres of a linear ramp.
        x = 14 * r - 0.5 + (56 * r / 7) * (i + 0.5)
        y = 28 * r - 0.5 + (56 * r / 7) * (i + 0.5)
        expected = 1000 * (level + 2) + 100 * y[:, None] + x[None, :]
        torch.testing.assert_close(out[level, 0, 0], expected, rtol=0, atol=1e-3)
    # Image 1's box is pooled from image 1's maps (the batch index).
    assert out[:, 1].min() >= 10000


def test_official_levels_of_boxes_away_from_the_origin():
    pooler = ScaleAwareRoIPooler()
    boxes = torch.tensor([
        [100.0, 50.0, 147.0, 97.0],  # 48 x 48 (inclusive) -> P2
        [100.0, 50.0, 148.0, 97.0],  # 49 x 48 -> s = 48.5 -> P3
        [30.0, 120.0, 125.0, 215.0],  # 96 x 96 -> P3
    ])
    assert (pooler.assign_levels(boxes) + 2).tolist() == [2, 3, 3]


def test_torchvision_levels_follow_the_canonical_settings_and_clamp_to_p5():
    pooler = ScaleAwareRoIPooler(canonical_box_size=112, canonical_level=3, level_assignment="torchvision")
    # s = 112 -> P3; s < 112 -> P2; s = 224 -> P4; s = 1000 -> P5 (clamped).
    boxes = _square_boxes([111.0, 112.0, 224.0, 1000.0])
    assert (pooler.assign_levels(boxes) + 2).tolist() == [2, 3, 4, 5]
    assert pooler.boundaries == [112.0, 224.0, 448.0]


def test_build_soco_pooler_takes_every_setting_from_the_config():
    cfg = get_cfg()
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 5
    cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 2
    cfg.MODEL.SOCO.CANONICAL_BOX_SIZE = 112
    cfg.MODEL.SOCO.CANONICAL_LEVEL = 3
    cfg.MODEL.SOCO.LEVEL_ASSIGNMENT = "torchvision"
    pooler = build_soco_pooler(cfg)
    assert pooler.output_size == (5, 5) and pooler.sampling_ratio == 2
    assert pooler.boundaries == [112.0, 224.0, 448.0]
    assert (pooler.assign_levels(_square_boxes([111.0, 112.0])) + 2).tolist() == [2, 3]


def _random_features(n, height, width, channels=3):
    torch.manual_seed(0)
    sizes = [(math.ceil(height / 2**lvl), math.ceil(width / 2**lvl)) for lvl in range(2, 6)]
    return [torch.randn(n, channels, h, w) for h, w in sizes]


@pytest.mark.parametrize("sampling_ratio", [0, 1, 2])
def test_sampling_ratio_reaches_roi_align(sampling_ratio):
    """Random (non-linear) maps, where the number of samples per bin changes the result; 0 is
    torchvision's adaptive sampling (-1)."""
    from torchvision.ops import roi_align

    pooler = ScaleAwareRoIPooler(output_size=3, sampling_ratio=sampling_ratio)
    feats = _random_features(1, 64, 64)
    boxes = torch.tensor([[[3.0, 5.0, 40.0, 41.0]]])  # s = 38 * 37 inclusive -> P2
    ratio = sampling_ratio if sampling_ratio > 0 else -1
    expected = roi_align(feats[0], torch.tensor([[0.0, 3.0, 5.0, 40.0, 41.0]]), (3, 3), spatial_scale=0.25,
                         sampling_ratio=ratio, aligned=True)
    torch.testing.assert_close(pooler(feats, boxes, (64, 64)), expected)
    all_levels = pooler.pool_all_levels(feats, boxes, (64, 64))
    torch.testing.assert_close(all_levels[0], expected)
    other = roi_align(feats[0], torch.tensor([[0.0, 3.0, 5.0, 40.0, 41.0]]), (3, 3), spatial_scale=0.25,
                      sampling_ratio=1 if ratio != 1 else -1, aligned=True)
    assert not torch.allclose(expected, other)  # the setting matters on these maps
    if sampling_ratio == 0:
        torch.testing.assert_close(ScaleAwareRoIPooler(output_size=3)(feats, boxes, (64, 64)), expected)


def test_non_square_views():
    """A 224 x 112 (H x W) view: strides from the height, each map of pool_all_levels scaled per axis."""
    pooler = ScaleAwareRoIPooler()
    feats = _random_features(1, 224, 112)
    assert pooler.feature_scales(feats, (224, 112)) == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    boxes = torch.tensor([[[8.0, 16.0, 100.0, 200.0]]])
    out = pooler.pool_all_levels(feats, boxes, (224, 112))
    from torchvision.ops import roi_align

    for level, feat in enumerate(feats):
        sy, sx = feat.shape[-2] / 224, feat.shape[-1] / 112
        roi = torch.tensor([[0.0, 8.0 * sx, 16.0 * sy, 100.0 * sx, 200.0 * sy]])
        torch.testing.assert_close(out[level], roi_align(feat, roi, (7, 7), sampling_ratio=-1, aligned=True))


def test_no_boxes_gives_an_empty_batch():
    pooler = ScaleAwareRoIPooler(output_size=5)
    feats = _random_features(2, 64, 64, channels=6)
    out = pooler(feats, torch.zeros(2, 0, 4), (64, 64))
    assert out.shape == (0, 6, 5, 5) and out.dtype == feats[0].dtype


def test_pool_all_levels_with_one_image_and_two_channels():
    # Batch size (1) different from the channel count (2): the batch check reads the right axis.
    pooler = ScaleAwareRoIPooler()
    out = pooler.pool_all_levels(_ramp_features(1, 112), torch.tensor([[[0.0, 0.0, 56.0, 56.0]]]), (112, 112))
    assert out.shape == (4, 1, 2, 7, 7)


def test_bad_input_messages():
    pooler = ScaleAwareRoIPooler()
    feats = _random_features(1, 64, 64, channels=3)
    message = "boxes must be (N, K, 4) with N = 1 images; got (1, 2, 5)."
    for pool in (pooler.forward, pooler.pool_all_levels):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            pool(feats, torch.zeros(1, 2, 5), (64, 64))
        with pytest.raises(ValueError, match=r"^Expected 4 feature maps \(P2\.\.P5\), got 3\.$"):
            pool(feats[:3], torch.zeros(1, 2, 4), (64, 64))
    message = "boxes must be (N, K, 4) with N = 1 images; got (2, 1, 4)."  # two images of boxes, one of maps
    for pool in (pooler.forward, pooler.pool_all_levels):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            pool(feats, torch.zeros(2, 1, 4), (64, 64))
    message = "Feature map 0 has size (16, 16) for a view of (32, 32): stride 2, expected 4 for P2."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        pooler(feats, torch.zeros(1, 1, 4), (32, 32))
    message = "Feature map 1 has size (16, 16) for a view of (64, 64): stride 4, expected 8 for P3."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        pooler([feats[0], feats[0], feats[2], feats[3]], torch.zeros(1, 1, 4), (64, 64))
    with pytest.raises(ValueError, match=r"^sampling_ratio must be >= 0 \(0 = adaptive\), got -1\.$"):
        ScaleAwareRoIPooler(sampling_ratio=-1)


def test_pool_all_levels_rejects_boxes_of_another_batch():
    pooler = ScaleAwareRoIPooler()
    feats = _ramp_features(2, 64)
    with pytest.raises(ValueError, match=r"N = 2 images; got \(3, 1, 4\)"):
        pooler.pool_all_levels(feats, torch.zeros(3, 1, 4), (64, 64))
    with pytest.raises(ValueError, match=r"got \(2, 4\)"):
        pooler.pool_all_levels(feats, torch.zeros(2, 4), (64, 64))
    with pytest.raises(ValueError, match="feature maps"):
        pooler.pool_all_levels(feats[:3], torch.zeros(2, 1, 4), (64, 64))


class _HostDataOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten ops that, on a GPU, copy Python data to the device (``torch.tensor``,
    ``new_tensor``: ``lift_fresh``) or read the device on the host."""

    SYNCING = {"lift_fresh", "_local_scalar_dense", "nonzero", "bincount", "unique", "_unique2"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNCING:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_pooling_and_level_plans_copy_nothing_from_the_host():
    """The boundaries and scales are on the device already: pooling on all levels, assigning
    levels (official rule) and planning them neither copy Python data to the device nor sync.
    (torchvision's ``LevelMapper`` builds a 0-dim CPU tensor, which a GPU kernel takes as a
    number: no copy either.)"""
    pooler = ScaleAwareRoIPooler()
    features = [torch.randn(2, 3, 64 // 2 ** i, 48 // 2 ** i) for i in range(4)]
    boxes = torch.tensor([[[1.0, 2.0, 30.0, 40.0], [5.0, 5.0, 150.0, 200.0]]] * 2)
    flipped = torch.tensor([True, False])
    with _HostDataOps() as mode:
        pooled = pooler.pool_all_levels(features, boxes, (256, 192))
        order, counts = pooler.level_plan(boxes, flipped)
    assert mode.ops == []
    assert pooled.shape == (4, 4, 3, 7, 7)
    levels = pooler.assign_levels(boxes, flipped)
    assert counts.tolist() == torch.bincount(levels, minlength=4).tolist()
    assert torch.equal(levels[order], levels.sort(stable=True).values)
