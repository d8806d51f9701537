import re

import numpy as np
import pytest
import torch

from soco_d2.config import get_cfg
from soco_d2.data import build_mapper
from soco_d2.data.augment import random_resized_crop_params, resize
from soco_d2.data.boxes import crop_boxes
from soco_d2.data.soco_views import SoCoViewMapper

RECTS = {  # x1, y1, x2, y2 in a 200x300 image -> colour
    (20, 30, 120, 110): (230, 20, 20),
    (150, 60, 280, 180): (20, 230, 20),
    (40, 130, 130, 190): (20, 20, 230),
}


def _cfg(**soco):
    cfg = get_cfg()
    c = cfg.INPUT.SOCO
    # No colour change and no jitter unless a test asks for it.
    c.COLOR_JITTER_PROB = 0.0
    c.GRAYSCALE_PROB = 0.0
    c.BLUR_PROB = (0.0, 0.0)
    c.SOLARIZE_PROB = (0.0, 0.0)
    c.JITTER_PROB = 0.0
    for k, v in soco.items():
        c[k] = v
    return cfg


def _painted():
    img = np.full((200, 300, 3), 128, np.uint8)
    for (x1, y1, x2, y2), colour in RECTS.items():
        img[y1:y2, x1:x2] = colour
    props = np.array(list(RECTS), np.float32)
    colours = np.array(list(RECTS.values()), np.float32)
    return img, props, colours


def _mean_inside(img_chw, box, margin=1.5):
    x1, y1, x2, y2 = box.tolist()
    xs, xe = int(np.ceil(x1 + margin)), int(np.floor(x2 - margin))
    ys, ye = int(np.ceil(y1 + margin)), int(np.floor(y2 - margin))
    if xe <= xs or ye <= ys:
        return None  # too thin to judge away from resampled edges
    return img_chw[:, ys:ye, xs:xe].float().mean(dim=(1, 2)).numpy()


@pytest.mark.parametrize("mode", ["independent", "downsample"])
@pytest.mark.parametrize("flip_prob", [0.0, 1.0, 0.5])
def test_boxes_stay_aligned_with_pixels_in_every_view(mode, flip_prob):
    img, props, colours = _painted()
    mapper = SoCoViewMapper(_cfg(V3_MODE=mode, VIEW4_SIZE=64, FLIP_PROB=flip_prob))
    checked = 0
    for seed in range(12):
        out = mapper(img, props, np.random.default_rng(seed))
        for pair in out["pairs"]:
            assert set(pair["ids_a"].tolist()) == set(pair["ids_b"].tolist())
            for side in ("a", "b"):
                view = out["images"][pair[side]]
                for box, i in zip(pair["boxes_" + side], pair["ids_" + side].tolist()):
                    assert 0 <= i < len(props)  # painted boxes always overlap enough here
                    mean = _mean_inside(view, box)
                    if mean is not None:
                        np.testing.assert_allclose(mean, colours[i], atol=6)
                        checked += 1
    assert checked > 200


@pytest.mark.parametrize("mode", ["independent", "downsample"])
def test_flip_flags_name_the_views_that_were_flipped(mode):
    """``flips[v]`` is True iff view v is mirrored: a view whose flag is set shows the red
    rectangle (left in the image) on its right half, with its box there too."""
    img, props, colours = _painted()
    mapper = SoCoViewMapper(_cfg(V3_MODE=mode, VIEW4_SIZE=64, FLIP_PROB=0.5))
    seen = set()
    for seed in range(16):
        out = mapper(img, props[:1], np.random.default_rng(seed))
        assert sorted(out["flips"]) == sorted(out["images"])
        for pair in out["pairs"]:
            for side in ("a", "b"):
                view = pair[side]
                flag = bool(out["flips"][view])
                box = pair["boxes_" + side][0]
                width = out["images"][view].shape[-1]
                assert ((box[0] + box[2]) / 2 > width / 2) == flag
                seen.add((view, flag))
        if mode == "downsample":
            assert out["flips"]["v3"] == out["flips"]["v2"]
    assert {flag for _, flag in seen} == {True, False}


def test_flip_moves_pixels_and_boxes_together():
    img, props, colours = _painted()
    red = props[:1]
    for flip_prob in (0.0, 1.0):
        out = SoCoViewMapper(_cfg(FLIP_PROB=flip_prob))(img, red, np.random.default_rng(0))
        box = out["pairs"][0]["boxes_a"][0]
        # The red rectangle is on the left of the image: on the right of V1 after a flip.
        assert (box[0] > 112) == (flip_prob == 1.0)
        np.testing.assert_allclose(_mean_inside(out["images"]["v1"], box), colours[0], atol=6)


