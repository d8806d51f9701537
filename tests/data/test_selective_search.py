import os
import logging

import numpy as np
import pytest
from PIL import Image

import soco_d2.data.selective_search as ss_mod
from soco_d2.data.image_list import list_images
from soco_d2.data.proposals import ProposalStore
from soco_d2.data.selective_search import (
    downscale,
    filter_boxes,
    filter_mask,
    generate_proposals,
    run_generation,
)

# ------------------------------------------------------------------------------------------------
# SoCo's filter: each rule at its boundaries. Image 200x200 -> sqrt(W*H) = 200.
# ------------------------------------------------------------------------------------------------


def _box(w, h, x=0, y=0):
    return [x, y, x + w, y + h]


@pytest.mark.parametrize(
    "w, h, keep",
    [
        (60, 60, True),  # scale sqrt(3600)/200 = 0.3 exactly
        (59, 60, False),  # sqrt(3540)/200 = 0.2975
        (160, 160, True),  # 0.8 exactly
        (160, 161, False),  # sqrt(25760)/200 = 0.8025
        (48, 144, True),  # aspect 1/3 exactly, scale sqrt(6912)/200 = 0.416
        (144, 48, True),  # aspect 3
        (48, 145, False),  # aspect 1/3.02
        (145, 48, False),
        (32, 96, False),  # aspect fine, scale sqrt(3072)/200 = 0.277
    ],
)
def test_filter_aspect_and_scale(w, h, keep):
    assert filter_mask(np.array([_box(w, h)], float), (200, 200)).tolist() == [keep]


def test_filter_min_side_and_non_square_image():
    # H=50, W=200 -> sqrt(W*H) = 100; 32x40: scale sqrt(1280)/100 = 0.358, aspect 0.8
    boxes = np.array([_box(60, 60), _box(32, 40), _box(31.9, 40), _box(40, 31.9), _box(0, 0)], float)
    np.testing.assert_array_equal(filter_mask(boxes, (50, 200)), [True, True, False, False, False])
    # the side rule alone: min_side=40 drops the 32-wide box
    np.testing.assert_array_equal(filter_mask(boxes, (50, 200), min_side=40), [True, False, False, False, False])


def test_filter_boxes_keeps_order_and_dtype():
    boxes = np.array([_box(100, 100, 5, 5), _box(10, 10), _box(60, 60, 1, 2)], np.float32)
    out = filter_boxes(boxes, (200, 200))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, boxes[[0, 2]])


def test_filter_fallbacks():
    hw = (200, 200)
    whole = _box(200, 200)  # scale 1.0: fails the scale rule only
    thin = _box(150, 40)  # aspect 3.75: fails the aspect rule (and passes min side)
    tiny = _box(20, 20)  # fails min side
    # 1. nothing passes the full rule -> ratio-only (aspect + min side)
    np.testing.assert_array_equal(filter_boxes(np.array([whole, thin, tiny]), hw), [whole])
    # 2. nothing passes the aspect rule -> min side only
    np.testing.assert_array_equal(filter_boxes(np.array([thin, tiny]), hw), [thin])
    # 3. nothing passes min side -> empty
    assert filter_boxes(np.array([tiny]), hw).shape == (0, 4)
    assert filter_boxes(np.zeros((0, 4)), hw).shape == (0, 4)
    # no fallback: the strict rule only
    assert filter_boxes(np.array([whole, thin]), hw, fallback=False).shape == (0, 4)
    # a box passing the full rule means no fallback even if others would pass the looser ones
    ok = _box(100, 100)
    np.testing.assert_array_equal(filter_boxes(np.array([whole, ok, thin]), hw), [ok])


# ------------------------------------------------------------------------------------------------
# Downscaling and mapping back
# ------------------------------------------------------------------------------------------------


def test_downscale_sizes():
    image = np.zeros((200, 400, 3), np.uint8)
    assert downscale(image, 100).shape == (50, 100, 3)
    assert downscale(image, 1000) is image  # never upscaled
    assert downscale(image, None) is image


