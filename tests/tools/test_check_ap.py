import importlib.util
import json
import os
import subprocess
import sys

import pytest

from soco_d2.evaluation.reported_ap import REPORTED

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "check_ap.py")
REF = "soco_fpn_100ep_mask_rcnn_1x"


def _main(*args):
    spec = importlib.util.spec_from_file_location("check_ap_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


def _run_dir(tmp_path, metrics):
    lines = [{"iteration": 89999, "total_loss": 0.4, "lr": 0.0002}, {"iteration": 90000, **metrics}]
    (tmp_path / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return tmp_path


def test_pass(tmp_path, capsys):
    measured = {k: v + 0.1 for k, v in REPORTED[REF].metrics.items()}
    measured["bbox/AP"] = REPORTED[REF].metrics["bbox/AP"] - 0.2
    assert _main(_run_dir(tmp_path, measured), "--reference", REF) == 0
    out = capsys.readouterr().out
    assert "evaluation at iteration 90000" in out
    assert "bbox/AP         42.3     42.10   -0.20  pass" in out
    assert "PASS" in out


def test_fail_beyond_tolerance(tmp_path, capsys):
    measured = dict(REPORTED[REF].metrics)
    measured["segm/AP"] = 37.0  # 0.6 below 37.6
    assert _main(_run_dir(tmp_path, measured), "--reference", REF) == 1
    assert "segm/AP         37.6     37.00   -0.60  FAIL" in capsys.readouterr().out
    # a wider tolerance accepts it
    assert _main(tmp_path, "--reference", REF, "--tolerance", "0.7") == 0


def test_missing_metric_fails(tmp_path, capsys):
    measured = {"bbox/AP": 50.0, "bbox/AP50": 70.0, "bbox/AP75": 55.0}  # a box-only evaluation
    assert _main(_run_dir(tmp_path, measured), "--reference", REF) == 1
    out = capsys.readouterr().out
    missing = [line.split()[0] for line in out.splitlines() if " missing " in line and line.endswith("FAIL")]
    assert missing == ["segm/AP", "segm/AP50", "segm/AP75"]


def test_input_errors(tmp_path, capsys):
    assert _main(tmp_path, "--reference", REF) == 2
    assert "metrics file not found" in capsys.readouterr().err
    (tmp_path / "metrics.json").write_text(json.dumps({"iteration": 10, "total_loss": 1.0}) + "\n")
    assert _main(tmp_path, "--reference", REF) == 2
    assert "no evaluation results" in capsys.readouterr().err
    assert _main(tmp_path, "--reference", "soco_fpn_9000ep") == 2
    err = capsys.readouterr().err
    assert "unknown reference 'soco_fpn_9000ep'" in err and "detco_200ep_retinanet_1x" in err
    assert _main(tmp_path) == 2


def test_list(capsys):
    assert _main("--list") == 0
    out = capsys.readouterr().out
    assert all(name in out for name in REPORTED)


@pytest.mark.slow
def test_cli_subprocess(tmp_path):
    measured = dict(REPORTED["detco_200ep_retinanet_1x"].metrics)
    measured["bbox/AP"] -= 1.0
    run = subprocess.run([sys.executable, TOOL, str(_run_dir(tmp_path, measured)),
                          "--reference", "detco_200ep_retinanet_1x"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "FAIL" in run.stdout


def test_prints_where_the_weights_and_code_came_from(tmp_path, capsys):
    import hashlib

    run = _run_dir(tmp_path, dict(REPORTED[REF].metrics))
    pretrained = tmp_path / "soco.pkl"
    pretrained.write_bytes(b"p" * 1000)
    (run / "config.yaml").write_text(f"MODEL:\n  WEIGHTS: {pretrained}\nSEED: 0\n")
    (run / "model_final.pth").write_bytes(b"f" * 2000)
    (run / "last_checkpoint").write_text("model_final.pth")
    (run / "env.json").write_text(json.dumps({"soco_d2": {"version": "0.1.0", "commit": "abc123", "dirty": True}}))
    assert _main(run, "--reference", REF) == 0
    out = capsys.readouterr().out
    sha = hashlib.sha256(b"p" * 1000).hexdigest()[:12]
    assert f"pretrained weights (MODEL.WEIGHTS): {pretrained} (0.0 MB, modified " in out
    assert f"sha256 {sha})" in out
    assert f"evaluated checkpoint: {run / 'model_final.pth'} (" in out
    assert "code: soco_d2 0.1.0 at git abc123 (dirty)" in out


def _with_test_sets(run_dir, test_sets):
    (run_dir / "config.yaml").write_text("DATASETS:\n  TEST:\n" + "".join(f"  - {t}\n" for t in test_sets))
    return run_dir


def test_a_run_on_another_test_set_is_not_compared(tmp_path, capsys):
    run = _with_test_sets(_run_dir(tmp_path, dict(REPORTED[REF].metrics)), ["demo_val:/x/val.json:/x/val"])
    assert _main(run, "--reference", REF) == 2
    err = capsys.readouterr().err
    assert "demo_val:/x/val.json:/x/val" in err and "coco_2017_val" in err and "--any-test-set" in err
    assert _main(run, "--reference", REF, "--any-test-set") == 0


def test_a_run_on_coco_val_is_compared(tmp_path, capsys):
    run = _with_test_sets(_run_dir(tmp_path, dict(REPORTED[REF].metrics)), ["coco_2017_val"])
    assert _main(run, "--reference", REF) == 0
    assert "PASS" in capsys.readouterr().out
