import os
import shutil

import numpy as np
import pytest
import torch

from soco_d2.config import load_config
from soco_d2.finetune import coco_data
from soco_d2.finetune.coco_data import (
    COCODetection,
    build_train_loader,
    get_dataset_paths,
    register_coco_instances,
)


def test_builtin_names_resolve_under_soco_datasets(monkeypatch, tmp_path):
    monkeypatch.setenv("SOCO_DATASETS", str(tmp_path))
    assert get_dataset_paths("coco_2017_val") == (
        str(tmp_path / "coco/annotations/instances_val2017.json"), str(tmp_path / "coco/val2017"))
    assert get_dataset_paths("pennfudan_train") == (
        str(tmp_path / "pennfudan/annotations/instances_train.json"),
        str(tmp_path / "pennfudan/PNGImages"))


def test_register_and_json_path_names(tiny_coco, tmp_path):
    json_file, image_dir = tiny_coco
    name = f"tiny_{tmp_path.name}"
    register_coco_instances(name, json_file, image_dir)
    assert get_dataset_paths(name) == (json_file, image_dir)
    with pytest.raises(ValueError, match="already registered"):
        register_coco_instances(name, json_file, "/elsewhere")
    # A json path is a dataset name of its own; images next to it in ../<split>.
    assert get_dataset_paths(json_file) == (json_file, os.path.abspath(image_dir))
    with pytest.raises(KeyError, match="not registered"):
        get_dataset_paths("no_such_dataset")


def test_training_targets(tiny_coco):
    json_file, image_dir = tiny_coco
    ds = COCODetection(json_file, image_dir, is_train=True, flip_prob=0.0)
    # Image 3 has no annotation and is filtered out.
    assert [r["image_id"] for r in ds.records] == [1, 2, 4]
    image, target = ds[(0, 123)]
    assert image.dtype == torch.uint8 and image.shape == (3, 80, 96)
    assert target["image_id"] == 1
    torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 10, 40, 40], [50, 30, 80, 60]]))
    assert target["labels"].tolist() == [1, 2]  # category 3 -> 1, 7 -> 2
    masks = target["masks"]
    assert masks.shape == (2, 80, 96) and masks.dtype == torch.uint8
    assert 850 <= int(masks[0].sum()) <= 1000  # the 30x30 square, rasterised
    ys, xs = np.nonzero(masks[0].numpy())
    assert xs.min() >= 10 and xs.max() <= 40 and ys.min() >= 10 and ys.max() <= 40
    # Image 2: the crowd region and the zero-area box are not training targets.
    _, t2 = ds[(1, 5)]
    assert t2["labels"].tolist() == [2] and t2["masks"].shape[0] == 1


def test_first_label_zero_and_empty_images_kept(tiny_coco):
    json_file, image_dir = tiny_coco
    ds = COCODetection(json_file, image_dir, is_train=True, first_label=0, filter_empty=False,
                       flip_prob=0.0)
    assert len(ds) == 4
    assert ds[(0, 0)][1]["labels"].tolist() == [0, 1]
    _, empty = ds[(2, 0)]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 64, 64)
    assert ds.label_to_category_id(np.array([1, 0])).tolist() == [7, 3]


def test_horizontal_flip(tiny_coco):
    json_file, image_dir = tiny_coco
    plain = COCODetection(json_file, image_dir, is_train=True, flip_prob=0.0)
    flipped = COCODetection(json_file, image_dir, is_train=True, flip_prob=1.0)
    im0, t0 = plain[(0, 7)]
    im1, t1 = flipped[(0, 7)]
    torch.testing.assert_close(im1, im0.flip(-1))
    torch.testing.assert_close(t1["masks"], t0["masks"].flip(-1))
    torch.testing.assert_close(t1["boxes"], torch.tensor([[56.0, 10, 86, 40], [16, 30, 46, 60]]))