def test_boxes_mapped_back_to_original_pixels(monkeypatch):
    seen = {}

    def fake_ss(small, mode):
        seen["shape"] = small.shape
        # OpenCV rect (x=10, y=5, w=20, h=20) -> box 10, 5, 30, 25 in the 100x50 copy
        return np.array([[10.0, 5.0, 30.0, 25.0], [0.0, 0.0, 100.0, 50.0], [24.0, 0.0, 30.0, 49.0]])

    monkeypatch.setattr(ss_mod, "selective_search", fake_ss)
    out = generate_proposals(np.zeros((200, 400, 3), np.uint8), max_size=100, min_side=32)
    assert seen["shape"] == (50, 100, 3)
    # x4 in both axes: (40, 20, 120, 100), (0, 0, 400, 200), (96, 0, 120, 196). sqrt(W*H) = 282.8:
    # the 80x80 box has scale 0.283 and the whole image 1.0, the last box is 24 px wide, so
    # nothing passes the full rule and the fallback keeps the two ratio-valid boxes (sorted).
    np.testing.assert_array_equal(out, [[0, 0, 400, 200], [40, 20, 120, 100]])
    assert out.dtype == np.float32


def _synthetic_scene():
    rng = np.random.default_rng(0)
    image = np.clip(120 + rng.normal(0, 6, (240, 320, 3)), 0, 255).astype(np.uint8)
    rects = [(20, 30, 130, 120), (170, 40, 300, 200), (40, 150, 140, 225)]
    colours = [(220, 30, 30), (30, 200, 40), (30, 40, 210)]
    for (x1, y1, x2, y2), c in zip(rects, colours):
        image[y1:y2, x1:x2] = c
    return image, np.array(rects, float)


def _iou(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


@pytest.mark.parametrize("mode, max_size", [("fast", 128), ("fast", None), ("quality", 96), ("single", 128)])
def test_recall_on_synthetic_rectangles(mode, max_size):
    image, rects = _synthetic_scene()
    boxes = generate_proposals(image, max_size=max_size, mode=mode)
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and len(boxes) > 0
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 320).all() and (boxes[:, 3] <= 240).all()
    best = _iou(rects, boxes.astype(float)).max(axis=1)
    assert (best >= 0.5).all(), best
    assert (best >= 0.9).all(), best  # solid rectangles are found almost exactly


def test_deterministic_unique_and_capped():
    image, _ = _synthetic_scene()
    a = generate_proposals(image, max_size=128)
    b = generate_proposals(image, max_size=128)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a, axis=0)) == len(a)
    assert (a == np.rint(a)).all()
    capped = generate_proposals(image, max_size=128, max_boxes=3)
    assert len(a) > 3 and len(capped) == 3
    np.testing.assert_array_equal(capped, generate_proposals(image, max_size=128, max_boxes=3))
    assert all((a == row).all(axis=1).any() for row in capped)  # a subset of the uncapped boxes


def test_small_images_and_bad_mode():
    assert generate_proposals(np.zeros((20, 300, 3), np.uint8)).shape == (0, 4)  # side < min_side
    assert generate_proposals(np.zeros((1, 1, 3), np.uint8), min_side=0).shape == (0, 4)
    with pytest.raises(ValueError, match="'fastest'"):
        generate_proposals(np.zeros((64, 64, 3), np.uint8), mode="fastest")
    with pytest.raises(ValueError, match="RGB"):
        generate_proposals(np.zeros((64, 64), np.uint8))


# ------------------------------------------------------------------------------------------------
# run_generation: resume, shards, unreadable images
# ------------------------------------------------------------------------------------------------


def _make_images(folder, n=10, size=(96, 128)):
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"c{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        a = (rng.random((*size, 3)) * 40 + 100).astype(np.uint8)
        a[10 + i : 70, 20 : 90 + i] = (200, 40 + 10 * i, 30)
        Image.fromarray(a).save(sub / f"im{i}.png")
    return list_images(folder)


