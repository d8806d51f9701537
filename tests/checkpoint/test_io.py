import os
import pickle

import numpy as np
import pytest
import torch

from soco_d2.checkpoint.io import (
    CheckpointError,
    UnsafeCheckpointError,
    load_checkpoint_file,
    read_checkpoint_object,
    unwrap_state_dict,
)


class Custom:
    """A class that has no business inside a weights file."""


def _dump(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pkl_with_numpy_arrays_loads(tmp_path, protocol):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    obj = {"model": {"stem.conv1.weight": w, "n": np.array(3, dtype=np.int64)}, "__author__": "x",
           "matching_heuristics": True, "extra": [1, 2.0, (3,), {"s"}]}
    path = _dump(tmp_path / "w.pkl", obj, protocol)
    state = load_checkpoint_file(path)
    assert list(state) == ["stem.conv1.weight", "n"]
    np.testing.assert_array_equal(state["stem.conv1.weight"], w)
    assert state["n"].dtype == np.int64 and state["n"] == 3
    raw = read_checkpoint_object(path)
    assert raw["__author__"] == "x" and raw["extra"][3] == {"s"}


def test_pkl_refuses_os_system(tmp_path):
    # pickle stores a reference to os.system; the restricted unpickler must not resolve it
    path = _dump(tmp_path / "evil.pkl", {"model": {"x": np.zeros(1)}, "hook": os.system})
    with pytest.raises(UnsafeCheckpointError, match=r"'(posix|nt|os)\.system'.*trust"):
        load_checkpoint_file(path)


def test_pkl_refuses_custom_class(tmp_path):
    path = _dump(tmp_path / "custom.pkl", {"model": {"x": np.zeros(1)}, "obj": Custom()})
    with pytest.raises(UnsafeCheckpointError, match=r"Custom"):
        load_checkpoint_file(path)


def test_pkl_refuses_reduce_gadget(tmp_path):
    class Gadget:
        def __reduce__(self):
            return (getattr, ("text", "upper"))

    path = _dump(tmp_path / "gadget.pkl", {"model": {"x": np.zeros(1)}, "g": Gadget()})
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.getattr"):
        load_checkpoint_file(path)


def test_pkl_trusted_loads_custom_objects(tmp_path):
    path = _dump(tmp_path / "custom.pkl", {"model": {"x": np.ones(2)}, "obj": [1]})
    assert np.array_equal(load_checkpoint_file(path, trust=True)["x"], np.ones(2))


def test_pth_weights_only(tmp_path):
    sd = {"a.weight": torch.randn(2, 3), "a.num_batches_tracked": torch.tensor(5)}
    torch.save({"model": sd, "optimizer": {"state": {}}, "iteration": 7}, tmp_path / "ckpt.pth")
    state = load_checkpoint_file(tmp_path / "ckpt.pth")
    assert torch.equal(state["a.weight"], sd["a.weight"]) and int(state["a.num_batches_tracked"]) == 5


def test_pth_with_objects_refused_without_trust(tmp_path):
    torch.save({"model": {"a": torch.ones(1)}, "obj": Custom()}, tmp_path / "obj.pth")
    with pytest.raises(UnsafeCheckpointError) as e:
        load_checkpoint_file(tmp_path / "obj.pth")
    msg = str(e.value)
    assert "obj.pth" in msg and "Custom" in msg and "--trust-checkpoint" in msg
    # trusted: loads
    assert torch.equal(load_checkpoint_file(tmp_path / "obj.pth", trust=True)["a"], torch.ones(1))


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint_file(tmp_path / "nope.pth")


def test_corrupt_files(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth"):
        load_checkpoint_file(tmp_path / "bad.pth")
    (tmp_path / "bad.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="bad.pkl"):
        load_checkpoint_file(tmp_path / "bad.pkl")


def test_torch_zip_named_pkl_is_read_by_torch(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "zip.pkl")
    assert torch.equal(load_checkpoint_file(tmp_path / "zip.pkl")["w"], torch.ones(2))


def test_unwrap_order_and_errors():
    w = torch.zeros(1)
    assert list(unwrap_state_dict({"x": w})) == ["x"]
    assert list(unwrap_state_dict({"state_dict": {"y": w}, "meta": {}})) == ["y"]
    assert list(unwrap_state_dict({"model_ema": {"z": w}, "epoch": 3})) == ["z"]
    assert list(unwrap_state_dict({"model": {"m": w}, "model_ema": {"e": w}})) == ["m"]
    assert list(unwrap_state_dict({"model": {"m": w}, "model_ema": {"e": w}}, key="model_ema")) == ["e"]
    with pytest.raises(CheckpointError, match="top-level keys"):
        unwrap_state_dict({"weights": {"a": w}, "epoch": 1})
    with pytest.raises(CheckpointError, match="'bad'"):
        unwrap_state_dict({"model": {"a": w, "bad": "text"}})
    with pytest.raises(CheckpointError, match="expected a dict"):
        unwrap_state_dict([w])
