"""soco_d2 works without detectron2: only ``soco_d2.detectron2`` may import it."""
import os
import subprocess
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))

# A stand-in ``detectron2`` package first on the path: any import of it, guarded or not, would
# succeed and leave it in sys.modules, whether or not the real one is installed.
SCRIPT = """
import sys
import soco_d2, soco_d2.config, soco_d2.data, soco_d2.modeling, soco_d2.checkpoint
import soco_d2.engine, soco_d2.evaluation, soco_d2.finetune, soco_d2.utils
loaded = sorted(m for m in sys.modules if m == "detectron2" or m.startswith("detectron2."))
print(loaded)
sys.exit(1 if loaded else 0)
"""


def test_package_never_imports_detectron2(tmp_path):
    fake = tmp_path / "detectron2"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]))
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_adapter_without_detectron2_names_the_fix(tmp_path):
    # A path entry that hides any installed detectron2: importing it fails as on a machine without it.
    blocker = tmp_path / "detectron2.py"
    blocker.write_text("raise ImportError('No module named detectron2')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]))
    result = subprocess.run(
        [sys.executable, "-c", "import soco_d2.detectron2"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "docs/DETECTRON2.md" in result.stderr and "--no-build-isolation" in result.stderr
