import importlib.util
import logging
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from soco_d2.data.proposals import ProposalStore
from soco_d2.data.selective_search import _process_one

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "generate_proposals.py")


def _tool():
    spec = importlib.util.spec_from_file_location("generate_proposals_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main(*args):
    """In-process run (a subprocess costs seconds of imports on a loaded 2-core machine)."""
    return _tool().main([str(a) for a in args])


def _run(*args):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True, timeout=120)


def _images(folder):
    rng = np.random.default_rng(0)
    for i in range(4):
        a = (rng.random((80, 120, 3)) * 30 + 90).astype(np.uint8)
        a[10:60, 15 + 5 * i : 80 + 5 * i] = (40 * i, 200, 60)
        (folder / f"cls{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(folder / f"cls{i % 2}" / f"{i}.jpg", quality=95)
    (folder / "cls0" / "bad.jpg").write_bytes(b"not a jpeg")


def test_generate_shard_merge_resume(tmp_path):
    _images(tmp_path / "img")
    full = tmp_path / "full.socoprop"
    r = _run("--images", tmp_path / "img", "--output", full, "--workers", 2, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "cls0/bad.jpg" in r.stderr  # unreadable image logged with its path
    assert "images done: 4" in r.stderr and "unreadable images skipped: 1" in r.stderr
    assert "images/s" in r.stderr and "boxes per image: mean" in r.stderr
    assert "Environment:" in r.stderr and "torchvision" in r.stderr  # the run's setup on record
    store = ProposalStore.open(full)
    assert store.keys == ["cls0/0.jpg", "cls0/2.jpg", "cls1/1.jpg", "cls1/3.jpg"]
    assert store.image_size("cls1/3.jpg") == (80, 120)
    assert store.metadata["max_size"] == 128 and store.metadata["mode"] == "fast"

    for i in range(2):
        assert _main("--images", tmp_path / "img", "--output", tmp_path / f"s{i}.socoprop", "--shard", f"{i}/2",
                     "--workers", 1, "--no-progress") == 0
    r = _run("--merge", tmp_path / "merged.socoprop", tmp_path / "s0.socoprop", tmp_path / "s1.socoprop")
    assert r.returncode == 0, r.stderr
    assert "4 images" in r.stderr
    assert (tmp_path / "merged.socoprop").read_bytes() == full.read_bytes()


def test_resume_and_usage_errors(tmp_path, caplog, capsys):
    _images(tmp_path / "img")
    out = tmp_path / "p.socoprop"
    with caplog.at_level(logging.INFO):
        assert _main("--images", tmp_path / "img", "--output", out, "--workers", 1, "--no-progress") == 0
        with pytest.raises(FileExistsError, match="--resume"):
            _main("--images", tmp_path / "img", "--output", out, "--no-progress")
        caplog.clear()
        assert _main("--images", tmp_path / "img", "--output", out, "--resume", "--no-progress") == 0
    # 4 images with boxes and 1 recorded as unreadable: none is read again.
    assert "images done: 0" in caplog.text and "5 already done" in caplog.text

    for args, message in [
        (["--images", tmp_path, "--output", out, "--shard", "2/2"], "0 <= I < N"),
        (["--images", tmp_path, "--output", out, "--shard", "x"], "expected I/N"),
        (["--output", out], "--images and --output are required"),
        (["--merge", out], "at least one SHARD"),
        (["--images", tmp_path, "--output", out, "--mode", "slow"], "invalid choice"),
    ]:
        with pytest.raises(SystemExit) as info:
            _main(*args)
        assert info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="missing"):
        _main("--images", tmp_path / "missing", "--output", out)
    with pytest.raises(SystemExit):
        _main("--help")
    assert "--merge OUTPUT SHARD" in capsys.readouterr().out


_MAIN_PID = os.getpid()
_SIGNAL_AT = "cls0/0.jpg"


def _signalling_process_one(task):
    """The worker body, sending SIGTERM to the main process when it reaches ``_SIGNAL_AT``."""
    result = _process_one(task)
    if task[0] == _SIGNAL_AT:
        os.kill(_MAIN_PID, signal.SIGTERM)
    return result


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_keeps_the_finished_images_and_resume_completes(tmp_path, monkeypatch, workers):
    import soco_d2.data.selective_search as ss

    from soco_d2.engine.preemption import PREEMPTED_EXIT_CODE, Preempted

    _images(tmp_path / "img")
    for i in range(4, 10):  # more images, so that the signal comes before the end
        Image.fromarray(np.full((60, 90, 3), 20 * i, np.uint8)).save(tmp_path / "img" / f"x{i}.png")
    ref = tmp_path / "ref.socoprop"
    assert _main("--images", tmp_path / "img", "--output", ref, "--workers", 1, "--no-progress") == 0

    out = tmp_path / "p.socoprop"
    args = ("--images", tmp_path / "img", "--output", out, "--workers", workers, "--chunk-size", 1,
            "--no-progress")
    monkeypatch.setattr(ss, "_process_one", _signalling_process_one)
    with pytest.raises(Preempted) as stop:
        _main(*args)
    monkeypatch.undo()
    assert stop.value.code == PREEMPTED_EXIT_CODE == 75
    assert not out.exists()
    chunks = os.listdir(str(out) + ".parts")
    assert 1 <= len(chunks) < 11  # what was finished is kept, and it stopped early
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler restored
    assert _main(*args, "--resume") == 0
    assert out.read_bytes() == ref.read_bytes()


def test_opencv_without_ximgproc_refused_at_start_with_the_fix(tmp_path, monkeypatch, capsys):
    import types

    import cv2

    import soco_d2.data.selective_search as ss

    plain = types.SimpleNamespace(__version__=cv2.__version__, __file__="site-packages/cv2/__init__.py")
    monkeypatch.setattr(ss, "cv2", plain)  # a plain opencv-python shadowing the contrib build
    _images(tmp_path / "imgs")
    with pytest.raises(SystemExit):
        _main("--images", tmp_path / "imgs", "--output", tmp_path / "p.socoprop", "--no-progress")
    err = capsys.readouterr().err
    assert "cv2.ximgproc" in err
    assert "pip uninstall" in err and "opencv-python" in err
    assert "pip install opencv-contrib-python-headless" in err
    assert not (tmp_path / "p.socoprop").exists()
    with pytest.raises(RuntimeError, match="cv2.ximgproc"):  # the library entry point too
        ss.run_generation(ss.ImageList(str(tmp_path), ["x.jpg"]), str(tmp_path / "q.socoprop"))


sys.path.insert(0, os.path.dirname(__file__))
from faults import run_bounded, worker_fault_env  # noqa: E402


@pytest.mark.parametrize("fault", ["TypeError", "SIGKILL"])
def test_a_failing_or_killed_pool_worker_ends_the_run_with_its_cause(tmp_path, fault):
    """Any exception escaping a pool worker, or a worker killed (the out-of-memory killer),
    ends the tool at once with exit code 1 and the cause, instead of waiting forever for the
    result that never comes."""
    _images(tmp_path / "img")
    env = worker_fault_env(tmp_path, "soco_d2.data.selective_search:read_image_reduced", fault,
                           where="pool")
    run = run_bounded([sys.executable, TOOL, "--images", str(tmp_path / "img"), "--output",
                       str(tmp_path / "p.socoprop"), "--workers", "2", "--no-progress"],
                      timeout=120, env=env)
    assert run.returncode == 1, run.stderr[-3000:]
    if fault == "SIGKILL":
        assert "A proposal worker process died" in run.stderr and "--workers" in run.stderr
    else:
        assert "TypeError: fault injected in a worker" in run.stderr


def _generate_proposals(workers):
    def command(images, out):
        return [sys.executable, TOOL, "--images", str(images), "--output", str(out / "p.socoprop"),
                "--workers", str(workers), "--no-progress"]

    def check(run, out):
        assert "images done: 4" in run.stderr and "unreadable images skipped: 1" in run.stderr
        assert ProposalStore.open(out / "p.socoprop").keys == [
            "cls0/0.jpg", "cls0/2.jpg", "cls1/1.jpg", "cls1/3.jpg"]
    return command, check


def _pretrain_detco():
    """DetCo pretraining lists the folder itself (no proposals file): a tiny CPU run."""
    def command(images, out):
        return [sys.executable, os.path.join(REPO, "tools", "pretrain_net.py"), "--config-file",
                os.path.join(REPO, "configs", "detco", "detco_r50_200ep.yaml"),
                "DATASETS.PRETRAIN.NAME", "", "DATASETS.PRETRAIN.IMAGE_ROOT", str(images),
                "OUTPUT_DIR", str(out / "run"), "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18",
                "MODEL.DETCO.QUEUE_SIZE", "4", "MODEL.DETCO.HEAD_HIDDEN_DIM", "16",
                "MODEL.DETCO.FEATURE_DIM", "8", "INPUT.DETCO.GLOBAL_SIZE", "32",
                "INPUT.DETCO.LOCAL_CROP_SIZE", "96", "INPUT.DETCO.PATCH_SIZE", "24",
                "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3", "SOLVER.AMP.ENABLED", "False",
                "DATALOADER.NUM_WORKERS", "1", "CHANNELS_LAST", "False", "LOG_PERIOD", "1"]

    def check(run, out):
        log = run.stdout + run.stderr
        # The four real images and the bad one are listed (each once); the pipe never opened.
        assert "Pretraining images: 5 from" in log
        assert "Skipping unreadable image" in log and "cls0/bad.jpg" in log
        assert os.path.isfile(out / "run" / "model_final.pth")
    return command, check


@pytest.mark.parametrize("tool", [
    pytest.param(lambda: _generate_proposals(1), id="generate_proposals-1_worker"),
    pytest.param(lambda: _generate_proposals(2), id="generate_proposals-2_workers"),
    pytest.param(_pretrain_detco, id="pretrain_net-detco"),
])
def test_special_files_and_link_loops_are_never_read_nor_multiplied(tmp_path, tool):
    """A named pipe with an image name (opening it would wait forever), a broken link, a link
    to a listed file and a folder link back to the root (a loop): each tool that lists an image
    folder reads each real image once, never opens the pipe, and says what it skipped."""
    command, check = tool()
    _images(tmp_path / "img")
    os.mkfifo(tmp_path / "img" / "cls1" / "pipe.jpg")
    os.symlink(tmp_path / "img", tmp_path / "img" / "cls0" / "loop")
    os.symlink(tmp_path / "img" / "cls0" / "0.jpg", tmp_path / "img" / "cls1" / "same.jpg")
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "img" / "cls1" / "broken.jpg")
    (tmp_path / "img" / "notes.txt").write_text("x")
    run = run_bounded(command(tmp_path / "img", tmp_path), timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in (run.stdout + run.stderr).splitlines() if "entries skipped" in x)
    assert "5 entries skipped" in line
    assert "1 a named pipe (FIFO) (not a regular file, never opened)" in line
    assert "1 broken link(s)" in line
    assert "1 folder(s) reached again through a link" in line
    assert "1 file(s) listed already under another name" in line
    assert "1 with another extension: .txt (1)" in line
    check(run, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1],
                         ids=lambda s: signal.Signals(s).name)
