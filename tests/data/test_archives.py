import json
import logging
import multiprocessing
import os
import pickle
import tarfile
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from soco_d2.data import archives
from soco_d2.data.archives import (
    ArchiveChangedError,
    TarImageList,
    ZipImageList,
    write_tar_shards,
    write_zip,
    write_zip_map_of,
)
from soco_d2.data.dataset import PretrainDataset
from soco_d2.data.image_list import list_images, read_image, read_image_reduced
from soco_d2.data.proposals import ProposalStore
from soco_d2.data.selective_search import run_generation


def make_imagenet_folder(root, per_class=3, classes=("n01", "n02"), size=(40, 56)):
    """A small ImageNet-layout folder of distinct JPEGs; returns its path."""
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            a[8:30, 10:40] = (40 * i, 200, 60)
            Image.fromarray(a).save(os.path.join(root, c, f"{c}_{i}.JPEG"), quality=90)
    return str(root)


@pytest.fixture
def packed(tmp_path):
    """(folder, zip, tar pattern) holding the same six images; tar in shards of 4."""
    folder = make_imagenet_folder(tmp_path / "train")
    images = list_images(folder)
    zip_path = str(tmp_path / "zip" / "train.zip")
    write_zip(images, zip_path)
    write_tar_shards(images, str(tmp_path / "tar" / "train"), images_per_shard=4)
    return folder, zip_path, str(tmp_path / "tar" / "train-*.tar")


def test_zip_and_tar_list_and_read_the_same_images_as_the_folder(packed):
    folder, zip_path, pattern = packed
    ref = list_images(folder)
    for source, kind in ((zip_path, ZipImageList), (pattern, TarImageList)):
        images = list_images(source)
        assert isinstance(images, kind)
        assert images.keys == ref.keys == ["n01/n01_0.JPEG", "n01/n01_1.JPEG", "n01/n01_2.JPEG",
                                           "n02/n02_0.JPEG", "n02/n02_1.JPEG", "n02/n02_2.JPEG"]
        for i in range(len(ref)):
            np.testing.assert_array_equal(read_image(images.source(i)), read_image(ref.path(i)))
            got, hw = read_image_reduced(images.source(i), 10)
            want, want_hw = read_image_reduced(ref.path(i), 10)
            assert hw == want_hw == (40, 56)
            np.testing.assert_array_equal(got, want)
        assert images.path(0).endswith("@/n01/n01_0.JPEG")  # the official ZipReader notation
        # picklable (DataLoader workers, the proposal pool) and the same after
        again = pickle.loads(pickle.dumps(images.subset(images.keys[2:])))
        assert type(again) is kind and again.keys == ref.keys[2:]
        np.testing.assert_array_equal(read_image(again.source(0)), read_image(ref.path(2)))
    assert len(list_images(os.path.join(os.path.dirname(pattern), "train-000001.tar"))) == 2


def test_zip_map_file_is_the_official_layout(packed, tmp_path):
    _, zip_path, _ = packed
    lines = open(zip_path[:-4] + "_map.txt").read().splitlines()
    assert lines[0] == "n01/n01_0.JPEG\t0" and lines[-1] == "n02/n02_2.JPEG\t1"
    with zipfile.ZipFile(zip_path) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    # "name label" lines with a space, and plain names, are accepted too
    with open(zip_path[:-4] + "_map.txt", "w") as f:
        f.write("n01/n01_0.JPEG 0\n# comment\n\nn02/n02_1.JPEG\n")
    assert list_images(zip_path).keys == ["n01/n01_0.JPEG", "n02/n02_1.JPEG"]


def test_tar_shards_are_in_the_webdataset_layout(packed):
    _, _, pattern = packed
    shard = pattern.replace("*", "000000")
    with tarfile.open(shard) as tf:
        names = tf.getnames()
        assert names[:2] == ["n01/n01_0.JPEG", "n01/n01_0.cls"]
        assert tf.extractfile("n01/n01_0.cls").read() == b"0\n"
    index = json.load(open(shard + ".index.json"))
    assert [m[0] for m in index["members"]] == ["n01/n01_0.JPEG", "n01/n01_1.JPEG",
                                                "n01/n01_2.JPEG", "n02/n02_0.JPEG"]
    assert index["size"] == os.path.getsize(shard)


