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


# Every detectron2 path of the tools, with detectron2 hidden: each fails before any work starts
# (no process launched, no output written) with the install instructions.
TOOLS_SCRIPT = """
import importlib, importlib.util, os, sys
sys.path.insert(0, os.path.join(REPO, "tools"))

def tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

launch = importlib.import_module("soco_d2.engine.launch")
launch.launch = lambda *a, **k: sys.exit("launched")
from soco_d2.config import load_config
from soco_d2.modeling import build_model
pretrain = os.path.join(REPO, "configs", "detectron2", "pretrain")
finetune = os.path.join(REPO, "configs", "detectron2", "mask_rcnn_R50_FPN_1x.yaml")
calls = {
    "build_model": lambda: build_model(load_config(os.path.join(pretrain, "detco_r50_200ep.yaml"))),
    "pretrain_net": lambda: tool("pretrain_net").cli(["--config-file", os.path.join(pretrain, "soco_fpn_r50_100ep.yaml"), "OUTPUT_DIR", OUT]),
    "train_net auto": lambda: tool("train_net").cli(["--config-file", finetune, "OUTPUT_DIR", OUT]),
    "train_net --backend": lambda: tool("train_net").cli(["--backend", "detectron2", "OUTPUT_DIR", OUT]),
}
for name, call in calls.items():
    try:
        call()
    except ImportError as e:
        assert "docs/DETECTRON2.md" in str(e), (name, e)
        print("ok", name)
    else:
        sys.exit(name + " did not fail")
assert not os.path.exists(OUT), os.listdir(OUT)
"""


def test_every_detectron2_path_fails_at_once_without_it(tmp_path):
    blocker = tmp_path / "detectron2.py"
    blocker.write_text("raise ImportError('No module named detectron2')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]))
    script = f"REPO = {REPO!r}\nOUT = {str(tmp_path / 'out')!r}\n" + TOOLS_SCRIPT
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split("\n").count("ok train_net auto") == 1 and result.stdout.count("ok ") == 4


def _core_and_adapter_imports():
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from import_graph import imports_of, package_modules

    for module, is_package, path in package_modules():
        yield module, path, imports_of(module, is_package, path)


def test_no_core_module_imports_the_adapter():
    # Static (ast, lazy imports inside functions too): the core builds the detectron2-module
    # models through the builder the adapter registers when it is imported.
    core = {m: deps for m, _, deps in _core_and_adapter_imports() if not m.startswith("soco_d2.detectron2")}
    assert len(core) > 50
    assert {m: sorted(d) for m, d in core.items()
            if any(x == "soco_d2.detectron2" or x.startswith("soco_d2.detectron2.") for x in d)} == {}


def test_the_adapter_imports_no_private_core_name():
    import ast

    private = []
    for module, path, _ in _core_and_adapter_imports():
        if not module.startswith("soco_d2.detectron2"):
            continue
        with open(path) as f:
            for node in ast.walk(ast.parse(f.read())):
                if (isinstance(node, ast.ImportFrom) and not node.level and node.module.startswith("soco_d2.")
                        and not node.module.startswith("soco_d2.detectron2")):
                    private += [f"{module}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []


def test_build_model_without_the_adapter_names_the_import(tmp_path):
    # detectron2-module configs need `import soco_d2.detectron2` (which registers the builder).
    env = dict(os.environ, PYTHONPATH=REPO)
    script = ("from soco_d2.config import load_config\nfrom soco_d2.modeling import build_model\n"
              f"build_model(load_config({os.path.join(REPO, 'configs/detectron2/pretrain/detco_r50_200ep.yaml')!r}))")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "import soco_d2.detectron2" in result.stderr and "docs/DETECTRON2.md" in result.stderr