def test_gradient_content_of_matched_boxes_agrees_across_views():
    # R encodes x, G encodes y: the mean colour inside a box gives its centre in the original.
    # Checked for proposals entirely inside the crop (a proposal cut by the crop is whole in V1
    # and partial in V2, as in the official code) and for the no-proposal fallback.
    h, w = 240, 320
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, np.full_like(xx, 100)], axis=-1).astype(np.uint8)
    props = np.array([[130, 100, 170, 150], [140, 110, 190, 140], [120, 90, 160, 130]], np.float32)
    checked = 0
    for props_used in (props, np.zeros((0, 4), np.float32)):  # with proposals, and the fallback
        mapper = SoCoViewMapper(_cfg(VIEW4_SIZE=96, FLIP_PROB=0.0))
        for seed in range(6):
            out = mapper(img, props_used, np.random.default_rng(seed))
            for pair in out["pairs"]:
                size = out["images"][pair["b"]].shape[-1]
                ids_a = pair["ids_a"].tolist()
                for bb, i in zip(pair["boxes_b"], pair["ids_b"].tolist()):
                    ba = pair["boxes_a"][ids_a.index(i)]  # boxes correspond by id
                    inside = bool((bb[:2] > 0).all() and (bb[2:] < size).all())
                    if i < len(props_used) and not inside:
                        continue
                    checked += 1
                    ma = _mean_inside(out["images"][pair["a"]], ba, margin=0)
                    mb = _mean_inside(out["images"][pair["b"]], bb, margin=0)
                    np.testing.assert_allclose(ma[:2], mb[:2], atol=2.5)
    assert checked > 60


def test_k_sampling_padding_and_ids():
    img, props, _ = _painted()
    out = SoCoViewMapper(_cfg(NUM_PROPOSALS=8, CROP_SCALE=(1.0, 1.0), CROP_RATIO=(1.5, 1.5)))(
        img, props, np.random.default_rng(3)
    )
    for pair in out["pairs"]:
        assert torch.equal(pair["ids_a"][:3], pair["ids_b"][:3])  # the chosen, in the same order
        for side in ("a", "b"):
            ids = pair["ids_" + side].numpy()
            assert ids.dtype == np.int64 and ids.shape == (8,)
            assert sorted(ids[:3].tolist()) == [0, 1, 2]  # all three distinct first, then duplicates
            for j in range(3, 8):  # a duplicate is an exact copy of its side's first box
                first = int(np.flatnonzero(ids == ids[j])[0])
                assert torch.equal(pair["boxes_" + side][j], pair["boxes_" + side][first])
        assert pair["boxes_a"].dtype == torch.float32 and pair["boxes_a"].shape == (8, 4)

    many = np.tile(props, (5, 1))  # 15 proposals, K = 4: four distinct ids
    out = SoCoViewMapper(_cfg(CROP_SCALE=(1.0, 1.0), CROP_RATIO=(1.5, 1.5)))(img, many, np.random.default_rng(0))
    for pair in out["pairs"]:
        assert len(set(pair["ids_a"].tolist())) == 4 and pair["ids_a"].max() < 15


def test_no_common_proposal_uses_the_crop_rectangle_with_a_fresh_id():
    img, props, _ = _painted()
    out = SoCoViewMapper(_cfg(FLIP_PROB=0.0))(img, np.zeros((0, 4), np.float32), np.random.default_rng(0))
    for pair in out["pairs"]:
        assert pair["ids_a"].tolist() == [0] * 4 and torch.equal(pair["ids_a"], pair["ids_b"])
        size = out["images"][pair["b"]].shape[-1]
        np.testing.assert_allclose(pair["boxes_b"].numpy(), [[0, 0, size, size]] * 4)
    # A proposal in a corner, never inside a small crop: the fallback id is 1 (one past the last).
    corner = np.array([[0, 0, 4, 4]], np.float32)
    out = SoCoViewMapper(_cfg(CROP_SCALE=(0.05, 0.05), MAX_TRIES=1))(img, corner, np.random.default_rng(0))
    assert set(out["pairs"][0]["ids_a"].tolist()) <= {0, 1}
    ids = np.concatenate([p["ids_a"].numpy() for p in out["pairs"]])
    assert (ids >= 0).all()


