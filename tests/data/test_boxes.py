import numpy as np
import pytest

from soco_d2.data.boxes import crop_boxes, hflip_boxes, jitter_boxes, pad_to_k, sample_k, scale_boxes


def test_jitter_boxes_by_hand_from_the_same_draws():
    boxes = np.array([[10, 20, 50, 100], [0, 0, 10, 10], [5, 5, 25, 15]], np.float32)
    out = jitter_boxes(boxes, prob=0.5, ratio=0.1, rng=np.random.default_rng(2))

    ref = np.random.default_rng(2)
    apply = ref.random(3) < 0.5
    r = ref.uniform(-0.1, 0.1, size=(3, 4))
    assert apply.any() and not apply.all()  # this seed exercises both branches
    for i, (x1, y1, x2, y2) in enumerate(boxes.astype(np.float64)):
        if not apply[i]:
            np.testing.assert_array_equal(out[i], boxes[i])
            continue
        w, h = x2 - x1, y2 - y1
        nx1, ny1 = x1 + r[i, 0] * w, y1 + r[i, 1] * h
        nw, nh = w * (1 + r[i, 2]), h * (1 + r[i, 3])
        np.testing.assert_allclose(out[i], [nx1, ny1, nx1 + nw, ny1 + nh], rtol=1e-5)


def test_jitter_boxes_extremes():
    boxes = np.array([[10, 20, 50, 100]], np.float32)
    np.testing.assert_array_equal(jitter_boxes(boxes, 0.0, 0.1, np.random.default_rng(0)), boxes)
    np.testing.assert_array_equal(jitter_boxes(boxes, 1.0, 0.0, np.random.default_rng(0)), boxes)
    out = jitter_boxes(boxes, 1.0, 0.1, np.random.default_rng(0))
    w, h = out[0, 2] - out[0, 0], out[0, 3] - out[0, 1]
    assert 36 <= w <= 44 and 72 <= h <= 88 and 6 <= out[0, 0] <= 14 and 12 <= out[0, 1] <= 28
    assert jitter_boxes(np.zeros((0, 4), np.float32), 0.5, 0.1, np.random.default_rng(0)).shape == (0, 4)


def test_crop_boxes_intersects_shifts_and_drops():
    boxes = np.array(
        [
            [10, 10, 30, 30],  # inside
            [0, 0, 15, 100],  # partly outside (left, top, bottom)
            [60, 60, 80, 80],  # outside
            [49.5, 20, 60, 40],  # 0.5 px sliver at the right edge
            [50, 20, 60, 40],  # touches the edge only: no overlap
        ],
        np.float32,
    )
    crop = (5, 8, 40, 42)  # y0, x0, h, w -> x in [8, 50), y in [5, 45)
    out, keep = crop_boxes(boxes, crop)
    np.testing.assert_array_equal(keep, [True, True, False, False, False])
    np.testing.assert_allclose(out[0], [2, 5, 22, 25])
    np.testing.assert_allclose(out[1], [0, 0, 7, 40])
    _, keep0 = crop_boxes(boxes, crop, min_size=0)
    np.testing.assert_array_equal(keep0, [True, True, False, True, False])


def test_scale_and_hflip_boxes():
    boxes = np.array([[10, 20, 30, 60]], np.float32)
    np.testing.assert_allclose(scale_boxes(boxes, 0.5, 2.0), [[5, 40, 15, 120]])
    flipped = hflip_boxes(boxes, 100)
    np.testing.assert_allclose(flipped, [[70, 20, 90, 60]])
    np.testing.assert_allclose(hflip_boxes(flipped, 100), boxes)
    assert scale_boxes(boxes, 1, 1).dtype == np.float32 and flipped.dtype == np.float32


