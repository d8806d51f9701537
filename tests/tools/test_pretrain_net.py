import importlib.util
import os

import pytest

from soco_d2.config import ConfigError

# The module, not the function of the same name that soco_d2.engine re-exports.
launch_module = importlib.import_module("soco_d2.engine.launch")

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "pretrain_net.py")


@pytest.fixture
def tool():
    spec = importlib.util.spec_from_file_location("pretrain_net_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_parses_and_launches(tool, monkeypatch):
    calls = []
    monkeypatch.setattr(launch_module, "launch", lambda *a, **k: calls.append((a, k)))
    tool.cli(["--num-gpus", "2", "--resume", "MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "64",
              "OUTPUT_DIR", "out/p"])
    (args, kwargs), = calls
    assert args[0] is tool.main and args[1] == 2
    assert kwargs["backend"] == "gloo" and kwargs["dist_url"] == "auto"
    assert kwargs["num_machines"] == 1 and kwargs["machine_rank"] == 0
    (parsed,) = kwargs["args"]
    assert parsed.resume and parsed.opts == ["MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "64",
                                             "OUTPUT_DIR", "out/p"]


def test_cli_rejects_bad_overrides_before_launching(tool, monkeypatch):
    monkeypatch.setattr(launch_module, "launch", lambda *a, **k: pytest.fail("launched"))
    with pytest.raises(ConfigError, match="SOLVER.NO_SUCH_KEY"):
        tool.cli(["SOLVER.NO_SUCH_KEY", "1"])
    with pytest.raises(SystemExit):
        tool.cli(["--eval-only"])


def test_help_offers_no_eval_only(tool, capsys):
    with pytest.raises(SystemExit):
        tool.cli(["--help"])
    out = capsys.readouterr().out
    assert "--resume" in out and "--eval-only" not in out


def test_main_builds_resumes_and_trains(tool, monkeypatch):
    import soco_d2.engine.trainer as trainer_mod

    events = []

    class FakeTrainer:
        def __init__(self, cfg):
            events.append(("init", cfg.SOLVER.IMS_PER_BATCH, cfg.is_frozen()))

        def resume_or_load(self, resume):
            events.append(("resume", resume))

        def train(self):
            events.append(("train",))

    monkeypatch.setattr(trainer_mod, "PretrainTrainer", FakeTrainer)
    args = tool.default_argument_parser().parse_args(["--resume", "SOLVER.IMS_PER_BATCH", "32"])
    tool.main(args)
    assert events == [("init", 32, True), ("resume", True), ("train",)]


@pytest.mark.parametrize("opts, needed, not_needed", [
    ([], ["MODEL.DEVICE cpu", "SOLVER.AMP.ENABLED False"], []),  # the recipe: fp16 on a GPU
    (["SOLVER.AMP.DTYPE", "bfloat16"], ["MODEL.DEVICE cpu"], ["SOLVER.AMP.ENABLED"]),
])
def test_a_gpu_config_on_a_cpu_machine_names_every_key_at_once(tool, monkeypatch, opts, needed, not_needed):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(launch_module, "launch", lambda *a, **k: pytest.fail("launched"))
    with pytest.raises(ConfigError) as err:
        tool.cli(["--config-file", os.path.join(os.path.dirname(TOOL), "..", "configs", "soco",
                                                "soco_fpn_r50_100ep.yaml")] + opts)
    msg = str(err.value)
    assert all(k in msg for k in needed) and not any(k in msg for k in not_needed)
    assert "configs/benchmark/soco_r18_learning_cpu.yaml" in msg
