import os
import random

import numpy as np
import pytest
import torch
from torch import nn

import soco_d2.engine.checkpoint as ckpt_mod
from soco_d2.engine.checkpoint import (
    Checkpointer,
    CheckpointMismatchError,
    get_rng_state,
    list_periodic_checkpoints,
    set_rng_state,
)


class Net(nn.Module):
    def __init__(self, queue=4):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)
        self.register_buffer("queue", torch.zeros(queue))


def _checkpointer(tmp_path, queue=4, max_to_keep=0):
    torch.manual_seed(0)
    model = Net(queue)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    opt.step()
    return Checkpointer(model, str(tmp_path), opt, torch.amp.GradScaler("cpu", enabled=False),
                        max_to_keep=max_to_keep)


def test_save_load_roundtrip_with_weights_only(tmp_path):
    c = _checkpointer(tmp_path)
    path = c.save("model_0000005.pth", 5, config="SEED: 1\n", extra_count=3)
    assert open(tmp_path / "last_checkpoint").read() == "model_0000005.pth"
    data = torch.load(path, map_location="cpu", weights_only=True)  # plain containers only
    assert data["iteration"] == 5 and data["config"] == "SEED: 1\n" and data["world_size"] == 1
    assert set(data) >= {"model", "optimizer", "scaler", "rng_states"}

    fresh = _checkpointer(tmp_path / "other")
    with torch.no_grad():
        for p in fresh.model.parameters():
            p.zero_()
    fresh.optimizer.state.clear()
    rest = fresh.resume_or_load("", resume=False)
    assert rest == {}
    fresh.output_dir = str(tmp_path)
    rest = fresh.resume_or_load("", resume=True)
    assert rest["iteration"] == 5 and rest["extra_count"] == 3
    for k, v in c.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[k], v)
    buf = fresh.optimizer.state[fresh.model.fc.weight]["momentum_buffer"]
    assert torch.equal(buf, torch.ones(2, 3))


def test_rng_states_restore():
    state = get_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_crash_during_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    c = _checkpointer(tmp_path)
    good = c.save("model_0000002.pth", 2)
    good_bytes = open(good, "rb").read()

    def crashing_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        c.save("model_0000002.pth", 4)  # overwrite attempt of the same file
    with pytest.raises(OSError, match="disk full"):
        c.save("model_0000004.pth", 4)
    monkeypatch.undo()
    assert open(good, "rb").read() == good_bytes
    assert open(tmp_path / "last_checkpoint").read() == "model_0000002.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000002.pth"]  # no temp files
    assert c.resume_or_load("", resume=True)["iteration"] == 2


def test_mismatched_model_is_a_clear_error(tmp_path):
    _checkpointer(tmp_path, queue=4).save("model_final.pth", 9)
    other = _checkpointer(tmp_path, queue=16)
    with pytest.raises(CheckpointMismatchError) as e:
        other.resume_or_load("", resume=True)
    msg = str(e.value)
    assert "queue: checkpoint (4,) vs model (16,)" in msg and "model_final.pth" in msg


def test_keeps_only_the_newest_periodic_checkpoints(tmp_path):
    c = _checkpointer(tmp_path, max_to_keep=2)
    for it in (1, 2, 3, 4):
        c.save(f"model_{it:07d}.pth", it)
    c.save("model_final.pth", 5)
    names = [os.path.basename(p) for p in list_periodic_checkpoints(str(tmp_path))]
    assert names == ["model_0000003.pth", "model_0000004.pth"]
    assert (tmp_path / "model_final.pth").exists()
    assert c.last_checkpoint().endswith("model_final.pth")


def test_dangling_last_checkpoint(tmp_path):
    c = _checkpointer(tmp_path)
    (tmp_path / "last_checkpoint").write_text("model_0000100.pth")
    with pytest.raises(FileNotFoundError, match="model_0000100.pth"):
        c.resume_or_load("", resume=True)


def test_checkpoint_of_another_config_names_the_differing_keys(tmp_path):
    saved = "MODEL:\n  QUEUE_SIZE: 4\n  DEPTH: 18\nOUTPUT_DIR: a\nSEED: 0\n"
    writer = _checkpointer(tmp_path, queue=4)
    writer.config = saved
    writer.save("model_final.pth", 9)
    other = _checkpointer(tmp_path, queue=16)
    other.config = "MODEL:\n  QUEUE_SIZE: 16\n  DEPTH: 18\nOUTPUT_DIR: b\nSEED: 0\n"
    with pytest.raises(CheckpointMismatchError) as e:
        other.resume_or_load("", resume=True)
    msg = str(e.value)
    assert "queue: checkpoint (4,) vs model (16,)" in msg
    assert "MODEL.QUEUE_SIZE: checkpoint 4 vs config 16" in msg
    differing = msg.split("keys that differ:")[1].split("Resume with")[0]
    assert differing.strip() == "MODEL.QUEUE_SIZE: checkpoint 4 vs config 16"


def test_partial_files_of_a_killed_write_are_removed(tmp_path):
    (tmp_path / ".model_0000004.pth.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".last_checkpoint.x1.tmp").write_bytes(b"")
    (tmp_path / "notes.tmp").write_bytes(b"keep")
    _checkpointer(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["notes.tmp"]
