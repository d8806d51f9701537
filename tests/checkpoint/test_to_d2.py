import os
import pickle

import numpy as np
import pytest
import torch
import torchvision

from soco_d2.checkpoint.io import UnsafeCheckpointError, load_checkpoint_file
from soco_d2.checkpoint.layout import ConversionError
from soco_d2.checkpoint.to_d2 import convert_to_d2, save_d2_pkl
from soco_d2.checkpoint.validate import expected_backbone_shapes


class Args:
    """Stands for the argparse namespace many training scripts store in their checkpoints."""

    lr = 0.1


def test_unexpected_leftovers_refused_unless_allowed(small_soco_state):
    sd = dict(small_soco_state, **{"mystery.weight": torch.zeros(2)})
    with pytest.raises(ConversionError, match=r"mystery\.weight.*--allow-unmapped"):
        convert_to_d2(sd)
    d2, report = convert_to_d2(sd, allow_unmapped=True)
    assert report.unmapped == ["mystery.weight"] and "stem.conv1.weight" in d2


def test_bad_arguments():
    sd = torchvision.models.resnet18().state_dict()
    with pytest.raises(ConversionError, match="unknown parts"):
        convert_to_d2(sd, parts=["neck"])
    with pytest.raises(ConversionError, match="unknown branch"):
        convert_to_d2(sd, branch="teacher")
    with pytest.raises(ConversionError, match=r"no target-branch weights|not found in the target branch"):
        convert_to_d2(sd, parts=["backbone"], branch="target")


def test_foreign_pickles_and_unsafe_torch_files(tmp_path):
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": np.zeros(1)}, "x": os.system}, f)
    with pytest.raises(UnsafeCheckpointError, match=r"system"):
        convert_to_d2(tmp_path / "evil.pkl", parts=["backbone"])

    sd = torchvision.models.resnet18().state_dict()
    torch.save({"model": sd, "args": Args()}, tmp_path / "with_args.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"--trust-checkpoint"):
        convert_to_d2(tmp_path / "with_args.pth", parts=["backbone"])
    d2, _ = convert_to_d2(tmp_path / "with_args.pth", parts=["backbone"], trust=True)
    assert len(d2) == len(expected_backbone_shapes(18))


def test_save_d2_pkl_round_trip(small_soco_state, tmp_path):
    d2, _ = convert_to_d2(small_soco_state)
    save_d2_pkl(d2, tmp_path / "out" / "soco.pkl")
    assert os.listdir(tmp_path / "out") == ["soco.pkl"]  # no temp file left behind
    with open(tmp_path / "out" / "soco.pkl", "rb") as f:
        raw = pickle.load(f)
    assert raw["__author__"] == "soco_d2" and raw["matching_heuristics"] is True
    assert all(isinstance(v, np.ndarray) for v in raw["model"].values())
    again = load_checkpoint_file(tmp_path / "out" / "soco.pkl")  # the restricted unpickler reads it
    np.testing.assert_array_equal(again["box_head.fc1.weight"], d2["box_head.fc1.weight"])
    # and it converts again, as a detectron2-layout input, to the same weights
    d2_again, report = convert_to_d2(tmp_path / "out" / "soco.pkl")
    assert set(d2_again) == set(d2) and not report.dropped
    with pytest.raises(ConversionError, match=r"\.pkl"):
        save_d2_pkl(d2, tmp_path / "soco.pth")
