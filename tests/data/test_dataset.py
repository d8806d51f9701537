import os
import pickle

import cv2
import numpy as np
import pytest
import torch

from soco_d2.config import get_cfg
from soco_d2.data import dataset as dataset_module
from soco_d2.data.dataset import (
    PretrainDataset,
    build_pretrain_dataset,
    check_proposal_coverage,
    register_pretrain_dataset,
    same_picture_resized,
)
from soco_d2.data.image_list import list_images
from soco_d2.data.proposals import ProposalStore, write_proposals


class RecordingMapper:
    """Returns what it was given, plus one number drawn from the rng."""

    def __call__(self, image, proposals, rng):
        return {"image": image, "proposals": proposals, "draw": rng.random()}


def _write_images(folder, sizes):
    """PNG images named img<i>.png with a distinct flat colour each; returns their keys."""
    os.makedirs(folder, exist_ok=True)
    keys = []
    for i, (h, w) in enumerate(sizes):
        img = np.full((h, w, 3), 10 * i + 5, np.uint8)
        cv2.imwrite(os.path.join(folder, f"img{i}.png"), img)
        keys.append(f"img{i}.png")
    return keys


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    keys = _write_images(str(root), [(40, 60), (50, 30), (20, 20), (64, 48)])
    return root, keys


def _cfg(image_root, proposals="", max_missing=0.05, whole_image_boxes=True):
    cfg = get_cfg()
    cfg.DATASETS.PRETRAIN.WHOLE_IMAGE_BOXES = whole_image_boxes
    cfg.DATASETS.PRETRAIN.NAME = ""
    cfg.DATASETS.PRETRAIN.IMAGE_ROOT = str(image_root)
    cfg.DATASETS.PRETRAIN.PROPOSALS = str(proposals)
    cfg.DATASETS.PRETRAIN.MAX_MISSING_PROPOSALS = max_missing
    cfg.INPUT.SOCO.VIEW1_SIZE = cfg.INPUT.SOCO.VIEW2_SIZE = 32
    cfg.INPUT.SOCO.VIEW3_SIZE = 16
    return cfg


def test_proposals_and_whole_image_fallback(folder, tmp_path):
    root, keys = folder
    store_path = tmp_path / "props.bin"
    write_proposals(
        str(store_path),
        {
            keys[0]: (np.array([[5, 6, 30, 36], [0, 0, 60, 40]], np.float32), (40, 60)),
            keys[1]: (np.zeros((0, 4), np.float32), (50, 30)),  # empty list
            keys[3]: (np.array([[4, 8, 20, 30]], np.float32), (32, 24)),  # computed at half size
        },
    )
    ds = PretrainDataset(list_images(str(root)), ProposalStore.open(str(store_path)), RecordingMapper())
    np.testing.assert_array_equal(ds[(0, 1)]["proposals"], [[5, 6, 30, 36], [0, 0, 60, 40]])
    np.testing.assert_array_equal(ds[(1, 1)]["proposals"], [[0, 0, 30, 50]])  # empty -> whole image
    np.testing.assert_array_equal(ds[(2, 1)]["proposals"], [[0, 0, 20, 20]])  # missing -> whole image
    np.testing.assert_allclose(ds[(3, 1)]["proposals"], [[8, 16, 40, 60]])  # rescaled x2
    no_store = PretrainDataset(list_images(str(root)), None, RecordingMapper())
    np.testing.assert_array_equal(no_store[(0, 1)]["proposals"], [[0, 0, 60, 40]])
    assert no_store[(0, 1)]["proposals"].dtype == np.float32


