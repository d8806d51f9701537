"""Every command-line tool runs the soco_d2 of its own checkout, whatever else is installed."""
import glob
import os
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TOOLS = sorted(glob.glob(os.path.join(REPO, "tools", "*.py")))


def test_every_tool_is_listed():
    assert len(TOOLS) >= 8 and any(t.endswith("generate_proposals.py") for t in TOOLS)


@pytest.mark.parametrize("tool", TOOLS, ids=os.path.basename)
def test_tool_imports_the_package_beside_it(tool, tmp_path):
    # A decoy soco_d2 first on the path (as another installed copy would be) must not be imported.
    decoy = tmp_path / "soco_d2"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('the decoy soco_d2 was imported')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, tool, "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "decoy" not in out.stderr and "usage" in out.stdout.lower()
