"""Mutation testing of the core modules with mutmut: one module at a time, against its own tests.

For each module, a scratch copy of the project is made (the ``soco_d2`` package, ``configs/``, the
module's test files and the conftests above them, and a ``pyproject.toml`` holding the project's pytest options
plus a ``[tool.mutmut]`` section that mutates only that module and selects only those tests). mutmut
runs there, so the repository never gets a ``mutants/`` directory or mutmut state. The score is

    killed / total        (killed includes mutants whose tests ran out of time)

where "total" counts every mutant mutmut generated, including those in functions the selected tests
never call ("no tests"): both those and "survived" mutants are listed as survivors, each with its diff.

Not run by the test suite or CI (minutes per module on two cores). Needs ``pip install -e ".[dev]"``.

    python benchmarks/mutation_run.py                     # every module below
    python benchmarks/mutation_run.py losses schedules    # some of them
    python benchmarks/mutation_run.py --list

mutmut 3 replaces every function and method by a trampoline that dispatches to the mutated copy named
by the environment, so it mutates code inside functions only (not module-level constants or class
attributes), and each mutant is only run against the tests that called its function in the clean run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10 (mutmut 3 needs >= 3.10 and installs toml there)
    import toml as tomllib

REPO = Path(__file__).resolve().parents[1]

# module name -> (source file, test files that exercise it directly)
MODULES: dict[str, tuple[str, list[str]]] = {
    "soco_views": ("soco_d2/data/soco_views.py", ["tests/data/test_soco_views.py"]),
    "detco_views": ("soco_d2/data/detco_views.py", ["tests/data/test_detco_views.py"]),
    "boxes": ("soco_d2/data/boxes.py", ["tests/data/test_boxes.py"]),
    "augment": ("soco_d2/data/augment.py", ["tests/data/test_augment.py"]),
    "losses": ("soco_d2/modeling/losses.py", ["tests/modeling/test_losses.py"]),
    "pooler": ("soco_d2/modeling/pooler.py", ["tests/modeling/test_pooler.py"]),
    "heads": ("soco_d2/modeling/heads.py", ["tests/modeling/test_heads.py"]),
    "contrastive": ("soco_d2/modeling/contrastive.py", ["tests/modeling/test_contrastive.py"]),
    "ema": ("soco_d2/modeling/ema.py", ["tests/modeling/test_ema.py"]),
    "meta_arch.soco": ("soco_d2/modeling/meta_arch/soco.py", ["tests/modeling/meta_arch/test_soco.py"]),
    "meta_arch.detco": ("soco_d2/modeling/meta_arch/detco.py", ["tests/modeling/meta_arch/test_detco.py"]),
    "optimizer": ("soco_d2/engine/optimizer.py", ["tests/engine/test_optimizer.py"]),
    "schedules": ("soco_d2/engine/schedules.py", ["tests/engine/test_schedules.py"]),
}

# mutmut's exit-code classes (mutmut.stats.status_by_exit_code), reduced to what the score needs.
KILLED_CODES = {1, 3}
TIMEOUT_CODES = {36, -24, 24, 152, 255}
SURVIVED_CODES = {0}
NO_TESTS_CODES = {5, 33}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _pyproject_text(module_path: str, tests: list[str], timeout_multiplier: float) -> str:
    pytest_opts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    lines = ["[tool.pytest.ini_options]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in pytest_opts.items()]
    mutmut = {
        "source_paths": ["soco_d2"],
        "only_mutate": [module_path],
        "pytest_add_cli_args_test_selection": tests,
        "pytest_add_cli_args": ["-p", "no:cacheprovider"],
        "timeout_multiplier": timeout_multiplier,
        "use_git_change_detection": False,
        "also_copy": ["configs"],  # tests that read the shipped configs
    }
    lines += ["", "[tool.mutmut]"] + [f"{k} = {_toml_value(v)}" for k, v in mutmut.items()]
    return "\n".join(lines) + "\n"


def _make_scratch(root: Path, module_path: str, tests: list[str], timeout_multiplier: float) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "soco_d2", root / "soco_d2", ignore=ignore)
    shutil.copytree(REPO / "configs", root / "configs", ignore=ignore)
    for test in tests:
        src = REPO / test
        if not src.is_file():
            raise SystemExit(f"test file {test} (listed for {module_path} in MODULES) does not exist")
        (root / test).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, root / test)
        # conftests from tests/ down to the test's folder
        for parent in [Path(test).parents[i] for i in range(len(Path(test).parents) - 1)][::-1]:
            conftest = REPO / parent / "conftest.py"
            if conftest.is_file():
                shutil.copy2(conftest, root / parent / "conftest.py")
    (root / "pyproject.toml").write_text(_pyproject_text(module_path, tests, timeout_multiplier))


def _mutmut_exe() -> str:
    exe = Path(sys.executable).with_name("mutmut")
    if exe.is_file():
        return str(exe)
    found = shutil.which("mutmut")
    if not found:
        raise SystemExit('mutmut is not installed: pip install -e ".[dev]"')
    return found


def run_module(name: str, args) -> dict:
    module_path, tests = MODULES[name]
    root = Path(tempfile.mkdtemp(prefix=f"mutmut_{name}_", dir=args.work_dir))
    _make_scratch(root, module_path, tests, args.timeout_multiplier)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the scratch copy (put first on sys.path by mutmut) must be the one imported
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [_mutmut_exe(), "run", "--max-children", str(args.max_children)]
    if args.nice:
        cmd = ["nice", "-n", str(args.nice)] + cmd
    t0 = time.time()
    log_path = root / "mutmut_run.log"
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    elapsed = time.time() - t0
    meta_path = root / "mutants" / (module_path + ".meta")
    if proc.returncode != 0 or not meta_path.is_file():
        tail = log_path.read_text(errors="replace")[-4000:]
        raise SystemExit(f"mutmut failed on {module_path} (exit {proc.returncode}); log {log_path}:\n{tail}")
    codes = json.loads(meta_path.read_text())["exit_code_by_key"]
    counts = {"killed": 0, "timeout": 0, "survived": 0, "no tests": 0, "other": 0}
    survivors = []
    for key, code in sorted(codes.items()):
        if code in KILLED_CODES:
            counts["killed"] += 1
        elif code in TIMEOUT_CODES:
            counts["timeout"] += 1
        else:
            if code in SURVIVED_CODES:
                kind = status = "survived"
            elif code in NO_TESTS_CODES:
                kind = status = "no tests"
            else:
                kind, status = "other", f"exit {code}"
            counts[kind] += 1
            show = [_mutmut_exe(), "show", key]
            diff = subprocess.run(show, cwd=root, env=env, capture_output=True, text=True).stdout
            survivors.append({"mutant": key, "status": status, "diff": diff})
    total = len(codes)
    killed = counts["killed"] + counts["timeout"]
    result = {
        "module": module_path,
        "tests": tests,
        "total": total,
        "killed": killed,
        "score": killed / total if total else float("nan"),
        "counts": counts,
        "seconds": round(elapsed, 1),
        "survivors": survivors,
    }
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        result["scratch"] = str(root)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("modules", nargs="*", help=f"modules to mutate (default: all): {', '.join(MODULES)}")
    p.add_argument("--list", action="store_true", help="list the modules and their tests, then exit")
    p.add_argument("--max-children", type=int, default=1, help="mutants tested in parallel (default 1)")
    p.add_argument("--nice", type=int, default=10, help="niceness of the mutmut process (0: none)")
    p.add_argument(
        "--timeout-multiplier", type=float, default=5.0,
        help="a mutant times out (counted killed) after about 2x this many times its tests' clean time",
    )
    p.add_argument("--work-dir", default=None, help="where the scratch copies go (default: the temp dir)")
    p.add_argument("--keep", action="store_true",
                   help="keep the scratch copies (to rerun or inspect mutants)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    p.add_argument("--no-diffs", action="store_true", help="list survivors by name only")
    args = p.parse_args(argv)

    if args.list:
        for name, (path, tests) in MODULES.items():
            print(f"{name:16s} {path:40s} {' '.join(tests)}")
        return 0
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        p.error(f"unknown module(s) {unknown}; valid: {', '.join(MODULES)}")
    names = args.modules or list(MODULES)

    results = []
    for name in names:
        print(f"== {name}: mutating {MODULES[name][0]} against {' '.join(MODULES[name][1])}", flush=True)
        res = run_module(name, args)
        results.append(res)
        c = res["counts"]
        print(
            f"   {res['killed']}/{res['total']} killed ({100 * res['score']:.1f}%): "
            f"{c['killed']} failed a test, {c['timeout']} timed out, {c['survived']} survived, "
            f"{c['no tests']} not reached by the tests, {c['other']} other; {res['seconds']} s",
            flush=True,
        )
        for s in res["survivors"]:
            print(f"   survivor [{s['status']}] {s['mutant']}")
            if not args.no_diffs:
                print("\n".join("      " + line for line in s["diff"].splitlines() if line.strip()))

    print("\nmodule                                   killed / total   score")
    for res in results:
        print(f"{res['module']:40s} {res['killed']:6d} / {res['total']:<6d} {100 * res['score']:6.1f}%")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
