"""SoCo pretraining end to end: proposals file -> every shipped SoCo config -> checkpoint -> resume."""
import glob
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from soco_d2.config import load_config
from soco_d2.data.image_list import list_images
from soco_d2.data.selective_search import run_generation
from soco_d2.data.synthetic import make_synthetic_coco

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOCO_CONFIGS = sorted(
    f for f in glob.glob(os.path.join(REPO, "configs", "soco", "*.yaml"))
    if not os.path.basename(f).startswith("Base")
)


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory):
    """Six synthetic images and their selective-search proposals file."""
    root = tmp_path_factory.mktemp("soco_data")
    _, image_dir = make_synthetic_coco(str(root), num_images=6, image_size=96, seed=0)
    props = str(root / "props.socoprop")
    run_generation(list_images(image_dir), props, workers=1, progress=False)
    return image_dir, props


def tiny_overrides(image_dir, props, out, star=False):
    """Small sizes for a CPU run; everything else stays as the config says."""
    views = ["INPUT.SOCO.VIEW1_SIZE", "64", "INPUT.SOCO.VIEW2_SIZE", "64",
             "INPUT.SOCO.VIEW3_SIZE", "48" if star else "32"]
    if star:
        views += ["INPUT.SOCO.VIEW4_SIZE", "32"]
    return views + [
        "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18",
        "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.CONV_DIM", "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.SOCO.PROJECTOR_HIDDEN_DIM", "64",
        "MODEL.SOCO.PROJECTOR_OUT_DIM", "32", "MODEL.SOCO.PREDICTOR_HIDDEN_DIM", "64",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.AMP.ENABLED", "False",
        "DATALOADER.NUM_WORKERS", "0", "CHANNELS_LAST", "False", "LOG_PERIOD", "1",
        "DATASETS.PRETRAIN.IMAGE_ROOT", image_dir, "DATASETS.PRETRAIN.PROPOSALS", props,
        "OUTPUT_DIR", out,
    ]


def read_metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("config", SOCO_CONFIGS, ids=os.path.basename)
def test_shipped_soco_config_runs_two_iterations(config, unlabeled, tmp_path):
    import soco_d2.data  # noqa: F401  (registers the view mappers)
    import soco_d2.modeling  # noqa: F401  (registers the meta-architectures)
    from soco_d2.engine.trainer import PretrainTrainer

    star = "star" in os.path.basename(config)
    out = str(tmp_path / "out")
    cfg = load_config(config, tiny_overrides(*unlabeled, out, star=star))
    trainer = PretrainTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    rows = read_metrics(out)
    assert [r["iteration"] for r in rows] == [1, 2]
    expected = {"loss_v1_v2", "loss_v1_v3"} | ({"loss_v1_v4"} if star else set())
    assert expected <= set(rows[-1])
    assert all(math.isfinite(r["total_loss"]) for r in rows)
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    assert os.path.isfile(os.path.join(out, "config.yaml"))


def test_cli_trains_then_resumes_with_a_longer_schedule(unlabeled, tmp_path):
    out = str(tmp_path / "cli")
    tool = os.path.join(REPO, "tools", "pretrain_net.py")
    base = [sys.executable, tool, "--config-file", SOCO_CONFIGS[0], "--num-gpus", "1"]
    overrides = tiny_overrides(*unlabeled, out)
    subprocess.run(base + overrides, check=True, capture_output=True, text=True, timeout=300)
    assert [r["iteration"] for r in read_metrics(out)] == [1, 2]

    longer = overrides + ["SOLVER.MAX_ITER", "3", "SOLVER.WEIGHT_DECAY", "0.001",
                          "LOG_PERIOD", "2"]
    run = subprocess.run(base + ["--resume"] + longer, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert "Continuing at iteration 2 of 3" in log
    assert [r["iteration"] for r in read_metrics(out)] == [1, 2, 3]
    # Every changed key is listed, with what it changes, and the new weight decay is used
    # (the optimizer state loaded from the checkpoint used to bring back the old one).
    assert "differs from the one it was written with in 3 key(s)" in log
    training, bookkeeping = log.split("2 change(s) the training itself")[1].split(
        "1 change(s) only logging")
    assert "SOLVER.MAX_ITER: 2 -> 3" in training and "SOLVER.WEIGHT_DECAY: 1e-05 -> 0.001" in training
    assert "LOG_PERIOD: 1 -> 2" in bookkeeping
    import torch

    final = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)
    assert {g["weight_decay"] for g in final["optimizer"]["param_groups"]} <= {0.001, 0.0}
    assert 0.001 in {g["weight_decay"] for g in final["optimizer"]["param_groups"]}


# ------------------------------------------------------------------------------------------------
# Hostile images, SIGKILL and SIGTERM through the real command lines
# ------------------------------------------------------------------------------------------------

