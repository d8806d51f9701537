import os
import re

import numpy as np
import pytest
import torch

from soco_d2.config import get_cfg, load_config
from soco_d2.data import MAPPER_REGISTRY, augment, build_mapper
from soco_d2.data.detco_views import DetCoViewMapper

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _cfg(**detco):
    cfg = get_cfg()
    cfg.INPUT.MAPPER = "DetCoViewMapper"
    for k, v in detco.items():
        setattr(cfg.INPUT.DETCO, k, v)
    return cfg


def _no_color(**kw):
    return _cfg(COLOR_JITTER_PROB=0.0, GRAYSCALE_PROB=0.0, BLUR_PROB=0.0, **kw)


def _image(h=180, w=240, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_registered_and_sample_format():
    assert MAPPER_REGISTRY.get("DetCoViewMapper") is DetCoViewMapper
    mapper = build_mapper(_cfg())
    out = mapper(_image(), np.zeros((0, 4), np.float32), np.random.default_rng(0))
    assert set(out) == {"global", "local", "local_perm"}
    assert out["global"].shape == (2, 3, 224, 224) and out["global"].dtype == torch.uint8
    assert out["local"].shape == (2, 9, 3, 64, 64) and out["local"].dtype == torch.uint8
    assert out["local_perm"].dtype == torch.int64
    for s in range(2):
        assert sorted(out["local_perm"][s].tolist()) == list(range(9))


def test_sizes_follow_config():
    cfg = _cfg(GLOBAL_SIZE=96, LOCAL_CROP_SIZE=120, GRID=2, PATCH_SIZE=48)
    out = DetCoViewMapper(cfg)(_image(), None, np.random.default_rng(0))
    assert out["global"].shape == (2, 3, 96, 96)
    assert out["local"].shape == (2, 4, 3, 48, 48)
    assert out["local_perm"].shape == (2, 4)


def test_patch_larger_than_cell_is_a_config_error():
    with pytest.raises(ValueError, match="PATCH_SIZE"):
        DetCoViewMapper(_cfg(PATCH_SIZE=90))


def test_deterministic_given_rng_and_different_otherwise():
    mapper = DetCoViewMapper(_cfg())
    img = _image()
    a = mapper(img, None, np.random.default_rng(5))
    b = mapper(img, None, np.random.default_rng(5))
    c = mapper(img, None, np.random.default_rng(6))
    for k in a:
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["global"], c["global"])


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_jigsaw_patches_are_the_claimed_cell_crops(flip_prob):
    mapper = DetCoViewMapper(_no_color(FLIP_PROB=flip_prob))
    img = _image(157, 203, seed=3)
    ps = mapper.patch_set(img, np.random.default_rng(11))
    y0, x0, h, w = ps.crop
    assert h >= 1 and w >= 1 and y0 + h <= 157 and x0 + w <= 203
    big = augment.resize(img[y0 : y0 + h, x0 : x0 + w], (255, 255))
    if flip_prob:
        big = big[:, ::-1]
    assert ps.flipped == bool(flip_prob)
    assert sorted(ps.perm.tolist()) == list(range(9))
    assert ps.offsets.min() >= 0 and ps.offsets.max() <= 85 - 64
    for j, cell in enumerate(ps.perm.tolist()):
        dy, dx = ps.offsets[cell]
        y, x = (cell // 3) * 85 + dy, (cell % 3) * 85 + dx
        np.testing.assert_array_equal(ps.patches[j], big[y : y + 64, x : x + 64])


def test_call_returns_patch_sets_in_chw():
    mapper = DetCoViewMapper(_no_color(FLIP_PROB=0.0))
    img = _image(seed=4)
    out = mapper(img, None, np.random.default_rng(2))
    rng = np.random.default_rng(2)
    [mapper.global_view(img, rng) for _ in range(2)]
    sets = [mapper.patch_set(img, rng) for _ in range(2)]
    for s in range(2):
        assert torch.equal(out["local_perm"][s], torch.from_numpy(sets[s].perm))
        assert torch.equal(out["local"][s], torch.from_numpy(sets[s].patches).permute(0, 3, 1, 2))


def test_set_colour_is_shared_and_patch_colour_is_not():
    # A flat grey image: any pixel difference between patches comes from the colour draw.
    img = np.full((120, 160, 3), (90, 140, 60), dtype=np.uint8)
    kw = dict(COLOR_JITTER_PROB=1.0, GRAYSCALE_PROB=0.0, BLUR_PROB=0.0, FLIP_PROB=0.0)
    shared = DetCoViewMapper(_cfg(LOCAL_COLOR="set", **kw)).patch_set(img, np.random.default_rng(0))
    assert (shared.patches == shared.patches[0]).all()
    assert not (shared.patches[0] == img[:64, :64]).all()
    each = DetCoViewMapper(_cfg(LOCAL_COLOR="patch", **kw)).patch_set(img, np.random.default_rng(0))
    assert len({tuple(p[0, 0]) for p in each.patches}) > 1


def test_set_blur_does_not_mix_neighbouring_patches():
    # Two-tone image: the left half of the crop is black, the right white. A patch in the left
    # column stays all black under per-patch blur, whatever its neighbours in the stack are.
    img = np.zeros((255, 255, 3), np.uint8)
    img[:, 128:] = 255
    cfg = _cfg(COLOR_JITTER_PROB=0.0, GRAYSCALE_PROB=0.0, BLUR_PROB=1.0, BLUR_SIGMA=(2.0, 2.0),
               FLIP_PROB=0.0, LOCAL_CROP_SCALE=(1.0, 1.0), CROP_RATIO=(1.0, 1.0))
    ps = DetCoViewMapper(cfg).patch_set(img, np.random.default_rng(1))
    for j, cell in enumerate(ps.perm.tolist()):
        if cell % 3 == 0:
            assert ps.patches[j].max() == 0
        if cell % 3 == 2:
            assert ps.patches[j].min() == 255


@pytest.mark.parametrize("shape", [(20, 20), (1, 300), (300, 1), (1, 1)])
def test_tiny_and_thin_images_are_upsampled(shape):
    out = DetCoViewMapper(_cfg())(_image(*shape), None, np.random.default_rng(0))
    assert out["global"].shape == (2, 3, 224, 224)
    assert out["local"].shape == (2, 9, 3, 64, 64)


def test_no_colour_global_view_is_the_resized_crop():
    mapper = DetCoViewMapper(_no_color(FLIP_PROB=0.0))
    img = _image(seed=8)
    view = mapper.global_view(img, np.random.default_rng(4))
    y0, x0, h, w = augment.random_resized_crop_params(180, 240, (0.2, 1.0), (3 / 4, 4 / 3),
                                                      np.random.default_rng(4))
    np.testing.assert_array_equal(view, augment.resize(img[y0 : y0 + h, x0 : x0 + w], (224, 224)))


@pytest.mark.parametrize("policy", ["randaugment", "autoaugment"])
def test_aa_policy_is_seeded_by_the_sample_rng(policy):
    mapper = DetCoViewMapper(_no_color(AUGMENT=policy))
    plain = DetCoViewMapper(_no_color())
    img = _image(seed=9)
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    views = [mapper.global_view(img, np.random.default_rng(s)) for s in (1, 1, 2, 3, 4, 5)]
    assert torch.equal(torch.random.get_rng_state(), state)  # global torch RNG untouched
    np.testing.assert_array_equal(views[0], views[1])
    base = [plain.global_view(img, np.random.default_rng(s)) for s in (2, 3, 4, 5)]
    assert any(not np.array_equal(v, b) for v, b in zip(views[2:], base))


def test_unknown_policy_and_local_colour_are_config_errors():
    with pytest.raises(ValueError, match="INPUT.DETCO.AUGMENT"):
        DetCoViewMapper(_cfg(AUGMENT="trivial"))
    with pytest.raises(ValueError, match="INPUT.DETCO.LOCAL_COLOR"):
        DetCoViewMapper(_cfg(LOCAL_COLOR="cell"))


def test_real_images(data_root):
    import glob

    from PIL import Image

    files = sorted(glob.glob(os.path.join(data_root, "pennfudan", "PNGImages", "*.png")))[:3]
    mapper = DetCoViewMapper(_cfg())
    for i, f in enumerate(files):
        img = np.asarray(Image.open(f).convert("RGB"))
        out = mapper(img, None, np.random.default_rng(i))
        assert out["local"].shape == (2, 9, 3, 64, 64)
        assert out["global"].float().std() > 1


# --- The views as the paper draws them (each test fails if one of the draws is dropped or
# drawn with another range). Seeded, so deterministic; the bounds are several standard
# deviations wide.


def test_query_and_key_views_are_independent_draws():
    mapper = DetCoViewMapper(_no_color(FLIP_PROB=0.0))
    img = _image(seed=12)
    for seed in range(5):
        out = mapper(img, None, np.random.default_rng(seed))
        assert not torch.equal(out["global"][0], out["global"][1]), seed
        assert not torch.equal(out["local"][0], out["local"][1]), seed
        assert not torch.equal(out["local_perm"][0], out["local_perm"][1]), seed


def test_local_crop_covers_at_least_60_percent_of_the_image():
    # DetCo Sec. 3.4 / PIRL: the patch set's crop has scale (0.6, 1), not the global (0.2, 1).
    mapper = DetCoViewMapper(_no_color())
    area = 180 * 240
    fractions = []
    for seed in range(200):
        y0, x0, h, w = mapper.patch_set(_image(), np.random.default_rng(seed)).crop
        fractions.append(h * w / area)
    assert min(fractions) >= 0.6 - 0.01  # w, h are rounded to pixels
    assert min(fractions) < 0.65 and max(fractions) > 0.95


def test_jigsaw_patches_are_shuffled_uniformly():
    # perm[j] is the cell of patch j: over 270 sets each (position, cell) pair should hold
    # about 30 times (binomial sd 5.2); without the shuffle the diagonal would hold every time.
    mapper = DetCoViewMapper(_no_color())
    img = _image(seed=1)
    counts = np.zeros((9, 9), int)
    for seed in range(270):
        counts[np.arange(9), mapper.patch_set(img, np.random.default_rng(seed)).perm] += 1
    assert counts.min() >= 10 and counts.max() <= 55, counts


def _blur_sigmas(blurred, plain, grid=np.round(np.arange(0.1, 2.001, 0.05), 2)):
    """The grid sigma whose blur of ``plain`` is closest to ``blurred`` (0: not blurred)."""
    if np.array_equal(blurred, plain):
        return 0.0
    errors = [np.abs(augment.gaussian_blur(plain, s).astype(np.int16) - blurred).mean() for s in grid]
    return float(grid[int(np.argmin(errors))])


def test_blur_of_the_global_views_follows_the_default_probability_and_sigma_range():
    # MoCo v2: GaussianBlur sigma U(0.1, 2.0) with p 0.5 on the global views. Colour jitter and
    # grayscale off, so a view is its un-blurred twin (same seed, BLUR_PROB 0) blurred.
    # The mapper is built from the shipped config; the defaults must say the same.
    default = get_cfg().INPUT.DETCO
    assert tuple(default.BLUR_SIGMA) == (0.1, 2.0) and default.BLUR_PROB == 0.5
    no_colour = ["INPUT.DETCO.COLOR_JITTER_PROB", "0.0", "INPUT.DETCO.GRAYSCALE_PROB", "0.0"]
    shipped = os.path.join(ROOT, "configs", "detco", "detco_r50_200ep.yaml")
    mapper = DetCoViewMapper(load_config(shipped, no_colour))
    plain = DetCoViewMapper(load_config(shipped, no_colour + ["INPUT.DETCO.BLUR_PROB", "0.0"]))
    img = _image(seed=0)
    sigmas = [_blur_sigmas(mapper.global_view(img, np.random.default_rng(s)),
                           plain.global_view(img, np.random.default_rng(s))) for s in range(40)]
    blurred = [s for s in sigmas if s > 0]
    assert 8 <= len(blurred) <= 32, sigmas  # p 0.5 (a sigma-0.1 blur may round to no change)
    assert max(blurred) > 1.5 and min(blurred) < 0.6, blurred


def test_blur_of_the_patch_sets_is_drawn_per_set():
    mapper = DetCoViewMapper(_cfg(COLOR_JITTER_PROB=0.0, GRAYSCALE_PROB=0.0))
    plain = DetCoViewMapper(_cfg(COLOR_JITTER_PROB=0.0, GRAYSCALE_PROB=0.0, BLUR_PROB=0.0))
    img = _image(seed=2)
    sigmas = []
    for s in range(30):
        a = mapper.patch_set(img, np.random.default_rng(s)).patches
        b = plain.patch_set(img, np.random.default_rng(s)).patches
        per_patch = {_blur_sigmas(x, y) for x, y in zip(a, b)}
        assert len(per_patch) == 1 or 0.0 not in per_patch  # one blur draw for the whole set
        sigmas.append(max(per_patch))
    blurred = [s for s in sigmas if s > 0]
    assert 6 <= len(blurred) <= 24 and max(blurred) > 1.5, sigmas


@pytest.mark.parametrize("image", [np.zeros((20, 30, 3), np.float32), np.zeros((20, 30, 4), np.uint8)])
def test_bad_image_and_missing_rng_are_named(image):
    message = f"DetCoViewMapper expects a uint8 HxWx3 RGB image, got {image.dtype} {image.shape}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        DetCoViewMapper(_cfg())(image, None, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"^DetCoViewMapper needs the sample's numpy Generator \(rng\)$"):
        DetCoViewMapper(_cfg())(_image(), None, None)


@pytest.mark.parametrize("grid, patch, local_size", [(1, 200, 255), (3, 1, 255), (3, 85, 255)])
def test_grid_and_patch_limits_that_are_valid(grid, patch, local_size):
    mapper = DetCoViewMapper(_no_color(GRID=grid, PATCH_SIZE=patch, LOCAL_CROP_SIZE=local_size))
    ps = mapper.patch_set(_image(), np.random.default_rng(0))
    assert ps.patches.shape == (grid * grid, patch, patch, 3)


@pytest.mark.parametrize("grid, patch, cell", [(0, 64, 255), (3, 0, 85), (3, 86, 85)])
def test_grid_and_patch_limits_that_are_not(grid, patch, cell):
    message = (f"INPUT.DETCO: PATCH_SIZE ({patch}) must be in [1, LOCAL_CROP_SIZE // GRID]"
               f" = [1, 255 // {grid} = {cell}]; lower PATCH_SIZE or GRID, or raise LOCAL_CROP_SIZE.")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        DetCoViewMapper(_cfg(GRID=grid, PATCH_SIZE=patch))


def test_patch_offsets_cover_the_whole_cell():
    mapper = DetCoViewMapper(_no_color())
    sets = [mapper.patch_set(_image(), np.random.default_rng(s)) for s in range(20)]
    offsets = np.concatenate([ps.offsets for ps in sets])
    assert offsets.min() == 0 and offsets.max() == 85 - 64


def test_colour_settings_reach_both_colour_augmentations():
    cfg = _cfg(COLOR_JITTER=(0.1, 0.2, 0.3, 0.05), COLOR_JITTER_PROB=0.7, GRAYSCALE_PROB=0.3,
               BLUR_PROB=0.4, BLUR_SIGMA=(0.5, 1.5))
    mapper = DetCoViewMapper(cfg)
    for aug, blur_prob in ((mapper.color, 0.4), (mapper.set_color, 0.0)):
        assert (aug.brightness, aug.contrast, aug.saturation, aug.hue) == (
            (0.9, 1.1), (0.8, 1.2), (0.7, 1.3), (-0.05, 0.05))
        probs = (aug.jitter_prob, aug.grayscale_prob, aug.blur_prob, aug.solarize_prob)
        assert probs == (0.7, 0.3, blur_prob, 0.0)
        assert aug.blur_sigma == (0.5, 1.5)


def test_randaugment_settings_and_seeding_replayed():
    cfg = _no_color(AUGMENT="randaugment", RANDAUGMENT_NUM_OPS=3, RANDAUGMENT_MAGNITUDE=7, FLIP_PROB=0.0)
    mapper = DetCoViewMapper(cfg)
    assert (mapper.policy.num_ops, mapper.policy.magnitude) == (3, 7)
    img = _image(seed=5)
    for s in range(3):
        view = mapper.global_view(img, np.random.default_rng(s))
        replay = np.random.default_rng(s)
        y0, x0, h, w = augment.random_resized_crop_params(180, 240, (0.2, 1.0), (3 / 4, 4 / 3), replay)
        plain = augment.resize(img[y0 : y0 + h, x0 : x0 + w], (224, 224))
        replay.random()  # the flip coin
        torch.manual_seed(int(replay.integers(0, 2**63 - 1)))
        expected = mapper.policy(torch.from_numpy(plain).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        assert view.dtype == np.uint8 and view.shape == (224, 224, 3)
        np.testing.assert_array_equal(view, expected)
