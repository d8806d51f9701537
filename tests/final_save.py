"""The one final-save rule of the training loop, checked through each trainer (imported by path
from tests/engine/test_train_loop.py and tests/finetune/test_trainer.py)."""
import os
import shutil

import torch


def check_final_save_rule(run, tmp_path):
    """``run(output_dir, max_iter, resume)`` trains a trainer with ``SOLVER.CHECKPOINT_PERIOD 1``
    and returns it. A run whose last checkpoint is a periodic one at ``MAX_ITER`` writes
    ``model_final.pth`` (that state) on resuming; a finished run resumed again keeps its file."""
    a, b = tmp_path / "a", tmp_path / "b"
    run(a, 3, False)
    b.mkdir()
    shutil.copy(a / "model_0000002.pth", b / "model_0000002.pth")
    (b / "last_checkpoint").write_text("model_0000002.pth")
    trainer = run(b, 2, True)
    assert trainer.start_iter == trainer.max_iter == 2
    final = torch.load(b / "model_final.pth", weights_only=True)
    periodic = torch.load(b / "model_0000002.pth", weights_only=True)
    assert final["iteration"] == 2
    for k, v in periodic["model"].items():
        assert torch.equal(final["model"][k], v), k
    before = os.path.getmtime(b / "model_final.pth")
    run(b, 2, True)
    assert os.path.getmtime(b / "model_final.pth") == before