sys.path.insert(0, os.path.join(REPO, "tests", "data"))
from hostile_images import make_hostile_folder  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from faults import run_and_signal, run_bounded, worker_fault_env  # noqa: E402


def _cli(out, image_dir, props, *extra):
    overrides = tiny_overrides(image_dir, props, out) + [
        "DATALOADER.NUM_WORKERS", "2", "SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "2",
        "SEED", "5", *extra]
    tool = os.path.join(REPO, "tools", "pretrain_net.py")
    return [sys.executable, tool, "--config-file", SOCO_CONFIGS[0]], overrides


def _final_weights(out):
    import torch

    return torch.load(os.path.join(out, "model_final.pth"), weights_only=True)["model"]


@pytest.mark.slow
def test_cli_hostile_images_sigkill_and_sigterm_then_resume_match_an_uninterrupted_run(tmp_path):
    """Both tools run to completion on a folder of good and hostile files, each bad file counted
    once; SIGKILL at a random step, then SIGTERM, each followed by --resume, give bit-identical
    final weights to an uninterrupted run (SoCo R18, 2 loader workers)."""
    import torch

    image_dir = tmp_path / "images"
    good, bad = make_hostile_folder(image_dir)
    props = str(tmp_path / "props.socoprop")
    gen = subprocess.run([sys.executable, os.path.join(REPO, "tools", "generate_proposals.py"),
                          "--images", str(image_dir), "--output", props, "--workers", "1",
                          "--no-progress"], capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert f"images done: {len(good)}" in gen.stderr
    assert f"unreadable images skipped: {len(bad)}" in gen.stderr
    for name in bad:
        assert gen.stderr.count(f"skipping unreadable image {name}:") == 1, name
    # A good file that goes bad after the proposals were made: found once during training.
    late = image_dir / "plain3.jpg"
    late.write_bytes(late.read_bytes()[:200])

    ref = str(tmp_path / "ref")
    cmd, overrides = _cli(ref, str(image_dir), props)
    run = subprocess.run(cmd + overrides, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert f"{len(bad)} of {len(good) + len(bad)} images are recorded as unreadable" in log
    assert "no entry in the proposals file" not in log
    assert log.count("Skipping unreadable image") == 1 and "plain3.jpg" in log
    rows = read_metrics(ref)
    assert [r["iteration"] for r in rows] == list(range(1, 9))
    assert rows[-1]["num_unreadable_images"] == 1

    out = str(tmp_path / "run")
    cmd, overrides = _cli(out, str(image_dir), props)
    step = random.Random().randint(1, 4)
    killed = run_and_signal(cmd + overrides, out, step, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, f"SIGKILL after iteration {step}"
    assert not os.path.exists(os.path.join(out, "model_final.pth"))

    stopped = run_and_signal(cmd + ["--resume"] + overrides, out, 5, signal.SIGTERM)
    text = stopped.stdout.read()
    assert stopped.returncode == 75, text[-3000:]
    assert "SIGTERM received: stopped after iteration" in text and "--resume" in text
    assert not os.path.exists(os.path.join(out, "model_final.pth"))

    done = subprocess.run(cmd + ["--resume"] + overrides, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert read_metrics(out)[-1]["num_unreadable_images"] == 1
    a, b = _final_weights(ref), _final_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (SIGKILL after iteration {step})"


# ------------------------------------------------------------------------------------------------
# A failed run ends: any exception in a loader worker, 1 and 2 processes, under a hard timeout
# ------------------------------------------------------------------------------------------------

def _failing_run(unlabeled, tmp_path, exception, processes):
    out = str(tmp_path / f"fail_{exception}_{processes}")
    cmd = [sys.executable, os.path.join(REPO, "tools", "pretrain_net.py"), "--config-file",
           SOCO_CONFIGS[0], "--num-gpus", str(processes)]
    overrides = tiny_overrides(*unlabeled, out) + ["DATALOADER.NUM_WORKERS", "1"]
    env = worker_fault_env(tmp_path, "soco_d2.data.dataset:PretrainDataset.__getitem__", exception)
    return run_bounded(cmd + overrides, timeout=240, env=env)


@pytest.mark.parametrize("exception", ["TypeError", "ZeroDivisionError", "KeyError"])
def test_any_exception_in_a_loader_worker_ends_the_run_with_its_cause(unlabeled, tmp_path,
                                                                      exception):
    run = _failing_run(unlabeled, tmp_path, exception, 1)
    assert run.returncode == 1, run.stderr[-3000:]
    assert f"{exception}: " in run.stderr and "fault injected in a worker" in run.stderr


@pytest.mark.slow
def test_an_exception_in_a_loader_worker_ends_a_two_process_run(unlabeled, tmp_path):
    run = _failing_run(unlabeled, tmp_path, "TypeError", 2)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "TypeError" in run.stderr and "fault injected in a worker" in run.stderr


@pytest.fixture(scope="module")
def reference_run(unlabeled, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "ref")
    cmd, overrides = _cli(out, *unlabeled)
    run = run_bounded(cmd + overrides, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1],
                         ids=lambda s: signal.Signals(s).name)
def test_a_signal_to_the_whole_process_group_saves_and_resumes_exactly(unlabeled, reference_run,
                                                                       tmp_path, sig):
    """`timeout`, SLURM and Ctrl-C signal every process of the job, loader workers included,
    at a random step: the run saves, exits with 75 and --resume ends with the same weights."""
    import torch

    out = str(tmp_path / "run")
    cmd, overrides = _cli(out, *unlabeled)
    step = random.Random().randint(1, 6)
    stopped = run_and_signal(cmd + overrides, out, step, sig, group=True)
    text = stopped.stdout.read()
    assert stopped.returncode == 75, text[-3000:]
    assert f"{signal.Signals(sig).name} received: stopped after iteration" in text
    done = run_bounded(cmd + ["--resume"] + overrides, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _final_weights(reference_run), _final_weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs ({signal.Signals(sig).name} after {step})"


def test_one_run_per_output_dir(unlabeled, tmp_path):
    """A second run on the OUTPUT_DIR of a running one is refused, naming the first's host and
    process; the first is not disturbed. A lock file left by a killed run is taken over."""
    import socket

    out = str(tmp_path / "shared")
    cmd, overrides = _cli(out, *unlabeled)
    long_run = overrides + ["SOLVER.MAX_ITER", "400"]  # still running when the second comes
    first = subprocess.Popen(cmd + long_run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (os.path.exists(os.path.join(out, "metrics.json")) or first.poll() is not None
                   or time.time() > deadline):
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second could start"
        second = run_bounded(cmd + long_run, timeout=120)
        assert first.poll() is None, "the first run ended before the second was refused"
        assert second.returncode == 2
        assert (f"OUTPUT_DIR {out!r} is in use by another run: process {first.pid} on host "
                f"{socket.gethostname()}") in second.stderr
        assert "Traceback" not in second.stderr
        os.kill(first.pid, signal.SIGTERM)
        text, _ = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 75, text[-3000:]
    rows = [r["iteration"] for r in read_metrics(out)]
    assert rows == list(range(1, len(rows) + 1))  # one run's rows only

    # A killed run leaves its record in the lock file, but the kernel released its lock.
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.lock").write_text("host=node7\npid=4242\nstarted=yesterday\n")
    cmd, overrides = _cli(str(other), *unlabeled)
    again = run_bounded(cmd + overrides, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "left by process 4242 on host node7 (started yesterday)" in again.stdout
    assert (other / "run.lock").read_text() == ""  # a run that ends releases it


def test_output_dir_that_is_a_file_is_named_before_anything_starts(unlabeled, tmp_path):
    out = tmp_path / "a_file"
    out.write_text("x")
    cmd, overrides = _cli(str(out), *unlabeled)
    run = run_bounded(cmd + overrides, timeout=120)
    assert run.returncode != 0
    assert f"OUTPUT_DIR {str(out)!r} exists and is not a folder" in run.stderr
    assert "Traceback" not in run.stderr


def test_all_images_unreadable_is_said_as_such(tmp_path):
    """Every image turned unreadable after its proposals were made: the run ends with the
    dataset's own message, not as a loader worker "killed by the out-of-memory killer"."""
    _, image_dir = make_synthetic_coco(str(tmp_path / "data"), num_images=4, image_size=96, seed=0)
    props = str(tmp_path / "props.socoprop")
    run_generation(list_images(image_dir), props, workers=1, progress=False)
    for name in os.listdir(image_dir):
        with open(os.path.join(image_dir, name), "wb") as f:
            f.write(b"no longer an image")
    out = str(tmp_path / "out")
    cmd, overrides = _cli(out, image_dir, props)
    run = run_bounded(cmd + overrides + ["DATALOADER.NUM_WORKERS", "1"], timeout=240)
    assert run.returncode == 1
    assert "consecutive images could not be read" in run.stderr
    assert "out-of-memory" not in run.stderr and "A data-loader worker died" not in run.stderr


def test_images_replaced_after_their_proposals_are_skipped_with_one_line(tmp_path):
    """Two of six images replaced after the proposals were made: one by a picture of another
    aspect ratio (skipped, counted, one line for the run), one by the same picture at half size
    (its boxes rescaled). Two loader workers: the line still comes once."""
    import cv2

    _, image_dir = make_synthetic_coco(str(tmp_path / "data"), num_images=6, image_size=96, seed=0)
    props = str(tmp_path / "props.socoprop")
    run_generation(list_images(image_dir), props, workers=1, progress=False)
    names = sorted(os.listdir(image_dir))
    replaced, halved = (os.path.join(image_dir, n) for n in names[1:3])
    cv2.imwrite(replaced, cv2.imread(replaced)[:, 16:80])  # 96x64: another picture
    cv2.imwrite(halved, cv2.resize(cv2.imread(halved), (48, 48), interpolation=cv2.INTER_AREA))
    out = str(tmp_path / "out")
    cmd, overrides = _cli(out, image_dir, props)
    run = run_bounded(cmd + overrides + ["SOLVER.MAX_ITER", "6"], timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert log.count("no longer match their proposals") == 1
    line = next(x for x in log.splitlines() if "no longer match their proposals" in x)
    assert names[1] in line and "96x96 (height x width)" in line
    assert names[2] not in line and names[1] not in log.replace(line, "")
    assert log.count("rescaling its boxes") == 1 and names[2] in log
    rows = read_metrics(out)
    assert rows[-1]["num_unreadable_images"] == 1  # the replaced file, counted once
    # Drawn once per epoch of six: 12 positions in two epochs, each draw of it skipped.
    assert rows[-1]["num_skipped_total"] == 2 == sum(r["num_skipped"] for r in rows)


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (needs the right to mount, as root in a container: skipped otherwise)."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small file system here ({made.stderr.strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_follows_on_checkpoint_error(unlabeled, small_disk):
    """OUTPUT_DIR on a real full disk: torch reports it as a RuntimeError, which the periodic
    checkpoints survive with SOLVER.ON_CHECKPOINT_ERROR continue; the final one ends the run
    (exit 1) naming the file and the reason."""
    out = str(small_disk / "out")
    cmd, overrides = _cli(out, *unlabeled)
    run = run_bounded(cmd + overrides + ["SOLVER.MAX_ITER", "4", "DATALOADER.NUM_WORKERS", "0"],
                      timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 1, log[-3000:]
    assert "Could not write checkpoint" in log and "model_0000002.pth" in log
    assert "No space left on device" in log and "Training continues" in log
    assert f"Could not write checkpoint {out}/model_final.pth" in log
    assert [r["iteration"] for r in read_metrics(out)] == [1, 2, 3, 4]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]  # no partial file left


def test_a_damaged_proposals_file_ends_the_run_naming_it(unlabeled, tmp_path):
    """Flipped bits in the boxes of a proposals file: the run ends (exit 1) with the file, the
    image and the fix, instead of training on wrong boxes."""
    import shutil

    image_dir, props = unlabeled
    damaged = str(tmp_path / "damaged.socoprop")
    shutil.copy(props, damaged)
    raw = open(damaged, "rb").read()
    length = int.from_bytes(raw[12:16], "little")
    header = json.loads(raw[20:20 + length])
    boxes = (20 + length + 63) // 64 * 64 + header["arrays"]["boxes"]["offset"]
    with open(damaged, "r+b") as f:  # one bit in each of the first 40 boxes: every image's
        for i in range(0, 8 * header["num_boxes"], 8 * max(1, header["num_boxes"] // 40)):
            f.seek(boxes + i)
            byte = f.read(1)[0]
            f.seek(boxes + i)
            f.write(bytes([byte ^ 1]))
    cmd, overrides = _cli(str(tmp_path / "out"), image_dir, damaged)
    run = run_bounded(cmd + overrides, timeout=240)
    assert run.returncode == 1
    assert "damaged.socoprop" in run.stderr and "do not match their checksum" in run.stderr
    assert "regenerate it with tools/generate_proposals.py" in run.stderr


def test_a_stuck_run_dumps_every_stack_and_ends(unlabeled, tmp_path):
    """A loader worker that never returns (a stalled file system): after SOLVER.WATCHDOG_TIMEOUT
    seconds without progress the run writes the stacks of its threads and of its workers to
    stderr and log.txt and ends with exit code 3, instead of waiting for the job's time limit."""
    out = str(tmp_path / "stuck")
    cmd, overrides = _cli(out, *unlabeled)
    env = worker_fault_env(tmp_path, "soco_d2.data.dataset:PretrainDataset.__getitem__", "HANG")
    start = time.time()
    run = run_bounded(cmd + overrides + ["DATALOADER.NUM_WORKERS", "1",
                                         "SOLVER.WATCHDOG_TIMEOUT", "10"], timeout=240, env=env)
    assert run.returncode == 3, run.stderr[-3000:]
    assert time.time() - start < 200
    assert "No progress for" in run.stdout + run.stderr and "SOLVER.WATCHDOG_TIMEOUT" in run.stdout
    assert "Current thread" in run.stderr and "in _faulty" in run.stderr  # the worker's stack
    with open(os.path.join(out, "log.txt")) as f:
        assert "most recent call first" in f.read()