def test_an_image_whose_aspect_ratio_changed_is_skipped_not_stretched(folder, tmp_path, soco_log):
    """img0 (40x60) was replaced after its proposals were computed on a 60x40 image: its boxes
    would be stretched onto another picture, so it is skipped like an unreadable image (counted,
    remembered, replaced by the next index) and summarised, not logged, per image. img3 read at
    twice the size its proposals were computed on is the same picture: rescaled boxes."""
    root, keys = folder
    store_path = tmp_path / "props.bin"
    write_proposals(str(store_path), {
        keys[0]: (np.array([[5, 6, 30, 36]], np.float32), (60, 40)),
        keys[3]: (np.array([[4, 8, 20, 30]], np.float32), (32, 24)),
    })
    store = ProposalStore.open(str(store_path))
    ds = PretrainDataset(list_images(str(root)), store, RecordingMapper())
    assert ds.size_change_summary() is None
    sample = ds[(0, 7)]
    assert sample["num_skipped"] == 1
    assert sample["image"][0, 0, 0] == 15  # img1, the next index, with its own (whole-image) box
    np.testing.assert_array_equal(sample["proposals"], [[0, 0, 30, 50]])
    assert sample["draw"] == np.random.default_rng([7, 1]).random()
    assert ds.unreadable_indices() == [0]
    assert not any("img0.png" in m for m in soco_log)  # no line per image
    summary = ds.size_change_summary()
    assert summary.startswith("1 image(s) no longer match their proposals")
    assert "img0.png" in summary and "60x40 (height x width)" in summary
    np.testing.assert_allclose(ds[(3, 1)]["proposals"], [[8, 16, 40, 60]])
    # Remembered from another process or a checkpoint as a skipped image: never read again.
    fresh = PretrainDataset(list_images(str(root)), store, RecordingMapper())
    fresh.mark_unreadable([0])
    assert fresh[(0, 7)]["draw"] == sample["draw"]


@pytest.mark.parametrize("stored, read, same", [
    ((375, 500), (188, 250), True),    # halved, one side rounded
    ((333, 500), (33, 50), True),      # a thumbnail: rounding dominates
    ((96, 96), (48, 48), True),
    ((3000, 4000), (3001, 4000), True),  # a pixel of a large image: within rounding
    ((3000, 4000), (3004, 4000), False),
    ((500, 375), (375, 500), False),   # rotated
    ((96, 96), (96, 64), False),
])
def test_same_picture_resized_allows_only_the_rounding_of_a_resize(stored, read, same):
    assert same_picture_resized(stored, read) is same
    assert same_picture_resized(read, stored) is same


def test_sample_is_a_function_of_index_and_seed(folder):
    root, _ = folder
    ds = PretrainDataset(list_images(str(root)), None, RecordingMapper())
    assert ds[(2, 7)]["draw"] == ds[(2, 7)]["draw"] == np.random.default_rng(7).random()
    assert ds[(2, 7)]["draw"] != ds[(2, 8)]["draw"]
    assert ds[3]["draw"] == np.random.default_rng(3).random()  # a plain index: seed = index
    assert ds[(1, 7)]["image"][0, 0, 0] == 15 and ds[(1, 7)]["num_skipped"] == 0


def test_unreadable_image_is_logged_counted_and_replaced(folder, soco_log):
    root, _ = folder
    (root / "img1.png").write_bytes(b"not an image at all")
    ds = PretrainDataset(list_images(str(root)), None, RecordingMapper())
    sample = ds[(1, 7)]
    assert sample["num_skipped"] == 1
    assert sample["image"][0, 0, 0] == 25  # img2, the next index
    assert any("img1.png" in m for m in soco_log)
    # Deterministic replacement with a seed derived from the sample's seed.
    assert sample["draw"] == ds[(1, 7)]["draw"] == np.random.default_rng([7, 1]).random()
    assert sample["draw"] != ds[(2, 7)]["draw"]


def test_many_consecutive_unreadable_images_raise(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(4):
        (root / f"x{i}.jpg").write_bytes(b"")
    ds = PretrainDataset(list_images(str(root)), None, RecordingMapper(), max_consecutive_failures=3)
    with pytest.raises(RuntimeError, match="image root .* is probably wrong"):
        ds[(0, 0)]


def test_build_with_folder_and_list_file_sources(folder, tmp_path):
    root, keys = folder
    ds = build_pretrain_dataset(_cfg(root))
    assert len(ds) == 4
    sample = ds[(0, 123)]
    assert tuple(sample["images"]["v1"].shape) == (3, 32, 32) and sample["num_skipped"] == 0
    assert sample["pairs"][0]["ids_a"].tolist() == [0] * 4  # one whole-image box per image

    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(f"images/{k}\t0" for k in keys[:2]) + "\n")
    ds = build_pretrain_dataset(_cfg(listing))
    assert len(ds) == 2 and ds.images.keys == [f"images/{k}" for k in keys[:2]]
    # Collates into a batch like the loader does.
    batch = torch.utils.data.default_collate([ds[(0, 1)], ds[(1, 2)]])
    assert batch["images"]["v2"].shape == (2, 3, 32, 32) and batch["num_skipped"].tolist() == [0, 0]