def test_zip_without_map_and_map_naming_a_missing_member(packed):
    _, zip_path, _ = packed
    map_path = zip_path[:-4] + "_map.txt"
    os.remove(map_path)
    with pytest.raises(FileNotFoundError) as e:
        list_images(zip_path)
    assert map_path in str(e.value) and "--write-map" in str(e.value)
    assert write_zip_map_of(zip_path) == map_path  # the fix the message names
    assert len(list_images(zip_path)) == 6
    with open(map_path, "a") as f:
        f.write("n03/gone.JPEG\t2\n")
    with pytest.raises(FileNotFoundError) as e:
        list_images(zip_path)
    assert "'n03/gone.JPEG'" in str(e.value) and zip_path in str(e.value)
    assert "1 of the 7 members" in str(e.value)


@pytest.mark.parametrize("cut", ["in_member_data", "at_a_header"])
def test_truncated_tar_shard_is_a_clear_error_naming_shard_and_member(packed, cut):
    _, _, pattern = packed
    shard = pattern.replace("*", "000001")
    data = open(shard, "rb").read()
    os.remove(shard + ".index.json")
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    if cut == "in_member_data":  # half of the last image's bytes
        end = members[-2].offset_data + members[-2].size // 2
    else:  # exactly before the header of the last member: only the end marker is missing
        end = members[-1].offset
    open(shard, "wb").write(data[:end])
    with pytest.raises(ValueError) as e:
        list_images(pattern)
    msg = str(e.value)
    assert shard in msg and "truncated or corrupt" in msg and "n02/n02_" in msg


def test_stale_index_is_rebuilt_and_a_shard_changed_during_a_run_is_an_error(packed, tmp_path, caplog):
    folder, _, pattern = packed
    images = list_images(pattern)
    shard = pattern.replace("*", "000000")
    before = json.load(open(shard + ".index.json"))
    # re-pack the first shard with other images: same name, new size and time
    other = list_images(make_imagenet_folder(tmp_path / "other", per_class=1, classes=("n09",)))
    time.sleep(0.01)
    write_tar_shards(other, str(tmp_path / "repack" / "x"), images_per_shard=4)
    os.replace(str(tmp_path / "repack" / "x-000000.tar"), shard)
    # the list made before the change refuses to read with the stale offsets
    with pytest.raises(ArchiveChangedError, match="changed after it was indexed"):
        read_image(images.source(0))
    with caplog.at_level(logging.WARNING, logger="soco_d2.data.archives"):
        again = list_images(pattern)
    assert "is stale" in caplog.text and shard in caplog.text
    assert "n09/n09_0.JPEG" in again.keys and "n01/n01_0.JPEG" not in again.keys
    assert json.load(open(shard + ".index.json"))["size"] != before["size"]


def test_unreadable_member_follows_the_file_contract(tmp_path, soco_log):
    folder = make_imagenet_folder(tmp_path / "train")
    with open(os.path.join(folder, "n01", "n01_1.JPEG"), "wb") as f:
        f.write(b"not an image")
    images = list_images(folder)
    zip_path = str(tmp_path / "train.zip")
    write_zip(images, zip_path)
    write_tar_shards(images, str(tmp_path / "s"), images_per_shard=10)
    for source in (zip_path, str(tmp_path / "s-000000.tar")):
        soco_log.clear()
        ds = PretrainDataset(list_images(source), None, lambda image, boxes, rng: {"image": image})
        sample = ds[(1, 3)]
        assert sample["num_skipped"] == 1
        np.testing.assert_array_equal(sample["image"], read_image(images.path(2)))
        assert ds.unreadable_indices() == [1]
        bad = [m for m in soco_log if "Skipping unreadable image" in m]
        assert len(bad) == 1 and f"{source}@/n01/n01_1.JPEG" in bad[0]
        ds[(1, 4)]
        assert len([m for m in soco_log if "Skipping unreadable image" in m]) == 1  # logged once


def _read_in_child(images):
    from soco_d2.data import archives as a

    before = dict(a._zip_handles)
    read_image(images.source(0))
    pid, _ = a._zip_handles[images.root]
    return os.getpid(), pid, images.root in before