def test_retry_loop_resamples_crops_until_proposals_are_shared():
    img = np.zeros((100, 100, 3), np.uint8)
    props = np.array([[0, 0, 40, 40], [2, 2, 42, 42]], np.float32)  # a corner; crops of 10-20%

    def both_pairs_matched(tries):
        mapper = SoCoViewMapper(
            _cfg(MAX_TRIES=tries, CROP_SCALE=(0.1, 0.2), VIEW1_SIZE=16, VIEW2_SIZE=16, VIEW3_SIZE=8)
        )
        hits = 0
        for seed in range(200):
            out = mapper(img, props, np.random.default_rng(seed))
            hits += all(not (p["ids_a"] == 2).any() for p in out["pairs"])  # id 2: fallback
        return hits / 200

    one, three, eight = both_pairs_matched(1), both_pairs_matched(3), both_pairs_matched(8)
    assert three > one + 0.15
    # The requirement goes 2, 1, 1, ...: never 0, so later draws still look for a shared box.
    assert eight > three + 0.05


def _replay_crop_draws(props, keep1, c, seed):
    """The mapper's crop draws of a 100 x 100 image replayed from ``seed``: per try the (V2, V3)
    crops and the number of candidate proposals each shares with V1."""
    replay = np.random.default_rng(seed)
    crops, draws = [], []
    for _ in range(c.MAX_TRIES):
        pair = [random_resized_crop_params(100, 100, c.CROP_SCALE, c.CROP_RATIO, replay) for _ in "23"]
        crops.append(pair)
        draws.append(tuple(int((keep1 & crop_boxes(props, cr, c.MIN_BOX_SIZE)[1]).sum()) for cr in pair))
    return crops, draws


