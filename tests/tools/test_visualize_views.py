import importlib.util
import os
import sys

import cv2

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "engine"))
import monitor_toy as mtoy  # noqa: E402

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
TOOL = os.path.join(REPO, "tools", "visualize_views.py")


def _main(*args):
    spec = importlib.util.spec_from_file_location("visualize_views_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


def test_sheets_for_soco_and_detco_configs(tmp_path, capsys):
    images = mtoy.make_labeled_folder(tmp_path / "img", per_class=1, size=96)
    out = tmp_path / "out"
    assert _main("--config-file", os.path.join(REPO, "configs/demo/soco_demo.yaml"), "--images", images,
                 "--random", 2, "--output-dir", out, "--panel-size", 96) == 0
    assert _main("--config-file", os.path.join(REPO, "configs/detco/detco_r50_200ep.yaml"),
                 "--images", images, "--num-images", 1, "--output-dir", out, "--panel-size", 96,
                 "INPUT.DETCO.GLOBAL_SIZE", 64, "INPUT.DETCO.LOCAL_CROP_SIZE", 96,
                 "INPUT.DETCO.PATCH_SIZE", 24) == 0
    written = capsys.readouterr().out.split()
    assert len(written) == 3
    assert sum("soco_views_" in p for p in written) == 2 and "detco_views_00_blue_000.png" in written[2]
    for p in written:
        assert cv2.imread(p) is not None


def test_bad_input(tmp_path, capsys):
    cfg = os.path.join(REPO, "configs/demo/soco_demo.yaml")
    assert _main("--config-file", cfg, "--images", tmp_path / "nope", "--output-dir", tmp_path) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _main("--config-file", cfg, "--output-dir", tmp_path, "INPUT.SOCO.NOPE", 1) == 2
    assert "NOPE" in capsys.readouterr().err
