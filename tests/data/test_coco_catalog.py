import os

import pytest

from soco_d2.data import coco_catalog, dataset
from soco_d2.data.coco_catalog import datasets_root, get_dataset_paths
from soco_d2.finetune import coco_data


@pytest.mark.parametrize("value, root", [(None, "datasets"), ("", "datasets"), ("/data/sets", "/data/sets")])
def test_one_datasets_root_for_pretraining_and_detection(monkeypatch, value, root):
    # An empty $SOCO_DATASETS is taken as unset, for the pretraining names and the COCO catalog alike.
    if value is None:
        monkeypatch.delenv("SOCO_DATASETS", raising=False)
    else:
        monkeypatch.setenv("SOCO_DATASETS", value)
    assert datasets_root() == root
    assert dataset.datasets_root is coco_catalog.datasets_root
    assert get_dataset_paths("coco_2017_val") == (os.path.join(root, "coco/annotations/instances_val2017.json"),
                                                  os.path.join(root, "coco/val2017"))


def test_finetune_reexports_the_catalog():
    assert coco_data.get_dataset_paths is get_dataset_paths
    assert coco_data.load_coco_json is coco_catalog.load_coco_json
    assert coco_data.register_coco_instances is coco_catalog.register_coco_instances