def _accepted_draw(draws, k, max_tries, floor):
    """Index of the accepted crop draw for per-draw candidate counts ``draws`` [(n12, n13)]:
    the requirement starts at max(K // 2, 1) and is halved after each rejected draw, not below
    ``floor`` (1 in the official code; 0 lets a draw without candidates through)."""
    need = max(k // 2, 1)
    for t, (n12, n13) in enumerate(draws[:max_tries]):
        if n12 >= need and n13 >= need:
            return t
        need = max(need // 2, floor)
    return max_tries - 1


def test_retry_loop_follows_the_official_rule():
    # One proposal on the left 40% of the image, crops of 10-20%: a draw shares it with both
    # crops about a third of the time. The crops are replayed from the documented draw order
    # (per draw: V2's crop, then V3's) and the accepted draw is identified by V2's and V3's
    # pixels. The official rule (5 draws, need 2, 1, 1, 1, 1) and a rule whose requirement
    # reaches 0 (need 2, 1, 0: the third draw always accepted) choose differently for some seeds.
    rng_img = np.random.default_rng(123)
    img = rng_img.integers(0, 256, size=(100, 100, 3)).astype(np.uint8)
    props = np.array([[0, 0, 40, 100]], np.float32)
    cfg = _cfg(CROP_SCALE=(0.1, 0.2), VIEW1_SIZE=16, VIEW2_SIZE=16, VIEW3_SIZE=8, FLIP_PROB=0.0)
    c = cfg.INPUT.SOCO
    assert (c.NUM_PROPOSALS, c.MAX_TRIES) == (4, 5)  # the official select_k / max_tries
    mapper = SoCoViewMapper(cfg)
    keep1 = crop_boxes(props, (0, 0, 100, 100), c.MIN_BOX_SIZE)[1]
    differs = with_candidate = 0
    for seed in range(40):
        crops, draws = _replay_crop_draws(props, keep1, c, seed)
        t = _accepted_draw(draws, 4, c.MAX_TRIES, floor=1)
        differs += t != _accepted_draw(draws, 4, c.MAX_TRIES, floor=0)
        out = mapper(img, props, np.random.default_rng(seed))
        for (y0, x0, h, w), view, size in zip(crops[t], ("v2", "v3"), (16, 8)):
            expected = resize(img[y0 : y0 + h, x0 : x0 + w], (size, size)).transpose(2, 0, 1)
            assert torch.equal(out["images"][view], torch.from_numpy(expected)), (seed, t, draws)
        # From the second draw on the requirement is one box: if any of those draws shares the
        # proposal with both crops, the accepted one does.
        if any(min(d) >= 1 for d in draws[1:]):
            with_candidate += 1
            assert all((p["ids_a"] == 0).all() and (p["ids_b"] == 0).all() for p in out["pairs"])
    assert differs >= 5 and with_candidate >= 30


def test_padding_duplicates_are_drawn_per_box_set():
    # Three shared proposals, K = 8: five duplicates per box set. The official code pads V1's
    # set and the other view's set of each pair separately, so their duplicates differ.
    img, props, _ = _painted()
    mapper = SoCoViewMapper(_cfg(NUM_PROPOSALS=8, CROP_SCALE=(1.0, 1.0), CROP_RATIO=(1.5, 1.5), VIEW4_SIZE=64))
    differ = total = 0
    for seed in range(10):
        out = mapper(img, props, np.random.default_rng(seed))
        for p in out["pairs"]:
            a, b = p["ids_a"], p["ids_b"]
            assert torch.equal(a[:3], b[:3]) and sorted(a[:3].tolist()) == [0, 1, 2]
            assert set(a.tolist()) == set(b.tolist()) == {0, 1, 2}  # every id on both sides
            differ += not torch.equal(a[3:], b[3:])
            total += 1
        p12, _, p14 = out["pairs"]
        # SoCo*: V1-V4 reuses the V1-V2 pair's V1 set and V2's set, as the official Star dataset.
        assert torch.equal(p14["ids_a"], p12["ids_a"]) and torch.equal(p14["ids_b"], p12["ids_b"])
    # Equal padding on both sides has probability (1/3)^5 per pair.
    assert differ >= total - 1


def test_downsample_mode_boxes_are_v2_boxes_scaled():
    img, props, _ = _painted()
    out = SoCoViewMapper(_cfg(V3_MODE="downsample", VIEW3_SIZE=112, JITTER_PROB=1.0))(
        img, props, np.random.default_rng(5)
    )
    p12, p13 = out["pairs"]
    torch.testing.assert_close(p13["boxes_b"], p12["boxes_b"] * (112 / 224))
    assert torch.equal(p13["ids_a"], p12["ids_a"]) and torch.equal(p13["boxes_a"], p12["boxes_a"])


def test_soco_star_v4_shapes_and_partner_boxes():
    img, props, _ = _painted()
    out = SoCoViewMapper(_cfg(VIEW3_SIZE=192, VIEW4_SIZE=112, JITTER_PROB=1.0, FLIP_PROB=0.0))(
        img, props, np.random.default_rng(1)
    )
    shapes = {k: tuple(v.shape) for k, v in out["images"].items()}
    assert shapes == {"v1": (3, 224, 224), "v2": (3, 224, 224), "v3": (3, 192, 192), "v4": (3, 112, 112)}
    assert all(v.dtype == torch.uint8 for v in out["images"].values())
    p12, _, p14 = out["pairs"]
    assert [p["b"] for p in out["pairs"]] == ["v2", "v3", "v4"]
    assert torch.equal(p14["boxes_a"], p12["boxes_a"]) and torch.equal(p14["ids_b"], p12["ids_b"])
    torch.testing.assert_close(p14["boxes_b"], p12["boxes_b"] * (112 / 224))


def test_default_sample_format():
    img, props, _ = _painted()
    out = build_mapper(get_cfg())(img, props, np.random.default_rng(0))
    assert set(out["images"]) == {"v1", "v2", "v3"}
    assert tuple(out["images"]["v3"].shape) == (3, 112, 112)
    assert [(p["a"], p["b"]) for p in out["pairs"]] == [("v1", "v2"), ("v1", "v3")]
    for p in out["pairs"]:
        assert set(p) == {"a", "b", "boxes_a", "boxes_b", "ids_a", "ids_b"}
        assert p["boxes_a"].shape == (4, 4) and p["ids_b"].dtype == torch.int64


def test_same_seed_same_sample_different_seed_different_sample():
    img, props, _ = _painted()
    mapper = SoCoViewMapper(get_cfg())  # full colour augmentation and jitter

    def flat(out):
        return [out["images"][k] for k in sorted(out["images"])] + [
            t for p in out["pairs"] for t in (p["boxes_a"], p["boxes_b"], p["ids_a"])
        ]

    a = flat(mapper(img, props, np.random.default_rng(11)))
    b = flat(mapper(img, props, np.random.default_rng(11)))
    c = flat(mapper(img, props, np.random.default_rng(12)))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_jitter_changes_only_v1_boxes():
    img, props, _ = _painted()
    still = SoCoViewMapper(_cfg(JITTER_PROB=0.0))(img, props, np.random.default_rng(4))
    moved = SoCoViewMapper(_cfg(JITTER_PROB=1.0))(img, props, np.random.default_rng(4))
    for p0, p1 in zip(still["pairs"], moved["pairs"]):
        assert torch.equal(p0["ids_a"], p1["ids_a"])
        assert not torch.equal(p0["boxes_a"], p1["boxes_a"])
        assert (p1["boxes_a"] >= 0).all() and (p1["boxes_a"] <= 224).all()  # clipped to V1
        # Relative jitter of at most 10% of the size per coordinate.
        size = p0["boxes_a"][:, 2:] - p0["boxes_a"][:, :2]
        assert ((p1["boxes_a"] - p0["boxes_a"]).abs() <= 0.21 * size.repeat(1, 2) + 1e-3).all()


@pytest.mark.parametrize("shape", [(1, 1), (5, 300), (300, 5), (7, 9)])
def test_tiny_images(shape):
    img = np.random.default_rng(0).integers(0, 256, size=shape + (3,)).astype(np.uint8)
    whole = np.array([[0, 0, shape[1], shape[0]]], np.float32)
    mapper = SoCoViewMapper(get_cfg())
    for props in (whole, None):
        out = mapper(img, props, np.random.default_rng(0))
        assert tuple(out["images"]["v2"].shape) == (3, 224, 224)
        for p in out["pairs"]:
            assert torch.isfinite(p["boxes_a"]).all() and torch.isfinite(p["boxes_b"]).all()
            assert (p["boxes_b"][:, 2:] > p["boxes_b"][:, :2]).all()


def test_cutout_fills_a_square_inside_each_box_with_the_pixel_mean():
    img = np.full((200, 300, 3), 255, np.uint8)
    props = np.array([[40, 40, 160, 160]], np.float32)
    cfg = _cfg(CUTOUT=True, CUTOUT_PROB=1.0, CUTOUT_RATIO=(0.25, 0.25), FLIP_PROB=0.0, CROP_SCALE=(1.0, 1.0))
    out = SoCoViewMapper(cfg)(img, props, np.random.default_rng(0))
    fill = torch.tensor(np.rint(cfg.MODEL.PIXEL_MEAN), dtype=torch.uint8)
    for name, pair in (("v2", out["pairs"][0]), ("v3", out["pairs"][1])):
        view = out["images"][name]
        filled = (view == fill[:, None, None]).all(dim=0)
        box = pair["boxes_b"][0]
        ys, xs = torch.nonzero(filled, as_tuple=True)
        bw, bh = float(box[2] - box[0]), float(box[3] - box[1])
        side = np.sqrt(0.25 * bw * bh)
        # One square of side ~ side (clipped to the view), centred inside the box.
        assert xs.max() - xs.min() + 1 <= side + 1 and ys.max() - ys.min() + 1 <= side + 1
        assert len(ys) == (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)  # a full rectangle
        cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
        size = view.shape[-1]
        if 0 < xs.min() and xs.max() < size - 1 and 0 < ys.min() and ys.max() < size - 1:
            assert len(ys) >= (side - 1) ** 2  # not clipped: the whole square
            assert box[0] - 1 <= cx <= box[2] + 1 and box[1] - 1 <= cy <= box[3] + 1
    assert not (out["images"]["v1"] == fill[:, None, None]).all(dim=0).any()


def test_color_settings_follow_the_view_index():
    img = np.full((50, 60, 3), 128, np.uint8)
    # Solarize V2/V3 always, V1 never: grey 128 becomes 127 in V2/V3 only.
    out = SoCoViewMapper(_cfg(SOLARIZE_PROB=(0.0, 1.0)))(img, None, np.random.default_rng(0))
    assert (out["images"]["v1"] == 128).all()
    assert (out["images"]["v2"] == 127).all() and (out["images"]["v3"] == 127).all()
    # Blur always on V1 only: a sharp edge is smoothed in V1 and stays sharp in V2.
    img[:, 30:] = 255
    cfg = _cfg(BLUR_PROB=(1.0, 0.0), BLUR_SIGMA=(2.0, 2.0), CROP_SCALE=(1.0, 1.0), CROP_RATIO=(1.2, 1.2))
    out = SoCoViewMapper(cfg)(img, None, np.random.default_rng(0))

    def ramp_width(view):
        row = out["images"][view][0, 0]
        return int(((row > 128) & (row < 255)).sum())

    assert ramp_width("v1") >= ramp_width("v2") + 6


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("V3_MODE", "paper", "V3_MODE"),
        ("NUM_PROPOSALS", 0, "NUM_PROPOSALS"),
        ("VIEW2_SIZE", 0, "VIEW2_SIZE"),
        ("BLUR_PROB", (1.0,), "BLUR_PROB"),
        ("CROP_SCALE", (0.9, 0.5), "CROP_SCALE"),
    ],
)
def test_bad_config_is_named(key, value, match):
    with pytest.raises(ValueError, match=match):
        SoCoViewMapper(_cfg(**{key: value}))


