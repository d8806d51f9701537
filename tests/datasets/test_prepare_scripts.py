"""datasets/prepare_imagenet.py and datasets/prepare_coco_json.py on generated images."""
import importlib.util
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from soco_d2.data.image_list import list_images
from soco_d2.data.proposals import ProposalStore
from soco_d2.data.synthetic import make_synthetic_coco
from soco_d2.finetune.coco_data import get_dataset_paths

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "datasets", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _imagenet(root, classes=("n01", "n02"), per_class=2):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / "imagenet" / "train" / c)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(
                root / "imagenet" / "train" / c / f"{c}_{i}.JPEG")


def test_prepare_imagenet_writes_a_list_and_matching_proposals(tmp_path, capsys):
    _imagenet(tmp_path)
    tool = _script("prepare_imagenet")
    assert tool.main(["--root", str(tmp_path), "--proposals", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 images in 2 class folders" in out and "warning: ImageNet-1k train has 1000" in out
    list_file = tmp_path / "imagenet" / "train.txt"
    assert list_file.read_text().splitlines() == [
        "train/n01/n01_0.JPEG", "train/n01/n01_1.JPEG", "train/n02/n02_0.JPEG", "train/n02/n02_1.JPEG"]
    images = list_images(str(list_file))
    store = ProposalStore(str(tmp_path / "imagenet" / "train.socoprop"))
    assert sorted(store.keys) == images.keys  # the proposals file goes with the list
    # a second run resumes: nothing is recomputed
    assert tool.main(["--root", str(tmp_path), "--proposals", "--workers", "1"]) == 0
    assert "0 images computed, 4 already there" in capsys.readouterr().out


def test_prepare_imagenet_names_the_missing_folder(tmp_path, capsys):
    assert _script("prepare_imagenet").main(["--root", str(tmp_path)]) == 1
    assert "imagenet/train/<wnid>/<image>.JPEG" in capsys.readouterr().err


def test_prepare_coco_json_checks_counts_and_links(tmp_path, capsys, monkeypatch):
    json_file, image_dir = make_synthetic_coco(str(tmp_path / "src"), num_images=3, image_size=48, seed=1)
    moved = tmp_path / "images"
    os.rename(image_dir, moved)  # images elsewhere than next to the json
    tool = _script("prepare_coco_json")
    assert tool.main([json_file]) == 1  # default image root no longer holds them
    assert "error:" in capsys.readouterr().err
    monkeypatch.setenv("SOCO_DATASETS", str(tmp_path / "datasets"))
    assert tool.main([json_file, "--image-root", str(moved), "--link", "mydata"]) == 0
    out = capsys.readouterr().out
    assert "3 images under" in out and "categories: 1:" in out
    link = tmp_path / "datasets" / "mydata" / "annotations" / "instances_train.json"
    assert link.is_symlink()
    # the json path now finds its images by itself (both backends resolve names this way)
    json_path, root = get_dataset_paths(str(link))
    assert os.path.realpath(root) == os.path.realpath(moved)
    assert len(list_images(json_path, image_root=root).keys) == 3
    # linking again is harmless; a clash is refused
    assert tool.main([json_file, "--image-root", str(moved), "--link", "mydata"]) == 0
    other = tmp_path / "other"
    shutil.copytree(moved, other)
    assert tool.main([json_file, "--image-root", str(other), "--link", "mydata"]) == 1
    assert "mydata" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_pack_imagenet_both_ways_lists_the_folder_keys(tmp_path, capsys, fmt):
    _imagenet(tmp_path, per_class=3)
    folder = tmp_path / "imagenet" / "train"
    tool = _script("pack_imagenet")
    if fmt == "zip":
        out, source = tmp_path / "train.zip", tmp_path / "train.zip"
    else:
        out, source = tmp_path / "shards" / "train", str(tmp_path / "shards" / "train-*.tar")
    assert tool.main(["--format", fmt, "--images-per-shard", "4", str(folder), str(out)]) == 0
    assert "6 images" in capsys.readouterr().out
    assert list_images(source).keys == list_images(folder).keys
    if fmt == "tar":
        assert sorted(os.listdir(tmp_path / "shards")) == [
            "train-000000.tar", "train-000000.tar.index.json", "train-000001.tar",
            "train-000001.tar.index.json"]
    else:
        os.remove(tmp_path / "train_map.txt")
        assert tool.main(["--write-map", str(out)]) == 0
        assert (tmp_path / "train_map.txt").read_text().splitlines()[0] == "n01/n01_0.JPEG\t0"
    with pytest.raises(SystemExit):
        tool.main(["--format", "zip", str(folder), str(tmp_path / "x.tar")])