def test_a_signal_to_the_whole_process_group_stops_saves_and_resumes_exactly(tmp_path, sig):
    """What `timeout`, SLURM or Ctrl-C do: every process of the group, pool workers included,
    gets the signal, at a random moment. The tool saves what is finished and exits with 75
    (a pool worker killed under a lock of the task queue made it wait forever), and --resume
    ends with the same file as an uninterrupted run."""
    import random
    import time

    _images(tmp_path / "img")
    for i in range(4, 16):
        Image.fromarray(np.full((60, 90, 3), 15 * i, np.uint8)).save(tmp_path / "img" / f"x{i}.png")
    ref = tmp_path / "ref.socoprop"
    assert _main("--images", tmp_path / "img", "--output", ref, "--workers", 1, "--no-progress") == 0

    out = tmp_path / "p.socoprop"
    cmd = [sys.executable, TOOL, "--images", str(tmp_path / "img"), "--output", str(out),
           "--workers", "2", "--chunk-size", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    parts, wanted = str(out) + ".parts", random.Random().randint(0, 3)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(parts) and len(os.listdir(parts)) >= wanted:
            break
        time.sleep(0.02)
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    try:
        text, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{signal.Signals(sig).name} to the group: the tool hung\n{proc.communicate()[0]}")
    if proc.returncode == 0:  # the run was already finishing: nothing to resume
        assert out.read_bytes() == ref.read_bytes()
        return
    assert proc.returncode == 75, text[-3000:]
    assert f"{signal.Signals(sig).name} received: stopped" in text and "--resume" in text
    run = run_bounded(cmd + ["--resume"], timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert out.read_bytes() == ref.read_bytes()


def test_a_stuck_pool_worker_ends_the_run_with_every_stack(tmp_path):
    _images(tmp_path / "img")
    env = worker_fault_env(tmp_path, "soco_d2.data.selective_search:read_image_reduced", "HANG",
                           where="pool")
    run = run_bounded([sys.executable, TOOL, "--images", str(tmp_path / "img"), "--output",
                       str(tmp_path / "p.socoprop"), "--workers", "2", "--no-progress",
                       "--watchdog-timeout", "5"], timeout=120, env=env)
    assert run.returncode == 3, run.stderr[-3000:]
    assert "No progress for" in run.stderr and "--watchdog-timeout" in run.stderr
    assert "in _faulty" in run.stderr and "Current thread" in run.stderr