@pytest.mark.parametrize("image", [np.zeros((20, 30, 3), np.float32), np.zeros((20, 30, 4), np.uint8)])
def test_bad_image_is_named(image):
    message = f"SoCoViewMapper expects a uint8 HxWx3 RGB image, got {image.dtype} {image.shape}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        SoCoViewMapper(_cfg())(image, None, np.random.default_rng(0))


def test_no_proposals_given_falls_back_to_id_zero():
    img, _, _ = _painted()
    out = SoCoViewMapper(_cfg())(img, None, np.random.default_rng(0))
    for pair in out["pairs"]:
        assert pair["ids_a"].tolist() == [0] * 4 and pair["ids_b"].tolist() == [0] * 4


def test_v1_boxes_are_the_proposals_scaled_exactly():
    img, props, _ = _painted()
    out = SoCoViewMapper(_cfg(FLIP_PROB=0.0, CROP_SCALE=(0.3, 1.0)))(img, props, np.random.default_rng(2))
    scale = np.array([224 / 300, 224 / 200] * 2, np.float32)
    for pair in out["pairs"]:
        expected = props[pair["ids_a"].numpy()] * scale
        np.testing.assert_allclose(pair["boxes_a"].numpy(), expected, rtol=1e-6)


def test_min_box_size_applies_to_v1_and_to_each_crop():
    img = np.zeros((100, 100, 3), np.uint8)
    whole_crop = dict(CROP_SCALE=(1.0, 1.0), CROP_RATIO=(1.0, 1.0), FLIP_PROB=0.0)
    # A 0.5 px wide proposal is a candidate with MIN_BOX_SIZE = 0 (the official rule)...
    sliver = np.array([[10, 10, 10.5, 60]], np.float32)
    out = SoCoViewMapper(_cfg(MIN_BOX_SIZE=0.0, **whole_crop))(img, sliver, np.random.default_rng(0))
    assert all((p["ids_a"] == 0).all() for p in out["pairs"])
    # ... and a whole-image proposal is never one in crops narrower than MIN_BOX_SIZE = 50.
    whole = np.array([[0, 0, 100, 100]], np.float32)
    cfg = _cfg(MIN_BOX_SIZE=50.0, CROP_SCALE=(0.01, 0.01), CROP_RATIO=(1.0, 1.0), MAX_TRIES=2)
    for seed in range(3):
        out = SoCoViewMapper(cfg)(img, whole, np.random.default_rng(seed))
        assert all((p["ids_a"] == 1).all() and (p["ids_b"] == 1).all() for p in out["pairs"])