def test_resume_after_interrupt_does_not_redo_images(tmp_path, monkeypatch):
    images = _make_images(tmp_path / "img")
    calls = []
    real = ss_mod.generate_proposals

    def counting(image, **kw):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt  # interrupt while the 8th image is in flight
        return real(image, **kw)

    monkeypatch.setattr(ss_mod, "generate_proposals", counting)
    out = tmp_path / "p.socoprop"
    with pytest.raises(KeyboardInterrupt):
        run_generation(images, out, workers=1, chunk_size=3, progress=False)
    assert not out.exists()
    with pytest.raises(FileExistsError):
        run_generation(images, out, workers=1, chunk_size=3, progress=False)

    calls.clear()
    summary = run_generation(images, out, workers=1, chunk_size=3, resume=True, progress=False)
    assert len(calls) == 3 and summary.images_done == 3 and summary.images_skipped == 7
    monkeypatch.setattr(ss_mod, "generate_proposals", real)
    run_generation(images, tmp_path / "ref.socoprop", workers=1, progress=False)
    assert out.read_bytes() == (tmp_path / "ref.socoprop").read_bytes()


def test_shards_merge_equals_single_run(tmp_path):
    from soco_d2.data.proposals import merge_proposals

    images = _make_images(tmp_path / "img", n=6)
    shards = []
    for i in range(3):
        shards.append(tmp_path / f"s{i}.socoprop")
        summary = run_generation(images, shards[-1], workers=1, shard=(i, 3), progress=False)
        assert summary.images_total == 2
        assert ProposalStore.open(shards[-1]).keys == images.keys[i::3]
    merge_proposals(shards, tmp_path / "merged.socoprop")
    summary = run_generation(images, tmp_path / "single.socoprop", workers=2, progress=False)
    assert summary.images_done == 6 and summary.boxes_min > 0 and summary.zero_box_images == 0
    assert (tmp_path / "merged.socoprop").read_bytes() == (tmp_path / "single.socoprop").read_bytes()
    with pytest.raises(ValueError, match="shard 3/3"):
        run_generation(images, tmp_path / "x.socoprop", shard=(3, 3))


def test_unreadable_images_logged_counted_skipped(tmp_path, caplog):
    images = _make_images(tmp_path / "img", n=3)
    (tmp_path / "img" / "c0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    images = list_images(tmp_path / "img")
    with caplog.at_level(logging.WARNING):
        summary = run_generation(images, tmp_path / "p.socoprop", workers=1, progress=False)
    assert summary.unreadable == ["c0/broken.jpg"] and summary.images_done == 3
    assert "c0/broken.jpg" in caplog.text
    assert "unreadable images skipped: 1 (recorded in the file)" in summary.format()
    store = ProposalStore.open(tmp_path / "p.socoprop")
    assert "c0/broken.jpg" not in store and len(store) == 3
    assert list(store.unreadable) == ["c0/broken.jpg"]
    assert "truncated" in store.unreadable["c0/broken.jpg"]
    # Resuming does not try the unreadable image again.
    again = run_generation(images, tmp_path / "p.socoprop", workers=1, progress=False, resume=True)
    assert again.images_skipped == 4 and again.unreadable == []
    assert store.metadata["mode"] == "fast" and store.metadata["max_size"] == ss_mod.DEFAULT_MAX_SIZE


def test_generation_on_reduced_jpeg_decode_keeps_original_pixels(tmp_path):
    """JPEGs are decoded at a fraction of their size; boxes and sizes stay in original pixels."""
    from PIL import Image

    from soco_d2.data.image_list import list_images
    from soco_d2.data.proposals import ProposalStore
    from soco_d2.data.selective_search import run_generation

    rng = np.random.default_rng(0)
    img = rng.integers(90, 110, size=(480, 640, 3)).astype(np.uint8)
    img[100:300, 200:500] = (220, 40, 40)
    os.makedirs(tmp_path / "imgs")
    Image.fromarray(img).save(tmp_path / "imgs" / "a.jpg", quality=95)
    out = str(tmp_path / "p.socoprop")
    run_generation(list_images(str(tmp_path / "imgs")), out, workers=1, progress=False)
    store = ProposalStore.open(out)
    assert tuple(store.image_size("a.jpg")) == (480, 640)
    boxes = store.get("a.jpg")
    target = np.array([200, 100, 500, 300], np.float64)
    x1 = np.maximum(boxes[:, 0], target[0]); y1 = np.maximum(boxes[:, 1], target[1])
    x2 = np.minimum(boxes[:, 2], target[2]); y2 = np.minimum(boxes[:, 3], target[3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) + 300 * 200 - inter
    assert (inter / union).max() > 0.8
