import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "engine"))
import monitor_toy as mtoy  # noqa: E402

from soco_d2.evaluation.knn import (  # noqa: E402
    ProbeDataError,
    ProbeImages,
    build_probe_split,
    linear_probe,
    load_probe_image,
    sampling_noise,
    weighted_knn,
)


def _brute_force_knn(train, ytr, test, k, t, num_classes):
    """The recipe written out one test sample at a time."""
    train = train / train.norm(dim=1, keepdim=True)
    test = test / test.norm(dim=1, keepdim=True)
    preds = []
    for x in test:
        sims = [(float(x @ f), int(y)) for f, y in zip(train, ytr)]
        sims.sort(key=lambda p: -p[0])
        votes = [0.0] * num_classes
        for s, y in sims[:k]:
            votes[y] += math.exp(s / t)
        preds.append([c for c in sorted(range(num_classes), key=lambda c: -votes[c]) if votes[c] > 0])
    return preds


def test_weighted_knn_matches_the_recipe_written_out():
    g = torch.Generator().manual_seed(0)
    train, ytr = torch.randn(60, 8, generator=g), torch.randint(0, 7, (60,), generator=g)
    test, yte = torch.randn(25, 8, generator=g), torch.randint(0, 7, (25,), generator=g)
    top1, top5 = weighted_knn(train, ytr, test, yte, 7, k=10, temperature=0.07, chunk=7)
    preds = _brute_force_knn(train, ytr, test, 10, 0.07, 7)
    assert top1 == pytest.approx(100 * np.mean([p[0] == y for p, y in zip(preds, yte.tolist())]))
    assert top5 == pytest.approx(100 * np.mean([y in p[:5] for p, y in zip(preds, yte.tolist())]))
    # the temperature matters: with T large every neighbour counts the same (majority vote)
    hot = weighted_knn(train, ytr, test, yte, 7, k=10, temperature=100.0)
    preds_hot = _brute_force_knn(train, ytr, test, 10, 100.0, 7)
    assert hot[0] == pytest.approx(100 * np.mean([p[0] == y for p, y in zip(preds_hot, yte.tolist())]))


def test_weighted_knn_caps_k_and_separates_clusters():
    centres = torch.eye(3) * 5
    train = torch.cat([centres[i] + 0.1 * torch.randn(4, 3) for i in range(3)])
    ytr = torch.arange(3).repeat_interleave(4)
    assert weighted_knn(train, ytr, centres, torch.arange(3), 3, k=20) == (100.0, 100.0)


def test_linear_probe_learns_a_linearly_separable_problem():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 4, generator=g)
    x = torch.randn(300, 16, generator=g)
    y = (x @ w).argmax(1)
    top1, top5 = linear_probe(x[:200], y[:200], x[200:], y[200:], 4)
    assert top1 > 90 and top5 == 100.0
    # labels independent of the features: no better than chance on held-out data
    rand = torch.randint(0, 4, (300,), generator=g)
    assert linear_probe(x[:200], rand[:200], x[200:], rand[200:], 4)[0] < 45


def test_split_is_deterministic_disjoint_and_uses_every_image(tmp_path):
    root = mtoy.make_labeled_folder(tmp_path / "p", per_class=5)
    a = build_probe_split(root, val_fraction=0.4, seed=3)
    b = build_probe_split(root, val_fraction=0.4, seed=3)
    assert a.train.paths == b.train.paths and a.val.paths == b.val.paths
    assert a.classes == ["blue", "green", "red"]
    assert len(a.val) == 6 and len(a.train) == 9 and not set(a.train.paths) & set(a.val.paths)
    for paths, labels in ((a.train.paths, a.train.labels), (a.val.paths, a.val.labels)):
        assert all(os.path.basename(os.path.dirname(p)) == a.classes[y] for p, y in zip(paths, labels))
    c = build_probe_split(root, val_fraction=0.4, seed=4)
    assert c.val.paths != a.val.paths
    capped = build_probe_split(root, val_fraction=0.4, max_per_class=2)
    assert len(capped.train) == 6 and len(capped.val) == 6


def test_two_folders_and_skipped_classes_are_counted(tmp_path):
    train = mtoy.make_labeled_folder(tmp_path / "train", per_class=3)
    val = mtoy.make_labeled_folder(tmp_path / "val", classes=("red", "blue", "grey"), per_class=2)
    os.makedirs(tmp_path / "train" / "empty")
    split = build_probe_split(train, str(val))
    assert split.classes == ["blue", "green", "red"]
    assert len(split.train) == 9 and len(split.val) == 4
    assert split.skipped == {"empty class": ["empty"], "val class without train images": ["grey"]}
    assert "1 empty class (empty)" in split.describe()


@pytest.mark.parametrize("layout, match", [
    ({"red": 3}, r"1 usable class"),  # one class
    ({"red": 3, "blue": 0}, r"1 usable class \(skipped 1 empty class: blue\)"),
    ({"a": 1, "b": 1, "c": 1}, r"0 usable classes \(skipped 3 class with one image"),  # classes > images
])
def test_unusable_folders_are_config_errors(tmp_path, layout, match):
    root = tmp_path / "p"
    for c, n in layout.items():
        os.makedirs(root / c)
        if n:
            mtoy.make_labeled_folder(root, classes=(c,), per_class=n)
    with pytest.raises(ProbeDataError, match=match):
        build_probe_split(str(root))


def test_no_class_folders_is_an_error(tmp_path):
    mtoy.make_labeled_folder(tmp_path / "p", per_class=2)
    flat = tmp_path / "p" / "red"
    with pytest.raises(ProbeDataError, match="--train-root = .* has no class sub-folders"):
        build_probe_split(str(flat), names=("--train-root", "--val-root", "--val-fraction"))


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    root = mtoy.make_labeled_folder(tmp_path / "p", per_class=3)
    (tmp_path / "p" / "red" / "bad.jpg").write_bytes(b"not an image")
    (tmp_path / "p" / "blue" / "empty.png").write_bytes(b"")
    split = build_probe_split(root, val_fraction=0.5)
    paths = split.train.paths + split.val.paths
    images = ProbeImages(paths, 16)
    assert images.images.shape == (len(paths), 3, 16, 16)
    assert int((~images.valid).sum()) == 2 and len(images.unreadable) == 2
    assert any("bad.jpg" in u for u in images.unreadable)


def test_probe_image_is_a_centre_crop_of_the_resized_image(tmp_path):
    import cv2

    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 38:42] = 255  # a vertical bar in the middle
    path = str(tmp_path / "x.png")
    cv2.imwrite(path, img)
    out = load_probe_image(path, 28)
    assert out.shape == (28, 28, 3)
    cols = np.nonzero(out[14, :, 0] > 128)[0]
    assert abs(cols.mean() - 13.5) <= 1  # still centred


@pytest.mark.parametrize("accuracy, n, expected", [
    (50.0, 100, 10.0),   # 200 * sqrt(0.25 / 100)
    (90.0, 100, 6.0),    # 200 * sqrt(0.09 / 100)
    (100.0, 25, 4.0),    # at 100%, one image's variance: 200 * sqrt((0.25 / 25) / 25)
])
def test_sampling_noise_is_two_binomial_standard_errors(accuracy, n, expected):
    assert sampling_noise(accuracy, n) == pytest.approx(expected)