def test_sample_k_distinct_and_pad_to_k_duplicates():
    rng = np.random.default_rng(0)
    chosen = sample_k(10, 4, rng)
    assert len(set(chosen.tolist())) == 4 and chosen.max() < 10
    np.testing.assert_array_equal(pad_to_k(4, 4, rng), np.arange(4))

    chosen = sample_k(2, 5, rng)
    assert sorted(chosen.tolist()) == [0, 1]
    take = pad_to_k(2, 5, rng)
    assert len(take) == 5 and take.dtype == np.int64
    np.testing.assert_array_equal(take[:2], [0, 1])
    assert set(take[2:].tolist()) <= {0, 1}

    assert len(sample_k(0, 4, rng)) == 0
    with pytest.raises(ValueError, match="k must be"):
        sample_k(3, 0, rng)
    for m, k in ((0, 4), (5, 4), (1, 0)):
        with pytest.raises(ValueError, match="pad_to_k"):
            pad_to_k(m, k, rng)


def test_sample_k_is_uniform_over_candidates():
    rng = np.random.default_rng(1)
    counts = np.zeros(6)
    for _ in range(3000):
        counts[sample_k(6, 2, rng)] += 1
    np.testing.assert_allclose(counts / counts.sum(), 1 / 6, atol=0.02)


def test_pad_to_k_draws_duplicates_uniformly_and_afresh_each_call():
    rng = np.random.default_rng(2)
    pads = np.stack([pad_to_k(3, 7, rng)[3:] for _ in range(3000)])
    np.testing.assert_allclose(np.bincount(pads.ravel(), minlength=3) / pads.size, 1 / 3, atol=0.02)
    # Successive calls (one per box set of a pair) are independent draws, not one shared draw.
    assert (pads[0::2] != pads[1::2]).any(axis=1).mean() > 0.9


def test_crop_boxes_size_limits_and_dtype():
    crop = (5, 8, 40, 42)  # x in [8, 50), y in [5, 45)
    boxes = np.array(
        [
            [10, 10, 11, 30],  # exactly 1 px wide: kept by the default min_size=1
            [10, 10, 30, 11],  # exactly 1 px tall
            [10, 10, 11.5, 30],  # 1.5 px wide
            [10, 44.5, 30, 60],  # 0.5 px sliver at the bottom edge
            [10, 50, 30, 60],  # below the crop, overlapping it in x only
            [10, 45, 30, 60],  # touches the bottom edge: zero height
        ],
        np.float32,
    )
    out, keep = crop_boxes(boxes, crop)
    np.testing.assert_array_equal(keep, [True, True, True, False, False, False])
    _, keep0 = crop_boxes(boxes, crop, min_size=0)
    np.testing.assert_array_equal(keep0, [True, True, True, True, False, False])
    _, keep2 = crop_boxes(boxes, crop, min_size=1.5)
    np.testing.assert_array_equal(keep2, [False, False, True, False, False, False])
    assert out.dtype == np.float32
    # Integer or float64 input, a flat box: float32 crop coordinates all the same.
    out64, keep64 = crop_boxes([[10, 10, 30, 30]], crop)
    assert out64.dtype == np.float32 and keep64.tolist() == [True]
    np.testing.assert_array_equal(out64, [[2, 5, 22, 25]])


def test_jitter_boxes_returns_float32():
    boxes = np.array([[10, 20, 50, 100], [0, 0, 10, 10]], np.float32)
    assert jitter_boxes(boxes, 0.5, 0.1, np.random.default_rng(0)).dtype == np.float32


def test_sample_k_and_pad_to_k_smallest_cases():
    rng = np.random.default_rng(0)
    one = sample_k(5, 1, rng)
    assert len(one) == 1 and one.dtype == np.int64
    np.testing.assert_array_equal(sample_k(1, 3, rng), [0])  # a single candidate is used
    empty = sample_k(0, 3, rng)
    assert empty.dtype == np.int64 and empty.shape == (0,)
    np.testing.assert_array_equal(pad_to_k(1, 1, rng), [0])
    np.testing.assert_array_equal(pad_to_k(1, 3, rng), [0, 0, 0])
    with pytest.raises(ValueError, match=r"^sample_k: k must be >= 1, got 0$"):
        sample_k(3, 0, rng)
    with pytest.raises(ValueError, match=r"^pad_to_k: need 1 <= m <= k, got m=5, k=4$"):
        pad_to_k(5, 4, rng)