def test_missing_proposals_threshold(folder, tmp_path, soco_log):
    root, keys = folder
    store_path = tmp_path / "props.bin"
    boxes = np.array([[1, 1, 10, 10]], np.float32)
    entries = {keys[0]: (boxes, (40, 60)), keys[1]: (boxes[:0], (50, 30)), "other.png": (boxes, (9, 9))}
    write_proposals(str(store_path), entries)
    with pytest.raises(ValueError) as err:
        build_pretrain_dataset(_cfg(root, store_path, max_missing=0.3))
    msg = str(err.value)
    assert "2 of 4 images" in msg and str(store_path) in msg and str(root) in msg
    assert "generate_proposals" in msg
    ds = build_pretrain_dataset(_cfg(root, store_path, max_missing=0.5))
    text = "\n".join(soco_log)
    assert len(ds) == 4 and "2 of 4 images" in text and "1 of 4 images" in text
    store = ProposalStore.open(str(store_path))
    assert check_proposal_coverage(list_images(str(root)), store, 1.0) == (2, 1)


def test_no_proposals_file_is_refused_for_soco(folder, soco_log):
    root, _ = folder
    with pytest.raises(ValueError) as err:
        build_pretrain_dataset(_cfg(root, whole_image_boxes=False))
    msg = str(err.value)
    assert "DATASETS.PRETRAIN.PROPOSALS is empty" in msg and str(root) in msg
    assert "generate_proposals" in msg and "DATASETS.PRETRAIN.WHOLE_IMAGE_BOXES True" in msg


def test_whole_image_boxes_on_purpose_warns(folder, soco_log):
    root, keys = folder
    ds = build_pretrain_dataset(_cfg(root))
    assert len(ds) == len(keys)
    assert any("WHOLE_IMAGE_BOXES is True" in m for m in soco_log)


def test_no_proposals_warning_for_a_mapper_that_uses_none(folder, soco_log):
    root, _ = folder
    cfg = _cfg(root, whole_image_boxes=False)
    cfg.INPUT.MAPPER = "DetCoViewMapper"
    build_pretrain_dataset(cfg)
    assert soco_log and not any("PROPOSALS" in m for m in soco_log)