def test_v3_flips_on_its_own_coin_in_independent_mode():
    # Left half black, right half white; crops of the whole image: a view is flipped iff its
    # first column is white.
    img = np.zeros((60, 60, 3), np.uint8)
    img[:, 30:] = 255
    cfg = _cfg(FLIP_PROB=0.5, CROP_SCALE=(1.0, 1.0), CROP_RATIO=(1.0, 1.0), VIEW1_SIZE=16, VIEW2_SIZE=16,
               VIEW3_SIZE=16)
    mapper = SoCoViewMapper(cfg)
    flips = []
    for seed in range(12):
        out = mapper(img, None, np.random.default_rng(seed))
        flips.append(tuple(int(out["images"][v][0, 8, 0]) > 128 for v in ("v2", "v3")))
    assert any(f2 != f3 for f2, f3 in flips) and any(f2 == f3 for f2, f3 in flips)


def test_soco_star_v4_of_one_pixel_and_its_colour():
    img = np.full((50, 60, 3), 128, np.uint8)
    out = SoCoViewMapper(_cfg(VIEW4_SIZE=1, SOLARIZE_PROB=(0.0, 1.0)))(img, None, np.random.default_rng(0))
    assert tuple(out["images"]["v4"].shape) == (3, 1, 1)
    assert (out["images"]["v4"] == 127).all()  # V4 gets the V2/V3 colour settings (solarized)


def test_color_jitter_strengths_come_from_the_config():
    img, props, _ = _painted()
    cfg = _cfg(COLOR_JITTER=(0.0, 0.0, 0.0, 0.0), COLOR_JITTER_PROB=1.0, FLIP_PROB=0.0)
    out = SoCoViewMapper(cfg)(img, props, np.random.default_rng(0))
    plain = SoCoViewMapper(_cfg(FLIP_PROB=0.0))(img, props, np.random.default_rng(0))
    # No strength: the jitter is the identity (and draws no factor), so the views are unchanged.
    assert torch.equal(out["images"]["v1"], plain["images"]["v1"])