def test_one_zip_handle_per_process_opened_lazily_after_fork(packed):
    _, zip_path, _ = packed
    archives._zip_handles.pop(os.path.abspath(zip_path), None)
    images = list_images(zip_path)
    assert images.root not in archives._zip_handles  # listing keeps no handle
    read_image(images.source(1))
    handle = archives._zip_handles[images.root][1]
    read_image(images.source(2))
    assert archives._zip_handles[images.root][1] is handle  # one handle, reused
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child, handle_pid, inherited = pool.apply(_read_in_child, (images,))
    assert inherited and child != os.getpid() and handle_pid == child  # its own, not the parent's


def test_proposals_of_an_archive_are_keyed_by_member_name_as_the_folder(packed, tmp_path):
    folder, zip_path, pattern = packed
    outputs = {}
    for name, source in (("folder", folder), ("zip", zip_path), ("tar", pattern)):
        outputs[name] = str(tmp_path / f"{name}.socoprop")
        run_generation(list_images(source), outputs[name], workers=2 if name == "tar" else 1,
                       progress=False)
    ref = ProposalStore.open(outputs["folder"])
    assert ref.keys == list_images(folder).keys
    for name in ("zip", "tar"):
        store = ProposalStore.open(outputs[name])
        assert store.keys == ref.keys
        for k in ref.keys:
            np.testing.assert_array_equal(store.get(k), ref.get(k))


# ------------------------------------------------------------------------------------------------
# Pretraining from archives: the same weights as from the folder, exact resume
# ------------------------------------------------------------------------------------------------


def _register_toy_mapper():
    import cv2
    import torch

    from soco_d2.data.registry import MAPPER_REGISTRY

    if "ArchiveToyMapper" in MAPPER_REGISTRY:
        return

    @MAPPER_REGISTRY.register()
    class ArchiveToyMapper:
        """An 8x8 crop of one proposal drawn from the rng (the data path of a SoCo sample)."""

        def __init__(self, cfg):
            pass

        def __call__(self, image, proposals, rng):
            x1, y1, x2, y2 = proposals[rng.integers(len(proposals))].astype(int)
            crop = image[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)]
            small = cv2.resize(crop, (8, 8), interpolation=cv2.INTER_AREA)
            return {"image": torch.from_numpy(np.ascontiguousarray(small.transpose(2, 0, 1)))}


def _pretrain(source, props, out, fail_at_call=None, resume=False, workers=2):
    import sys

    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "engine"))
    import toy_pretrain as toy

    from soco_d2.engine.trainer import PretrainTrainer

    _register_toy_mapper()
    cfg = toy.toy_cfg(out, **{"DATALOADER.NUM_WORKERS": workers, "INPUT.MAPPER": "ArchiveToyMapper",
                              "DATASETS.PRETRAIN.IMAGE_ROOT": source,
                              "DATASETS.PRETRAIN.PROPOSALS": props})
    torch.manual_seed(0)
    model = toy.EngineToyNet(cfg)
    model.fail_at_call = fail_at_call
    trainer = PretrainTrainer(cfg, model=model)
    trainer.resume_or_load(resume)
    trainer.train()
    return torch.load(os.path.join(out, "model_final.pth"), weights_only=True)


@pytest.mark.slow
def test_pretraining_from_zip_and_tar_gives_the_folder_weights_and_resumes_exactly(packed, tmp_path):
    import torch

    folder, zip_path, pattern = packed
    props = str(tmp_path / "props.socoprop")
    run_generation(list_images(folder), props, workers=1, progress=False)
    ref = _pretrain(folder, props, str(tmp_path / "folder"))
    for name, source in (("zip", zip_path), ("tar", pattern)):
        got = _pretrain(source, props, str(tmp_path / name))
        for k, v in ref["model"].items():
            assert torch.equal(v, got["model"][k]), (name, k)
        out = str(tmp_path / f"{name}_resumed")
        with pytest.raises(RuntimeError, match="simulated crash"):
            _pretrain(source, props, out, fail_at_call=4)  # after the checkpoint at iteration 3
        assert open(os.path.join(out, "last_checkpoint")).read() == "model_0000003.pth"
        resumed = _pretrain(source, props, out, resume=True)
        assert resumed["iteration"] == ref["iteration"] == 6
        for k, v in ref["model"].items():
            assert torch.equal(v, resumed["model"][k]), (name, "resumed", k)
