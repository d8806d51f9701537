"""One command for one GPU: speed, memory, model FLOPs utilisation and host syncs of the training steps.

Parts (each guarded: an error is recorded and the next part runs; each time-boxed within
``--budget-s``; ``OUT/bench_gpu.json`` and ``OUT/bench_gpu.md`` are rewritten after every part, so
a run cut short keeps what it measured):

1. **Steps** on synthetic uint8 batches already on the device (the real view mappers' samples of
   random images, collated and moved once): the real trainer's ``PretrainTrainer.run_step``
   (forward under autocast, backward, optimizer, EMA) of SoCo ``faithful`` and ``per_view``,
   SoCo* and DetCo (R50, shipped configs), and their floors (the same backbones alone, forward +
   backward on the same batch, target / key backbones forward: no heads, loss, optimizer or EMA;
   no method's step can be faster). First bf16, channels_last, eager, batch 128 per GPU; then
   ``sync_debug`` (below), SoCo's loader and the fp32 fine-tuning step; then one change at a
   time: fp16 (with the gradient scaler), ``torch.compile`` of SoCo faithful and DetCo (a failed
   compile is recorded), NCHW, batch 64; then DetCo's loader, bf16 fine-tuning and the rest.
   What the budget leaves out is recorded as skipped; ``--parts`` runs it in a second call.
   Reported: images/s, step time, peak memory, FLOPs per step (``torch.utils.flop_counter``,
   forward + backward, counted once per method and batch) and MFU against the card's dense
   bf16 / fp16 peak (``PEAK_TFLOPS``; none for a card not in it).
2. **sync_debug**: a few steps of each method (bf16, no scaler) under
   ``torch.cuda.set_sync_debug_mode("warn")``, every warning recorded with the place in soco_d2
   (or torch / torchvision) that made it, then one step under ``"error"``: what raises is
   recorded. No host sync is the target.
3. **loader**: the real dataset and loader (``build_pretrain_dataset``, ``build_pretrain_loader``)
   with 8 and 14 workers on images on disk (synthetic JPEGs with random proposals, or
   ``--images``): images/s of the loader alone, and of the step fed by it with the time it waits.
4. **finetune**: Mask R-CNN R50-FPN, ``FinetuneTrainer.run_step`` on two synthetic COCO images
   of ``--finetune-size`` px already on the device, fp32 (the shipped config) and bf16 autocast.

Example (one H100, at most about 8 minutes): ``python benchmarks/bench_gpu.py --out bench_gpu``;
``--parts compile`` (or any substring of part names) runs a subset. ``--device cpu --smoke``
runs every part tiny (R18, 32 px views, batch 2, two steps a part, fp32 on one thread; the test
suite does, so that the script cannot rot).
"""
import argparse
import contextlib
import gc
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional

import cv2
import numpy as np
import torch
from torch import nn
from torch.utils.data._utils.collate import default_collate
from torch.utils.flop_counter import FlopCounterMode