def test_named_datasets(folder, tmp_path, monkeypatch):
    cfg = _cfg("")
    cfg.DATASETS.PRETRAIN.NAME = "imagenet_train"
    monkeypatch.delenv("SOCO_DATASETS", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"SOCO_DATASETS is not set.*imagenet/train/<wnid>/<image>\.JPEG"):
        build_pretrain_dataset(cfg)
    _write_images(str(tmp_path / "datasets" / "imagenet" / "train" / "n0001"), [(20, 30), (30, 20)])
    ds = build_pretrain_dataset(cfg)  # the default ./datasets
    assert ds.images.keys == ["n0001/img0.png", "n0001/img1.png"]
    monkeypatch.setenv("SOCO_DATASETS", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        build_pretrain_dataset(cfg)
    monkeypatch.setenv("SOCO_DATASETS", str(tmp_path / "datasets"))

    cfg.DATASETS.PRETRAIN.NAME = "no_such_set"
    with pytest.raises(KeyError, match="imagenet_train"):
        build_pretrain_dataset(cfg)
    cfg.DATASETS.PRETRAIN.NAME = ""
    with pytest.raises(ValueError, match="IMAGE_ROOT"):
        build_pretrain_dataset(cfg)

    # A user-registered set with its default proposals, relative to $SOCO_DATASETS.
    monkeypatch.setattr(dataset_module, "_DATASETS", dict(dataset_module._DATASETS))
    root, keys = folder
    one_box = np.array([[1, 1, 9, 9]], np.float32)
    write_proposals(str(tmp_path / "datasets" / "mine.bin"), {k: (one_box, (20, 20)) for k in keys})
    register_pretrain_dataset("test_registered_set", str(root), proposals="mine.bin")
    cfg.DATASETS.PRETRAIN.NAME = "test_registered_set"
    ds = build_pretrain_dataset(cfg)
    assert ds.proposals is not None and len(ds.proposals) == 4
    with pytest.raises(KeyError, match="already registered"):
        register_pretrain_dataset("test_registered_set", str(root))


def test_dataset_pickles_small_and_works_after(folder, tmp_path):
    root, keys = folder
    store_path = tmp_path / "props.bin"
    many = np.array([[1, 1, 9, 9]] * 1000, np.float32)
    write_proposals(str(store_path), {k: (many, (20, 20)) for k in keys})
    ds = build_pretrain_dataset(_cfg(root, store_path))
    blob = pickle.dumps(ds)
    assert len(blob) < 20000  # the 4000 boxes stay in the memory-mapped file
    again = pickle.loads(blob)
    a, b = ds[(1, 5)], again[(1, 5)]
    assert torch.equal(a["images"]["v2"], b["images"]["v2"])


def test_real_images_through_the_soco_mapper(data_root):
    cfg = _cfg(os.path.join(data_root, "coco_mini", "train2017"))
    ds = build_pretrain_dataset(cfg)
    assert len(ds) == 80
    for i in range(3):
        sample = ds[(i, i)]
        assert sample["images"]["v1"].dtype == torch.uint8 and sample["num_skipped"] == 0
    # The same images listed by the COCO json.
    json_file = os.path.join(data_root, "coco_mini", "annotations", "instances_train2017.json")
    by_json = build_pretrain_dataset(_cfg(json_file))
    assert by_json.images.keys == ds.images.keys


def test_unreadable_image_is_remembered_logged_once_and_never_reread(folder, soco_log, monkeypatch):
    root, _ = folder
    (root / "img1.png").write_bytes(b"not an image at all")
    ds = PretrainDataset(list_images(str(root)), None, RecordingMapper())
    reads = []
    real_read = dataset_module.read_image
    monkeypatch.setattr(dataset_module, "read_image", lambda p, m: reads.append(p) or real_read(p, m))
    first = ds[(1, 7)]
    again = [ds[(1, s)] for s in range(3)]
    assert "\n".join(soco_log).count("img1.png") == 1
    assert sum(p.endswith("img1.png") for p in reads) == 1  # never retried
    assert ds.unreadable_indices() == [1]
    # The replacement (and the sample) is the same as when the file was read and failed.
    assert first["num_skipped"] == 1 and all(s["num_skipped"] == 1 for s in again)
    assert first["draw"] == np.random.default_rng([7, 1]).random()
    # Loader workers share the flags: a worker's discovery is seen by the main process. (A
    # spawned worker: a forked one can deadlock in OpenCV after the parent used its threads.)
    loader = torch.utils.data.DataLoader(
        PretrainDataset(list_images(str(root)), None, RecordingMapper()), batch_size=None,
        sampler=[(1, 0)], num_workers=1, multiprocessing_context="spawn")
    for _ in loader:
        pass
    assert loader.dataset.unreadable_indices() == [1]
    fresh = PretrainDataset(list_images(str(root)), None, RecordingMapper())
    fresh.mark_unreadable([1])
    reads.clear()
    assert fresh[(1, 7)]["draw"] == first["draw"] and reads == [str(root / "img2.png")]


def test_images_recorded_unreadable_in_the_proposals_are_left_out(folder, tmp_path, soco_log):
    root, keys = folder
    store_path = tmp_path / "props.bin"
    boxes = np.array([[1, 1, 10, 10]], np.float32)
    # 2 of 4 images unreadable at generation: they are not "missing proposals" (threshold 0).
    write_proposals(str(store_path), {keys[0]: (boxes, (40, 60)), keys[2]: (boxes, (20, 20))},
                    unreadable={keys[1]: "the file is empty", keys[3]: "corrupt"})
    ds = build_pretrain_dataset(_cfg(root, store_path, max_missing=0.0))
    log = "\n".join(soco_log)
    assert ds.images.keys == [keys[0], keys[2]]
    assert "2 of 4 images are recorded as unreadable" in log
    assert "img1.png" in log and "the file is empty" in log
    assert "no entry" not in log
    store = ProposalStore.open(str(store_path))
    assert check_proposal_coverage(list_images(str(root)), store, 1.0) == (0, 0)