_MIN_MAX = "INPUT.SOCO.CROP_{} must be (min, max) with 0 < min <= max, got"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"VIEW1_SIZE": 0}, "INPUT.SOCO.VIEW1_SIZE must be a positive size in pixels, got 0"),
        ({"VIEW2_SIZE": 0}, "INPUT.SOCO.VIEW2_SIZE must be a positive size in pixels, got 0"),
        ({"VIEW3_SIZE": 0}, "INPUT.SOCO.VIEW3_SIZE must be a positive size in pixels, got 0"),
        ({"VIEW4_SIZE": -1}, "INPUT.SOCO.VIEW4_SIZE must be >= 0 (0 disables V4), got -1"),
        ({"CROP_SCALE": (0.0, 0.5)}, f"{_MIN_MAX.format('SCALE')} (0.0, 0.5)"),
        ({"CROP_RATIO": (0.5, 1.0, 2.0)}, f"{_MIN_MAX.format('RATIO')} (0.5, 1.0, 2.0)"),
        ({"CROP_RATIO": (0.0, 1.0)}, f"{_MIN_MAX.format('RATIO')} (0.0, 1.0)"),
        ({"CROP_RATIO": (2.0, 1.0)}, f"{_MIN_MAX.format('RATIO')} (2.0, 1.0)"),
        ({"MAX_TRIES": 0}, "INPUT.SOCO.MAX_TRIES must be >= 1, got 0"),
        ({"COLOR_JITTER": (0.4, 0.4, 0.2)},
         "INPUT.SOCO.COLOR_JITTER must be (brightness, contrast, saturation, hue), got (0.4, 0.4, 0.2)"),
    ],
)
def test_bad_config_messages(overrides, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        SoCoViewMapper(_cfg(**overrides))


def test_smallest_valid_config():
    img, props, _ = _painted()
    out = SoCoViewMapper(_cfg(VIEW1_SIZE=1, VIEW2_SIZE=1, VIEW3_SIZE=1, NUM_PROPOSALS=1))(
        img, props, np.random.default_rng(0)
    )
    assert all(tuple(v.shape) == (3, 1, 1) for v in out["images"].values())
    assert all(p["boxes_a"].shape == (1, 4) for p in out["pairs"])


def _filled_rect(view, fill):
    filled = (view == fill[:, None, None]).all(dim=0)
    ys, xs = torch.nonzero(filled, as_tuple=True)
    if len(ys) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_cutout_squares_every_distinct_box_at_a_uniform_point():
    # Two boxes far apart, whole-image crops: each box gets its own square, centred at a point
    # drawn uniformly in the box (x and y independently), of its own random area.
    img = np.full((200, 300, 3), 255, np.uint8)
    props = np.array([[20, 100, 140, 180], [180, 10, 280, 60]], np.float32)
    cfg = _cfg(CUTOUT=True, CUTOUT_PROB=1.0, CUTOUT_RATIO=(0.02, 0.2), FLIP_PROB=0.0, CROP_SCALE=(1.0, 1.0),
               CROP_RATIO=(1.5, 1.5))
    fill = torch.tensor(np.rint(cfg.MODEL.PIXEL_MEAN), dtype=torch.uint8)
    mapper = SoCoViewMapper(cfg)
    rel_x, rel_y, area_ratio = [], [], []
    for seed in range(16):
        out = mapper(img, props, np.random.default_rng(seed))
        pair = out["pairs"][0]
        view = out["images"]["v2"]
        areas = []
        for i in range(2):
            box = pair["boxes_b"][pair["ids_b"].tolist().index(i)].numpy()
            (x1, y1), (x2, y2) = np.floor(box[:2]).astype(int), np.ceil(box[2:]).astype(int)
            rect = _filled_rect(view[:, y1:y2, x1:x2], fill)  # the square, clipped to the box
            assert rect is not None, (seed, i)
            cx, cy = x1 + (rect[0] + rect[2]) / 2, y1 + (rect[1] + rect[3]) / 2
            if rect[0] > 0 and rect[2] < x2 - x1 and rect[1] > 0 and rect[3] < y2 - y1:  # not clipped
                rel_x.append((cx - box[0]) / (box[2] - box[0]))
                rel_y.append((cy - box[1]) / (box[3] - box[1]))
                square = (rect[2] - rect[0]) * (rect[3] - rect[1])
                areas.append(square / ((box[2] - box[0]) * (box[3] - box[1])))
        if len(areas) == 2:
            area_ratio.append(areas[0] / areas[1])
        pair3 = out["pairs"][1]  # V3 (its own crop of the whole image) gets a square per box too
        for i in range(2):
            box = pair3["boxes_b"][pair3["ids_b"].tolist().index(i)].numpy()
            (x1, y1), (x2, y2) = np.floor(box[:2]).astype(int), np.ceil(box[2:]).astype(int)
            assert _filled_rect(out["images"]["v3"][:, y1:y2, x1:x2], fill) is not None, (seed, i)
    rel_x, rel_y = np.array(rel_x), np.array(rel_y)
    assert len(rel_x) >= 8
    assert ((rel_x > -0.05) & (rel_x < 1.05) & (rel_y > -0.05) & (rel_y < 1.05)).all()
    assert rel_x.max() - rel_x.min() > 0.4 and rel_y.max() - rel_y.min() > 0.4  # spread over the box
    assert np.abs(rel_x - rel_y).max() > 0.2  # x and y drawn independently
    assert area_ratio and max(abs(np.log(r)) for r in area_ratio) > 0.5  # areas drawn per box


def test_cutout_square_clipped_at_the_top_of_the_view_starts_at_row_zero():
    img = np.full((200, 300, 3), 255, np.uint8)
    props = np.array([[100, 0, 200, 60]], np.float32)  # touches the top of the image
    cfg = _cfg(CUTOUT=True, CUTOUT_PROB=1.0, CUTOUT_RATIO=(0.5, 0.5), FLIP_PROB=0.0, CROP_SCALE=(1.0, 1.0),
               CROP_RATIO=(1.5, 1.5))
    fill = torch.tensor(np.rint(cfg.MODEL.PIXEL_MEAN), dtype=torch.uint8)
    tops = []
    for seed in range(12):
        rect = _filled_rect(SoCoViewMapper(cfg)(img, props, np.random.default_rng(seed))["images"]["v2"], fill)
        assert rect is not None  # never lost, even when the square sticks out of the view
        tops.append(rect[1])
    assert min(tops) == 0


def test_cutout_fill_is_the_pixel_mean_clamped_to_bytes():
    img = np.full((100, 100, 3), 200, np.uint8)
    props = np.array([[20, 20, 80, 80]], np.float32)
    cfg = _cfg(CUTOUT=True, CUTOUT_PROB=1.0, FLIP_PROB=0.0, CROP_SCALE=(1.0, 1.0), CROP_RATIO=(1.0, 1.0))
    cfg.MODEL.PIXEL_MEAN = [-5.0, 0.2, 300.0]
    view = SoCoViewMapper(cfg)(img, props, np.random.default_rng(0))["images"]["v2"]
    assert _filled_rect(view, torch.tensor([0, 0, 255], dtype=torch.uint8)) is not None


@pytest.mark.parametrize("k, props", [
    (1, [[0, 0, 40, 100]]),
    (5, [[0, 0, 40, 100], [0, 0, 41, 100]]),
    (6, [[0, 0, 40, 100]]),
    (8, [[0, 0, 40, 100]]),
])
def test_retry_rule_halves_the_requirement_by_integer_division(k, props):
    # As test_retry_loop_follows_the_official_rule, for other K: need = max(K // 2, 1), then
    # need = max(need // 2, 1) after each rejected draw (K = 5: 2; K = 6: 3, 1; K = 8: 4, 2, 1).
    rng_img = np.random.default_rng(123)
    img = rng_img.integers(0, 256, size=(100, 100, 3)).astype(np.uint8)
    props = np.array(props, np.float32)
    cfg = _cfg(NUM_PROPOSALS=k, CROP_SCALE=(0.1, 0.2), VIEW1_SIZE=16, VIEW2_SIZE=16, VIEW3_SIZE=8,
               FLIP_PROB=0.0)
    c = cfg.INPUT.SOCO
    mapper = SoCoViewMapper(cfg)
    keep1 = crop_boxes(props, (0, 0, 100, 100), c.MIN_BOX_SIZE)[1]
    for seed in range(30):
        crops, draws = _replay_crop_draws(props, keep1, c, seed)
        t = _accepted_draw(draws, k, c.MAX_TRIES, floor=1)
        y0, x0, h, w = crops[t][0]
        expected = resize(img[y0 : y0 + h, x0 : x0 + w], (16, 16)).transpose(2, 0, 1)
        assert torch.equal(mapper(img, props, np.random.default_rng(seed))["images"]["v2"],
                           torch.from_numpy(expected)), (seed, t, draws)


def test_downsample_mode_accepts_the_first_draw_with_candidates():
    img = np.random.default_rng(1).integers(0, 256, size=(100, 100, 3)).astype(np.uint8)
    whole = np.array([[0, 0, 100, 100]] * 2, np.float32)  # two candidates (K // 2) in every crop
    cfg = _cfg(V3_MODE="downsample", CROP_SCALE=(0.3, 0.6), VIEW2_SIZE=16, FLIP_PROB=0.0)
    c = cfg.INPUT.SOCO
    y0, x0, h, w = random_resized_crop_params(100, 100, c.CROP_SCALE, c.CROP_RATIO, np.random.default_rng(4))
    out = SoCoViewMapper(cfg)(img, whole, np.random.default_rng(4))
    expected = resize(img[y0 : y0 + h, x0 : x0 + w], (16, 16)).transpose(2, 0, 1)
    assert torch.equal(out["images"]["v2"], torch.from_numpy(expected))