from soco_d2.config import load_config
from soco_d2.data import build_mapper
from soco_d2.data.dataset import build_pretrain_dataset
from soco_d2.data.image_list import list_images
from soco_d2.data.loader import build_pretrain_loader, stop_loader_workers, usable_num_workers
from soco_d2.data.proposals import write_proposals
from soco_d2.data.synthetic import make_synthetic_coco
from soco_d2.engine.run_setup import move_to_device
from soco_d2.engine.trainer import PretrainTrainer
from soco_d2.finetune.coco_data import COCODetection
from soco_d2.finetune.trainer import FinetuneTrainer, _targets_to

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense (no sparsity) bf16 / fp16 tensor-core peak of each card, TFLOP/s (NVIDIA's datasheets),
# matched in order against torch.cuda.get_device_name().
PEAK_TFLOPS = [("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0),
               ("A100", 312.0)]

METHODS = {  # name: (config, overrides, smoke overrides)
    "soco_faithful": ("soco/soco_fpn_r50_100ep.yaml", ["MODEL.SOCO.HEAD_MODE", "faithful"], "soco"),
    "soco_per_view": ("soco/soco_fpn_r50_100ep.yaml", ["MODEL.SOCO.HEAD_MODE", "per_view"], "soco"),
    "soco_star": ("soco/soco_star_fpn_r50_400ep.yaml", ["MODEL.SOCO.HEAD_MODE", "faithful"], "soco_star"),
    "detco": ("detco/detco_r50_200ep.yaml", [], "detco"),
}
FLOORS = {"soco_floor": "soco_faithful", "soco_star_floor": "soco_star", "detco_floor": "detco"}
SMOKE = {
    "soco": ["MODEL.RESNETS.DEPTH", 18, "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.CONV_DIM", 32,
             "MODEL.ROI_BOX_HEAD.FC_DIM", 64, "MODEL.SOCO.PROJECTOR_HIDDEN_DIM", 64,
             "MODEL.SOCO.PROJECTOR_OUT_DIM", 32, "MODEL.SOCO.PREDICTOR_HIDDEN_DIM", 64,
             "INPUT.SOCO.VIEW1_SIZE", 32, "INPUT.SOCO.VIEW2_SIZE", 32, "INPUT.SOCO.VIEW3_SIZE", 32],
    "detco": ["MODEL.RESNETS.DEPTH", 18, "MODEL.DETCO.QUEUE_SIZE", 64, "MODEL.DETCO.FEATURE_DIM", 32,
              "MODEL.DETCO.HEAD_HIDDEN_DIM", 64, "INPUT.DETCO.GLOBAL_SIZE", 32,
              "INPUT.DETCO.LOCAL_CROP_SIZE", 48, "INPUT.DETCO.PATCH_SIZE", 16],
    "finetune": ["MODEL.RESNETS.DEPTH", 18, "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 200,
                 "MODEL.RPN.POST_NMS_TOPK_TRAIN", 50, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16,
                 "MODEL.ROI_BOX_HEAD.CONV_DIM", 16, "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
                 "MODEL.ROI_MASK_HEAD.CONV_DIM", 16, "INPUT.MAX_SIZE_TRAIN", 128],
}
SMOKE["soco_star"] = SMOKE["soco"] + ["INPUT.SOCO.VIEW4_SIZE", 32]


class PartTimeout(Exception):
    """A part ran past its share of the budget."""


class Step(NamedTuple):
    """One step-timing part."""
    method: str  # a METHODS or FLOORS name
    dtype: str  # "bf16" or "fp16"
    channels_last: bool
    compile: bool
    batch: int

    @property
    def name(self) -> str:
        return (f"step/{self.method}/{self.dtype}/{'cl' if self.channels_last else 'nchw'}/"
                f"{'compile' if self.compile else 'eager'}/b{self.batch}")


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------

class Report:
    """The JSON and the markdown table in ``out``, rewritten after every part."""

    def __init__(self, out: str, meta: Dict):
        self.out = out
        self.data = {"meta": meta, "parts": {}}
        os.makedirs(out, exist_ok=True)

    def add(self, name: str, result: Dict) -> None:
        self.data["parts"][name] = result
        with open(os.path.join(self.out, "bench_gpu.json"), "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        with open(os.path.join(self.out, "bench_gpu.md"), "w") as f:
            f.write(self.markdown())

    def markdown(self) -> str:
        meta = self.data["meta"]
        lines = [f"# bench_gpu: {meta['device_name']}", "",
                 f"`{meta['command']}`; torch {meta['torch']}, peak {meta['peak_tflops'] or '?'} "
                 f"TFLOP/s (dense bf16 / fp16); {meta['started']}.", "",
                 "| part | images/s | step ms | peak mem GiB | TFLOP / step | MFU | status |",
                 "|---|---|---|---|---|---|---|"]

        def num(v, fmt):
            return format(v, fmt) if isinstance(v, (int, float)) and v is not None else "-"

        other = []
        for name, r in self.data["parts"].items():
            if name.startswith(("step/", "loader/", "finetune/")):
                why = r.get("error") or r.get("reason") or ""
                status = r["status"] + (f": {why}"[:160].replace("|", "/") if r["status"] != "ok" else "")
                tflop = r.get("flops_per_step") and r["flops_per_step"] / 1e12
                mfu = r.get("mfu") and f"{100 * r['mfu']:.1f}%"
                ips = r.get("images_per_s")
                if name.startswith("loader/") and r.get("loader_images_per_s"):
                    ips = f"{num(ips, '.1f')} (loader alone {num(r['loader_images_per_s'], '.1f')}, " \
                          f"waits {num(r.get('data_wait_fraction', 0) * 100, '.0f')}%)"
                else:
                    ips = num(ips, ".1f")
                lines.append(f"| {name} | {ips} | {num(r.get('step_s') and r['step_s'] * 1e3, '.1f')} | "
                             f"{num(r.get('peak_mem_gib'), '.2f')} | {num(tflop, '.3g')} | {mfu or '-'} | "
                             f"{status} |")
            else:
                other.append((name, r))
        for name, r in other:
            lines += ["", f"## {name}: {r['status']}", "", "```", json.dumps(r, indent=1, default=str)[:4000], "```"]
        return "\n".join(lines) + "\n"


def peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


@contextlib.contextmanager
def time_box(seconds: float):
    """Raise :class:`PartTimeout` in this (main) thread after ``seconds``."""
    def on_alarm(signum, frame):
        raise PartTimeout(f"time box of {seconds:.0f} s exceeded")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _where(frames) -> str:
    """The innermost frame in soco_d2 (else torchvision, else the last one) as ``path:line func``."""
    frames = list(frames)
    for package in ("/soco_d2/", "/torchvision/"):
        mine = [f for f in frames if package in f.filename.replace(os.sep, "/")]
        if mine:
            f = mine[-1]
            return f"{package.strip('/')}/{f.filename.replace(os.sep, '/').rsplit(package, 1)[1]}:{f.lineno} {f.name}"
    return f"{frames[-1].filename}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"


# ------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.smoke = args.smoke
        self.work = tempfile.mkdtemp(prefix="bench_gpu_")
        self.peak = peak_tflops(self.device)
        self._batches: Dict = {}
        self._flops: Dict = {}

    def close(self):
        shutil.rmtree(self.work, ignore_errors=True)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def cfg(self, method: str, dtype: str = "bf16", channels_last: bool = True, batch: int = 2, extra=()):
        config, overrides, smoke = METHODS[method]
        opts = ["MODEL.DEVICE", str(self.device), "SOLVER.IMS_PER_BATCH", batch, "SOLVER.MAX_ITER", 10**6,
                # autocast on a GPU; a CPU (the smoke run) computes in fp32: bf16 there is many times slower
                "SOLVER.AMP.ENABLED", self.device.type == "cuda",
                "SOLVER.AMP.DTYPE", "bfloat16" if dtype == "bf16" else "float16",
                "CHANNELS_LAST", channels_last, "OUTPUT_DIR", os.path.join(self.work, "run"),
                "DATALOADER.NUM_WORKERS", 0] + overrides
        if self.smoke:
            opts += SMOKE[smoke]
        return load_config(os.path.join(REPO, "configs", config), opts + list(extra))

    def device_batch(self, method: str, batch: int, channels_last: bool):
        """Samples of the method's view mapper on random images, collated, on the device."""
        cfg = self.cfg(method, batch=batch)
        key = (cfg.INPUT.dump(), batch)
        if key not in self._batches:
            mapper = build_mapper(cfg)
            rng = np.random.default_rng(0)
            samples = []
            for _ in range(batch):
                image = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
                xy = rng.uniform(0, 200, (64, 2))
                boxes = np.concatenate([xy, xy + rng.uniform(16, 120, (64, 2))], axis=1)
                samples.append(mapper(image, boxes.astype(np.float32), rng))
            self._batches[key] = default_collate(samples)
        return move_to_device(self._batches[key], self.device, channels_last)

    def trainer(self, cfg, dataset=None):
        """The real pretraining trainer; its steps read ``trainer._data`` (set by the caller)."""
        # Without a dataset the steps read a fixed batch; ``range`` only sizes the schedule.
        return PretrainTrainer(cfg, dataset=dataset if dataset is not None else range(cfg.SOLVER.IMS_PER_BATCH))


class Floor(nn.Module):
    """The backbones of a method alone on its batch: online forward + backward on every view (or
    global view and patches), target / key forward; no heads, loss, optimizer or EMA."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch) -> torch.Tensor:
        m = self.model
        if hasattr(m, "target_backbone"):  # SoCo: each view through both ResNet-FPNs
            online, target = m.backbone, m.target_backbone
            views = [m.normalize(x) for x in batch["images"].values()]
            queries = keys = views
        else:  # DetCo: query encoder on view and patches 0, key encoder on 1
            online, target = m.encoder_q.body, m.encoder_k.body
            glob, local = m.normalize(batch["global"]), m.normalize(batch["local"])
            queries = [glob[:, 0], local[:, 0].flatten(0, 1)]
            keys = [glob[:, 1], local[:, 1].flatten(0, 1)]
        loss = sum(f.float().mean() for x in queries for f in online(x).values())
        with torch.no_grad():
            for x in keys:
                target(x)
        return loss


# ------------------------------------------------------------------------------------------------
# Parts
# ------------------------------------------------------------------------------------------------

def run_steps(bench: Bench, step: Callable[[int], None], first: int, timed_s: float):
    """Warm up, then time whole steps until ``timed_s`` (3 to 50 steps; smoke: no warmup, one
    timed step). ``first``: the iteration number of the first of them. Returns (steps, s/step)."""
    warmup, least, most = (0, 1, 1) if bench.smoke else (2, 3, 50)
    for i in range(warmup):
        step(first + i)
    bench.sync()
    n, t0 = 0, time.perf_counter()
    while n < most and (n < least or time.perf_counter() - t0 < timed_s):
        step(first + warmup + n)
        n += 1
        if n % 4 == 0:
            bench.sync()  # keeps the host at most a few steps ahead of the device
    bench.sync()
    return n, (time.perf_counter() - t0) / n


def counted(step: Callable[[int], None], it: int) -> int:
    """Run ``step(it)`` and return its FLOPs (forward and backward; torch.utils.flop_counter)."""
    with FlopCounterMode(display=False) as counter:
        step(it)
    return int(counter.get_total_flops())


def part_step(bench: Bench, s: Step) -> Dict:
    if s.dtype == "fp16" and bench.device.type != "cuda":
        return {"status": "skipped", "reason": "float16 autocast needs CUDA"}
    method = FLOORS.get(s.method, s.method)
    cfg = bench.cfg(method, s.dtype, s.channels_last, s.batch)
    batch = bench.device_batch(method, s.batch, s.channels_last)
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
    trainer = bench.trainer(cfg)
    if s.method in FLOORS:
        floor = Floor(trainer.model).train()
        dtype = torch.bfloat16 if s.dtype == "bf16" else torch.float16
        module = floor

        def step(it):
            with torch.autocast(bench.device.type, dtype=dtype):
                loss = floor(batch)
            loss.backward()
            floor.zero_grad(set_to_none=True)
    else:
        trainer._data = itertools.repeat(batch)  # the step's batch, already on the device
        module = trainer.model
        step = trainer.run_step
    key = (s.method, s.batch)  # FLOPs per step depend on nothing else
    t0 = time.perf_counter()
    if s.compile:
        module.compile(backend=bench.args.compile_backend)
        step(0)  # compiles
    elif key not in bench._flops:
        bench._flops[key] = counted(step, 0)  # the first step also picks the cuDNN algorithms
    else:
        step(0)
    bench.sync()
    first_s = time.perf_counter() - t0
    n, step_s = run_steps(bench, step, 1, bench.args.timed_s)
    flops = bench._flops.get(key)
    out = {"status": "ok", "amp": bool(cfg.SOLVER.AMP.ENABLED), "images_per_s": s.batch / step_s,
           "step_s": step_s, "timed_steps": n, "first_step_s": first_s, "flops_per_step": flops,
           "mfu": flops / step_s / (bench.peak * 1e12) if flops and bench.peak else None}
    if bench.device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(bench.device) / 2**30
    return out


def part_sync_debug(bench: Bench) -> Dict:
    """Each method's step under set_sync_debug_mode: every warning ("warn"), then "error"."""
    batch = 2 if bench.smoke else 64
    results = {}
    cuda = bench.device.type == "cuda"
    for method in ("soco_faithful", "detco") if bench.smoke else METHODS:
        cfg = bench.cfg(method, "bf16", True, batch)
        trainer = bench.trainer(cfg)
        trainer._data = itertools.repeat(bench.device_batch(method, batch, True))
        warmup, checked = (1, 1) if bench.smoke else (2, 3)
        for it in range(warmup):
            trainer.run_step(it)
        bench.sync()
        syncs: List[str] = []

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchronizing" in str(message):
                syncs.append(_where(traceback.extract_stack()[:-1]))

        error = None
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                for it in range(warmup, warmup + checked):
                    trainer.run_step(it)
                if cuda:
                    torch.cuda.set_sync_debug_mode("error")
                trainer.run_step(warmup + checked)
            except RuntimeError as e:
                error = f"{str(e).splitlines()[0]} at {_where(traceback.extract_tb(e.__traceback__))}"
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
        bench.sync()
        counts = {}
        for where in syncs:
            counts[where] = counts.get(where, 0) + 1
        results[method] = {"warn_mode_steps": checked, "syncs": counts, "error_mode": error or "no error"}
    clean = all(not r["syncs"] and r["error_mode"] == "no error" for r in results.values())
    return {"status": "ok", "no_host_sync": clean if cuda else None,
            "note": None if cuda else "sync debug mode is CUDA-only: steps ran unchecked", **results}


def images_on_disk(bench: Bench) -> str:
    """The loader parts' images (``--images``, else synthetic JPEGs of about ImageNet's size)
    with a proposals file of random boxes (300 per image); returns the image source."""
    if getattr(bench, "image_source", None):
        return bench.image_source
    from PIL import Image  # reads the header only

    rng = np.random.default_rng(0)
    sizes = {}
    if bench.args.images:
        source = bench.args.images
        images = list_images(source)
        for i in range(min(len(images), bench.args.max_images)):
            with Image.open(images.path(i)) as im:
                sizes[images.keys[i]] = im.size[::-1]
    else:
        source = os.path.join(bench.work, "images")
        os.makedirs(source)
        n, size = (8, (96, 128)) if bench.smoke else (bench.args.max_images, (375, 500))
        low = rng.integers(0, 256, (n, 6, 8, 3), dtype=np.uint8)
        for i in range(n):  # smooth colour fields with noise
            img = cv2.resize(low[i], size[::-1], interpolation=cv2.INTER_CUBIC)
            img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(os.path.join(source, f"{i:05d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
            sizes[f"{i:05d}.jpg"] = size
    proposals = {}
    for key, (h, w) in sizes.items():
        xy = rng.uniform(0, 0.8, (300, 2)) * [w, h]
        wh = rng.uniform(0.05, 0.5, (300, 2)) * [w, h]
        proposals[key] = (np.concatenate([xy, np.minimum(xy + wh, [w, h])], axis=1), (h, w))
    bench.proposals = os.path.join(bench.work, "proposals.bin")
    write_proposals(bench.proposals, proposals)
    bench.image_source = source
    return source


def part_loader(bench: Bench, method: str, workers: int) -> Dict:
    source = images_on_disk(bench)
    batch = 2 if bench.smoke else 128
    extra = ["DATASETS.PRETRAIN.IMAGE_ROOT", source, "DATALOADER.NUM_WORKERS", workers]
    if METHODS[method][2].startswith("soco"):
        # with --images, only the first --max-images have proposals (the others: one whole-image box)
        extra += ["DATASETS.PRETRAIN.PROPOSALS", bench.proposals, "DATASETS.PRETRAIN.MAX_MISSING_PROPOSALS", 1.0]
    cfg = bench.cfg(method, "bf16", True, batch, extra)
    dataset = build_pretrain_dataset(cfg)
    loader = build_pretrain_loader(cfg, dataset)
    try:
        return _measure_loader(bench, cfg, dataset, loader, batch, workers)
    finally:
        # Stop the workers now: they ignore SIGTERM (the trainer's preemption handling), so
        # workers left to the exit of the interpreter (or stuck ones) would keep it waiting.
        stop_loader_workers(loader)
        for worker in getattr(loader.dataloader_iter, "_workers", []):
            if worker.is_alive():
                worker.kill()


def _measure_loader(bench: Bench, cfg, dataset, loader, batch: int, workers: int) -> Dict:
    t0 = time.perf_counter()
    next(loader)
    startup_s = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while n < 2 or (time.perf_counter() - t0 < bench.args.loader_s and not bench.smoke):
        next(loader)
        n += 1
    loader_rate = n * batch / (time.perf_counter() - t0)

    waited = [0.0]

    def timed_batches():
        while True:
            t = time.perf_counter()
            b = next(loader)
            waited[0] += time.perf_counter() - t
            yield b

    trainer = bench.trainer(cfg, dataset)
    trainer._data = timed_batches()
    try:
        trainer.run_step(0)
        bench.sync()
        waited[0] = 0.0
        n, step_s = run_steps(bench, trainer.run_step, 1, bench.args.loader_s)
    finally:
        trainer._data = None
    return {"status": "ok", "workers": workers, "usable_workers": usable_num_workers(workers),
            "images": len(dataset), "first_batch_s": startup_s, "loader_images_per_s": loader_rate,
            "images_per_s": batch / step_s, "step_s": step_s,
            "data_wait_fraction": waited[0] / (n * step_s)}


def part_finetune(bench: Bench, amp: bool) -> Dict:
    if amp and bench.device.type != "cuda":
        return {"status": "skipped", "reason": "bf16 autocast is many times slower on a CPU (fp32 part ran)"}
    size = 64 if bench.smoke else bench.args.finetune_size
    folder = os.path.join(bench.work, "coco")
    json_file, image_dir = (os.path.join(folder, "annotations", "instances_train.json"), os.path.join(folder, "train"))
    if not os.path.exists(json_file):
        json_file, image_dir = make_synthetic_coco(folder, 2, image_size=size, seed=0)
    opts = ["MODEL.DEVICE", str(bench.device), "MODEL.NUM_CLASSES", 3, "DATASETS.TRAIN", f"('{json_file}',)",
            "DATASETS.TEST", "()", "INPUT.MIN_SIZE_TRAIN", f"({size},)", "INPUT.MAX_SIZE_TRAIN", max(1333, size),
            "SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0, "SOLVER.AMP.ENABLED", amp,
            "SOLVER.AMP.DTYPE", "bfloat16", "OUTPUT_DIR", os.path.join(bench.work, "finetune")]
    cfg = load_config(os.path.join(REPO, "configs", "finetune", "mask_rcnn_R50_FPN_1x.yaml"),
                      opts + (SMOKE["finetune"] if bench.smoke else []))
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
    trainer = FinetuneTrainer(cfg)
    dataset = COCODetection(json_file, image_dir, is_train=True, flip_prob=0.0)
    samples = [dataset[(i, 0)] for i in range(2)]
    batch = ([s[0].to(bench.device) for s in samples], _targets_to([s[1] for s in samples], bench.device))
    trainer._data = itertools.repeat(batch)  # the step's batch, already on the device
    trainer.writers = []
    trainer._reset_window()
    trainer.model.train()
    flops = counted(trainer.run_step, 0)
    n, step_s = run_steps(bench, trainer.run_step, 1, bench.args.timed_s)
    out = {"status": "ok", "image_size": size, "amp": "bf16" if amp else "off", "images_per_s": 2 / step_s,
           "step_s": step_s, "timed_steps": n, "flops_per_step": flops,
           "mfu": flops / step_s / (bench.peak * 1e12) if bench.peak else None}
    if bench.device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(bench.device) / 2**30
    return out


# ------------------------------------------------------------------------------------------------
# Plan
# ------------------------------------------------------------------------------------------------

def plan(args) -> List:
    """``[(name, fn(bench) -> dict, share of the budget's seconds, minimum seconds to start)]``."""
    b = 2 if args.smoke else 128
    small = 4 if args.smoke else 64  # the other batch size (a CPU smoke run: one of 1 fails in BN)
    everything = list(METHODS) + list(FLOORS)
    parts = []

    def steps(items, share, minimum):
        for s in items:
            parts.append((s.name, lambda bench, s=s: part_step(bench, s), share, minimum))

    # The smoke run takes each kind of part once where more would repeat the same code. The
    # order is the priority: what the budget leaves out is recorded as skipped (``--parts``
    # runs it in a second call).
    variants = ["soco_faithful"] if args.smoke else list(METHODS)
    first_loaders = [("soco_faithful", 1)] if args.smoke else [("soco_faithful", 8), ("soco_faithful", 14)]
    later_loaders = [("detco", 2)] if args.smoke else [("detco", 8), ("detco", 14)]
    first_compiled = ["soco_floor"] if args.smoke else ["soco_faithful", "detco"]
    later_compiled = [] if args.smoke else ["soco_floor", "detco_floor", "soco_per_view", "soco_star",
                                            "soco_star_floor"]

    def loaders(items):
        for method, w in items:
            parts.append((f"loader/{method}/w{w}", lambda bench, m=method, w=w: part_loader(bench, m, w), 60, 20))

    steps([Step(m, "bf16", True, False, b) for m in everything], 30, 8)
    parts.append(("sync_debug", part_sync_debug, 60, 15))
    loaders(first_loaders)
    parts.append(("finetune/mask_rcnn/fp32", lambda bench: part_finetune(bench, False), 40, 10))
    steps([Step(m, "fp16", True, False, b) for m in METHODS], 30, 8)
    steps([Step(m, "bf16", True, True, b) for m in first_compiled], 180, 45)
    steps([Step(m, "bf16", False, False, b) for m in variants], 30, 8)
    steps([Step(m, "bf16", True, False, small) for m in variants], 25, 6)
    loaders(later_loaders)
    parts.append(("finetune/mask_rcnn/bf16", lambda bench: part_finetune(bench, True), 40, 10))
    steps([Step(m, "bf16", True, True, b) for m in later_compiled], 180, 45)
    if not args.smoke:
        steps([Step(m, "bf16", False, False, b) for m in FLOORS], 30, 8)
        steps([Step(m, "bf16", True, False, small) for m in FLOORS], 25, 6)
    if args.parts:
        wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
        parts = [p for p in parts if any(w in p[0] for w in wanted)]
    return parts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for bench_gpu.json and bench_gpu.md")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="every part tiny (R18, small views, batch 2)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="time for all parts together (default 450 s; 1800 s with --smoke)")
    ap.add_argument("--timed-s", type=float, default=3.0, help="timed seconds per step part")
    ap.add_argument("--loader-s", type=float, default=10.0, help="timed seconds per loader measurement")
    ap.add_argument("--parts", default="", help="comma-separated substrings of the part names to run")
    ap.add_argument("--images", default="", help="image folder / list for the loader parts "
                                                 "(default: synthetic JPEGs; random proposals either way)")
    ap.add_argument("--max-images", type=int, default=768,
                    help="synthetic images written for the loader parts (with --images: those given proposals)")
    ap.add_argument("--finetune-size", type=int, default=800, help="side of the fine-tuning images")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 1800.0 if args.smoke else 450.0
    if args.smoke and args.compile_backend == "inductor":
        args.compile_backend = "eager"  # dynamo's graph capture without the C++ / Triton build
    # OpenCV work here (the view mappers of the synthetic batches) would start OpenCV's thread
    # pool; a loader worker forked after that hangs in its first cv2.setNumThreads (measured).
    cv2.setNumThreads(1)
    device = torch.device(args.device)
    if device.type == "cpu" and args.smoke:
        # One thread: torch's OpenMP threads spin against each other and the loader workers on a
        # small shared machine, which made tiny steps 20 times slower (the trainer keeps this).
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA GPU is visible; use --device cpu (with --smoke).")
    bench = Bench(args)
    meta = {"command": "python " + " ".join([os.path.relpath(__file__, REPO)] + (argv or sys.argv[1:])),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "peak_tflops": bench.peak, "torch": torch.__version__, "cuda": torch.version.cuda,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "budget_s": args.budget_s}
    report = Report(args.out, meta)
    start = time.perf_counter()
    try:
        for name, fn, share, minimum in plan(args):
            left = args.budget_s - (time.perf_counter() - start)
            if left < minimum:
                report.add(name, {"status": "skipped", "reason": f"budget: {left:.0f} s left, needs {minimum} s"})
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            print(f"[bench_gpu] {name} ...", flush=True)
            try:
                # a CPU smoke run only checks that every part works: long boxes, for loaded machines
                with time_box(min(share * (10 if args.smoke else 1), left)):
                    result = fn(bench)
            except Exception as e:  # recorded; the next part runs
                result = {"status": "timeout" if isinstance(e, PartTimeout) else "error",
                          "error": f"{type(e).__name__}: {e}"[:2000],
                          "where": _where(traceback.extract_tb(e.__traceback__))}
            finally:
                gc.collect()  # a trainer is a reference cycle (its monitors point back to it)
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
                    torch.cuda.empty_cache()
            result["seconds"] = time.perf_counter() - t0
            result["cpu_seconds"] = time.process_time() - c0
            report.add(name, result)
            print(f"[bench_gpu] {name}: {json.dumps(result, default=str)[:300]}", flush=True)
    finally:
        bench.close()
    print(f"[bench_gpu] wrote {os.path.join(args.out, 'bench_gpu.json')} and bench_gpu.md "
          f"in {time.perf_counter() - start:.0f} s")
    return report.data


if __name__ == "__main__":
    main()