def test_flip_follows_the_sample_seed(tiny_coco):
    json_file, image_dir = tiny_coco
    ds = COCODetection(json_file, image_dir, is_train=True)
    flips = [bool(ds[(0, s)][1]["boxes"][0, 0] != 10.0) for s in range(40)]
    assert 5 < sum(flips) < 35
    assert flips == [bool(ds[(0, s)][1]["boxes"][0, 0] != 10.0) for s in range(40)]


def test_missing_images_fail_or_are_skipped(tiny_coco, caplog):
    json_file, image_dir = tiny_coco
    os.remove(os.path.join(image_dir, "train_2.png"))
    with pytest.raises(FileNotFoundError, match=r"1 of the 4 images.*train_2\.png.*SKIP_MISSING"):
        COCODetection(json_file, image_dir, is_train=True)
    ds = COCODetection(json_file, image_dir, is_train=False, skip_missing=True)
    assert [r["image_id"] for r in ds.records] == [1, 3, 4]


def test_missing_json_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        COCODetection(str(tmp_path / "nope.json"), str(tmp_path), is_train=True)


def test_unreadable_images(tiny_coco):
    json_file, image_dir = tiny_coco
    with open(os.path.join(image_dir, "train_1.png"), "wb") as f:
        f.write(b"not a png")
    test_ds = COCODetection(json_file, image_dir, is_train=False)
    image, target = test_ds[0]
    assert image is None and target["image_id"] == 1 and test_ds.num_unreadable == 1
    train_ds = COCODetection(json_file, image_dir, is_train=True)
    image, target = train_ds[(0, 3)]  # replaced by another image, chosen by the seed
    assert image is not None and target["image_id"] in (2, 4)
    assert train_ds[(0, 3)][1]["image_id"] == target["image_id"]


def test_train_loader_resumes_the_stream(tiny_coco, tiny_overrides):
    json_file, _ = tiny_coco
    cfg = load_config("", tiny_overrides + ["DATASETS.TRAIN", f"('{json_file}',)"])
    ds = coco_data.build_dataset(cfg, json_file, True, 1)

    def stream(start, n):
        it = build_train_loader(cfg, ds, start_iter=start)
        out = []
        for _ in range(n):
            images, targets = next(it)
            assert len(images) == 2
            out.append([(t["image_id"], t["boxes"][0, 0].item()) for t in targets])
        return out

    full = stream(0, 4)
    assert stream(2, 2) == full[2:]


def test_masks_from_compressed_rle(tiny_coco, tmp_path):
    import json

    from pycocotools import mask as mask_util

    json_file, image_dir = tiny_coco
    with open(json_file) as f:
        data = json.load(f)
    m = np.zeros((64, 64), dtype=np.uint8)
    m[10:30, 20:50] = 1
    rle = mask_util.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")
    data["annotations"].append({"id": 99, "image_id": 3, "category_id": 7, "bbox": [20, 10, 30, 20],
                                "area": 600.0, "segmentation": rle, "iscrowd": 0})
    path = str(tmp_path / "rle.json")
    with open(path, "w") as f:
        json.dump(data, f)
    ds = COCODetection(path, image_dir, is_train=True, flip_prob=0.0)
    index = [r["image_id"] for r in ds.records].index(3)
    _, target = ds[(index, 0)]
    np.testing.assert_array_equal(target["masks"][0].numpy(), m)


def test_real_json_paths_find_their_images(data_root):
    """A dataset named by its json path, as a user types it: COCO's split folder, Penn-Fudan's PNGImages."""
    pf = os.path.join(data_root, "pennfudan", "annotations", "instances_train.json")
    assert get_dataset_paths(pf) == (pf, os.path.join(data_root, "pennfudan", "PNGImages"))
    coco = os.path.join(data_root, "coco_mini", "annotations", "instances_val2017.json")
    assert get_dataset_paths(coco)[1] == os.path.join(data_root, "coco_mini", "val2017")
