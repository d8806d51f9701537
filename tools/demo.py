#!/usr/bin/env python
"""Quick-start demo: the whole chain on a small data set, on a CPU, in minutes.

1. data: a synthetic shapes data set (COCO json + PNG images), or the user's COCO data;
2. selective-search proposals of the unlabeled pretraining images;
3. SoCo pretraining (``configs/demo/soco_demo.yaml``), watched by a kNN probe on object crops;
4. conversion of the online network (backbone, FPN, box head) to a detectron2 ``.pkl``;
5. Mask R-CNN fine-tuning + COCO evaluation (``configs/demo/mask_rcnn_demo.yaml``), twice with
   the same budget and seed: from the SoCo weights and from random initialisation;
6. a table of box / mask AP side by side, ``demo_curves.png`` and ``demo_summary.json``.

    python tools/demo.py --output-dir output/demo --minutes 2     # a 2-minute smoke run
    python tools/demo.py --output-dir output/demo                 # 10 minutes
    python tools/demo.py --output-dir output/demo_mine \\
        --train-json my/annotations/instances_train.json --train-images my/train \\
        --val-json my/annotations/instances_val.json --val-images my/val

--minutes are minutes on 2 idle CPU cores: the iteration budget is planned from stage costs
measured there (StageCosts), and the demo prints its projected time before it trains and the
time left after each stage. It is an application on the package's public interface: it runs
from a source checkout, with soco_d2 installed from a wheel or not installed at all.
"""
import os
import sys

if __name__ == "__main__":
    # Idle OpenMP threads sleep instead of spinning: on cores shared with other jobs, spinning
    # threads multiplied the demo's CPU time (docs/notes/demo_cost.md). Read when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Dict, List, Optional, Sequence, TextIO, Tuple  # noqa: E402

import torch  # noqa: E402

from soco_d2.config import ConfigError  # noqa: E402
from soco_d2.engine.writers import read_metrics  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PRETRAIN_CONFIG = os.path.join(_REPO, "configs", "demo", "soco_demo.yaml")
DEFAULT_FINETUNE_CONFIG = os.path.join(_REPO, "configs", "demo", "mask_rcnn_demo.yaml")

# Crops per class and side of the kNN probe's labelled folders.
PROBE_CROPS_PER_CLASS = 60
DEFAULT_MINUTES = 10.0
# Share of the training seconds (after the fixed costs) that goes to pretraining; the rest is
# split evenly between the two fine-tunings.
PRETRAIN_SHARE = 0.3


@dataclass(frozen=True)
class StageCosts:
    """Wall seconds of the demo's parts with the default configs on the reference machine (2 idle
    CPU cores), fitted from a run by ``benchmarks/bench_demo_costs.py``. A run's iteration budget
    and its projected time come from these, so ``--minutes`` means minutes on that machine."""

    proposals_start: float = 1.0
    proposals_per_image: float = 0.021  # with both cores busy
    pretrain_start: float = 1.9  # model, view sheet, first batch
    pretrain_iter: float = 1.53
    knn_probe_per_crop: float = 0.009  # one probe of every train and val crop
    finetune_start: float = 2.2  # model, weights, first batch, precise BN, save, COCO evaluation
    finetune_iter: float = 0.63
    evaluation_per_image: float = 0.11  # inference


COSTS = StageCosts()


@dataclass(frozen=True)
class Budget:
    """Iterations of a demo and the projected seconds of each stage on the reference machine."""

    pretrain_iters: int
    finetune_iters: int
    knn_points: int  # probe points after iteration 0
    projected: Dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.projected.values())


def knn_points_for(minutes: float) -> int:
    """kNN probe points (besides iteration 0): one per minute of budget, 2 to 8."""
    return int(min(8, max(2, round(minutes))))


def project(pretrain_iters: int, finetune_iters: int, knn_points: int, num_pretrain_images: int,
            num_val: int, num_crops: int, costs: StageCosts = COSTS) -> Dict[str, float]:
    """Projected wall seconds per stage on the reference machine."""
    probes = (knn_points + 1) * num_crops * costs.knn_probe_per_crop
    finetune = (costs.finetune_start + finetune_iters * costs.finetune_iter
                + num_val * costs.evaluation_per_image)
    return {"proposals": costs.proposals_start + num_pretrain_images * costs.proposals_per_image,
            "pretrain": costs.pretrain_start + pretrain_iters * costs.pretrain_iter + probes,
            "finetune_soco": finetune, "finetune_scratch": finetune}


def plan_budget(minutes: float, num_pretrain_images: int, num_val: int, num_crops: int,
                pretrain_iters: Optional[int] = None, finetune_iters: Optional[int] = None,
                costs: StageCosts = COSTS) -> Budget:
    """The iterations that fill ``minutes`` on the reference machine after the fixed costs
    (proposals, model starts, kNN probes, evaluation): ``PRETRAIN_SHARE`` of the rest to
    pretraining, the remainder to the two fine-tunings. Explicit iterations win."""
    if not minutes > 0:
        raise DemoError(f"--minutes must be positive, got {minutes}.")
    points = knn_points_for(minutes) if num_crops else 0
    fixed = sum(project(0, 0, points, num_pretrain_images, num_val, num_crops, costs).values())
    left = max(0.0, 60.0 * minutes - fixed)
    p_iters = pretrain_iters or max(1, int(PRETRAIN_SHARE * left / costs.pretrain_iter))
    f_iters = finetune_iters or max(1, int((1 - PRETRAIN_SHARE) * left / (2 * costs.finetune_iter)))
    points = min(points, p_iters)  # at most one probe per iteration
    return Budget(p_iters, f_iters, points,
                  project(p_iters, f_iters, points, num_pretrain_images, num_val, num_crops, costs))


def eta_seconds(projected: Dict[str, float], measured: Dict[str, float]) -> float:
    """Seconds left: the projection of the stages not yet measured, scaled by how much slower
    (or faster) than projected the measured ones ran on this machine."""
    finished = [k for k in projected if k in measured]
    left = sum(v for k, v in projected.items() if k not in measured)
    planned = sum(projected[k] for k in finished)
    return left * (sum(measured[k] for k in finished) / planned if planned > 0 else 1.0)


def machine_load() -> str:
    """This machine's usable cores and load, for the projection's caveat."""
    from soco_d2.data.loader import usable_cores

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"this machine: {usable_cores()} usable cores, load average {load:.1f}"


# Everything the demo writes under its output folder (removed first with ``overwrite``).
_OUTPUTS = ("data", "probe", "views", "proposals.socoprop", "proposals.socoprop.parts", "pretrain",
            "soco_converted.pkl", "finetune_soco", "finetune_scratch", "demo_curves.png",
            "demo_summary.json", "log.txt", "demo_settings.json")

# (table label, metrics key) in the printed table.
TABLE_ROWS = [(f"AP{tag}{suffix}", f"{task}/AP{suffix}")
              for task, tag in (("bbox", "bb"), ("segm", "mk"))
              for suffix in ("", "50", "75", "s", "m", "l")]


class DemoError(ValueError):
    """Input the demo cannot use (missing file, wrong flag combination); the message says why."""


@dataclass
class DemoSettings:
    """What :func:`run_demo` does. ``train_json`` unset: synthetic data of the given size."""

    output_dir: str
    train_json: Optional[str] = None
    train_images: Optional[str] = None  # default: next to the json (see default_coco_image_root)
    val_json: Optional[str] = None
    val_images: Optional[str] = None
    # Unlabeled pretraining images (folder, .txt list or COCO json); default: the training images.
    pretrain_images: Optional[str] = None
    minutes: float = DEFAULT_MINUTES
    seed: int = 0
    num_train_images: int = 160
    num_val_images: int = 40
    image_size: int = 128
    pretrain_iters: Optional[int] = None  # default: from ``minutes`` (plan_budget)
    finetune_iters: Optional[int] = None
    workers: Optional[int] = None  # proposal processes (default: every usable core)
    pretrain_config: str = DEFAULT_PRETRAIN_CONFIG
    finetune_config: str = DEFAULT_FINETUNE_CONFIG
    pretrain_opts: List[str] = field(default_factory=list)  # KEY VALUE overrides
    finetune_opts: List[str] = field(default_factory=list)
    overwrite: bool = False
    # Continue a stopped demo in ``output_dir`` (same settings): finished stages are reused,
    # pretraining, fine-tuning and proposals continue from their last checkpoint / chunk.
    resume: bool = False
    progress: bool = True


@dataclass
class DemoData:
    train_json: str
    train_images: str
    val_json: str
    val_images: str
    pretrain_images: str
    num_classes: int
    num_train: int
    num_val: int
    synthetic: bool


# ------------------------------------------------------------------------------------------------
# 1. Data
# ------------------------------------------------------------------------------------------------


def check_coco_data(json_file: str, image_root: Optional[str], flag: str) -> Tuple[str, int, List[int]]:
    """Check a user's COCO instances json and its images; returns ``(image_root, images,
    sorted category ids)``. Errors name the command-line flag to fix."""
    from soco_d2.data.image_list import default_coco_image_root, list_images

    if not os.path.isfile(json_file):
        raise DemoError(f"{flag} {json_file!r} does not exist: give the path of a COCO instances json.")
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DemoError(f"{flag} {json_file!r} is not valid JSON ({e}).") from None
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise DemoError(f"{flag} {json_file!r} is not a COCO instances json: it lacks the "
                        f"list(s) {missing}.")
    if not data["categories"]:
        raise DemoError(f"{flag} {json_file!r} has no categories.")
    if not any(a.get("segmentation") for a in data["annotations"]):
        raise DemoError(f"{flag} {json_file!r} has no annotation with a 'segmentation': Mask R-CNN "
                        "needs instance masks (polygons or RLE).")
    root = image_root or default_coco_image_root(json_file)
    images_flag = flag.replace("json", "images")
    if not os.path.isdir(root):
        raise DemoError(f"{images_flag} {root!r} is not a folder: give the folder holding the "
                        f"images of {json_file!r}.")
    try:
        images = list_images(json_file, image_root=root)
    except (FileNotFoundError, ValueError) as e:
        raise DemoError(f"{flag} {json_file!r} with images in {root!r}: {e} (set {images_flag}).") from None
    return root, len(images), sorted(int(c["id"]) for c in data["categories"])


def prepare_data(settings: DemoSettings, say=print) -> DemoData:
    """The synthetic data set (written under ``output_dir/data``) or the user's, checked."""
    s = settings
    user = [s.train_json, s.train_images, s.val_json, s.val_images]
    if s.train_json is None:
        if any(user):
            raise DemoError("--train-images, --val-json and --val-images need --train-json (your "
                            "training annotations); leave all four out for the synthetic data set.")
        if s.num_train_images < 2 or s.num_val_images < 1 or s.image_size < 32:
            raise DemoError("The synthetic data set needs at least 2 training images, 1 validation "
                            f"image and an image size of 32 px (got {s.num_train_images}, "
                            f"{s.num_val_images}, {s.image_size}).")
        from soco_d2.data.synthetic import CATEGORIES, make_synthetic_coco

        root = os.path.join(s.output_dir, "data")
        train_json, train_images = make_synthetic_coco(root, s.num_train_images, s.image_size,
                                                       s.seed, "train")
        val_json, val_images = make_synthetic_coco(root, s.num_val_images, s.image_size,
                                                   s.seed + 1, "val")
        say(f"    synthetic shapes ({', '.join(c['name'] for c in CATEGORIES)}): "
            f"{s.num_train_images} train + {s.num_val_images} val images of {s.image_size} px in {root}")
        return DemoData(train_json, train_images, val_json, val_images,
                        s.pretrain_images or train_images, len(CATEGORIES),
                        s.num_train_images, s.num_val_images, synthetic=True)
    if s.val_json is None:
        raise DemoError("--train-json needs --val-json too: the demo evaluates on a labelled "
                        "validation set (it may be a small held-out part of your data).")
    train_images, n_train, train_cats = check_coco_data(s.train_json, s.train_images, "--train-json")
    val_images, n_val, val_cats = check_coco_data(s.val_json, s.val_images, "--val-json")
    if set(val_cats) - set(train_cats):
        raise DemoError(f"--val-json has category ids {sorted(set(val_cats) - set(train_cats))} that "
                        f"--train-json lacks ({train_cats}); both must use the same categories.")
    pretrain = s.pretrain_images or _training_image_list(s.train_json, train_images, s.output_dir)
    if s.pretrain_images and not os.path.exists(s.pretrain_images):
        raise DemoError(f"--pretrain-images {s.pretrain_images!r} does not exist: give a folder, a "
                        ".txt list of image paths or a COCO json.")
    say(f"    your data: {n_train} train images ({s.train_json}), {n_val} val images "
        f"({s.val_json}), {len(train_cats)} categories")
    return DemoData(os.path.abspath(s.train_json), train_images, os.path.abspath(s.val_json),
                    val_images, pretrain, len(train_cats), n_train, n_val, synthetic=False)


def _training_image_list(train_json: str, image_root: str, output_dir: str) -> str:
    """A ``.txt`` list of the training json's images: the unlabeled pretraining set when the
    user names none (the image folder may hold other images too, e.g. the validation ones)."""
    with open(train_json) as f:
        names = [im["file_name"] for im in json.load(f)["images"]]
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "pretrain_images.txt")
    with open(path, "w") as f:
        f.writelines(os.path.join(os.path.abspath(image_root), n) + "\n" for n in names)
    return path


# ------------------------------------------------------------------------------------------------
# 3. - 5. Pretraining, conversion, fine-tuning
# ------------------------------------------------------------------------------------------------


def _load_config(path: str, flag: str, overrides: Sequence[str]):
    """The config at ``path`` on the pretraining or, for ``--finetune-config``, the fine-tuning defaults."""
    from soco_d2.config import get_cfg, get_finetune_cfg, load_config

    if not os.path.isfile(path):
        raise DemoError(f"{flag} {path!r} does not exist (the demo configs live in configs/demo/ "
                        "of a source checkout).")
    defaults = get_finetune_cfg if flag == "--finetune-config" else get_cfg
    return load_config(path, list(overrides), freeze=False, defaults=defaults)


def probe_folders(s: DemoSettings, data: DemoData, say=print) -> Optional[Tuple[str, str]]:
    """Labelled folders for the kNN monitor: object crops of the training json (train side) and
    of the validation json (val side), one sub-folder per category. None (probe off, said why)
    when fewer than two categories have crops on both sides, e.g. one-class data."""
    from soco_d2.evaluation.knn import write_object_crops

    root = os.path.join(s.output_dir, "probe")
    train = write_object_crops(data.train_json, data.train_images, os.path.join(root, "train"),
                               PROBE_CROPS_PER_CLASS)
    val = write_object_crops(data.val_json, data.val_images, os.path.join(root, "val"),
                             PROBE_CROPS_PER_CLASS)
    both = sorted(set(train) & set(val))
    if len(both) < 2:
        say(f"    kNN probe off: {len(both)} category with object crops in both jsons; it needs 2.")
        return None
    say(f"    kNN probe: object crops of {len(both)} categories, {sum(train.values())} train / "
        f"{sum(val.values())} val in {root}")
    return os.path.join(root, "train"), os.path.join(root, "val")


def _pretrain_config(s: DemoSettings, data: DemoData, proposals: str, budget: Budget,
                     probe: Optional[Tuple[str, str]]):
    cfg = _load_config(s.pretrain_config, "--pretrain-config", s.pretrain_opts)
    cfg.DATASETS.PRETRAIN.NAME = ""
    cfg.DATASETS.PRETRAIN.IMAGE_ROOT = data.pretrain_images
    cfg.DATASETS.PRETRAIN.PROPOSALS = proposals
    cfg.SOLVER.MAX_ITER = budget.pretrain_iters
    cfg.SEED = s.seed
    cfg.OUTPUT_DIR = os.path.join(s.output_dir, "pretrain")
    if probe:
        cfg.MONITOR.KNN.ENABLED = True
        cfg.MONITOR.KNN.TRAIN_ROOT, cfg.MONITOR.KNN.VAL_ROOT = probe
        cfg.MONITOR.KNN.PERIOD = -(-budget.pretrain_iters // budget.knn_points)  # the last point: the end
        cfg.MONITOR.KNN.IMAGE_SIZE = max(16, cfg.INPUT.SOCO.VIEW1_SIZE)  # the scale SoCo trains at
        # BN statistics of the probe images at every point: iteration 0 is the random init as
        # the same kind of function as the later points (a new network's BN is an identity)
        cfg.MONITOR.KNN.BN_STATS = "train"
        cfg.merge_from_list(list(s.pretrain_opts))  # the user's overrides win
    cfg.freeze()
    return cfg


def _pretrain(cfg, resume: bool = False) -> str:
    import soco_d2.data  # noqa: F401  (registers the view mappers)
    import soco_d2.modeling  # noqa: F401  (registers the meta-architectures)
    from soco_d2.engine.trainer import PretrainTrainer

    trainer = PretrainTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return os.path.join(cfg.OUTPUT_DIR, "model_final.pth")


def knn_curve(rows: List[Dict]) -> Dict[str, Dict[int, float]]:
    """``{feature: {iteration: kNN top-1}}`` from the pretraining ``metrics.json`` rows."""
    out: Dict[str, Dict[int, float]] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("knn_") and k.endswith("_top1"):
                out.setdefault(k[4:-5], {})[r["iteration"]] = v
    return out


def format_knn_curve(curve: Dict[str, Dict[int, float]]) -> str:
    its = sorted({i for c in curve.values() for i in c})
    lines = [f"{'iteration':<10}" + "".join(f"{i:>7}" for i in its)]
    for name, c in curve.items():
        lines.append(f"{name:<10}" + "".join(f"{c[i]:>7.1f}" if i in c else f"{'':>7}" for i in its))
    return "\n".join(lines)


def knn_verdict(curve: Dict[str, Dict[int, float]], num_val: int) -> str:
    """One sentence on what the kNN curve shows (res5 features of the backbone), judged against the
    sampling noise of ``num_val`` validation images: a gain counts as learning only above two
    binomial standard errors of the iteration-0 accuracy."""
    from soco_d2.evaluation.knn import sampling_noise

    c = curve.get("res5") or next(iter(curve.values()))
    first, last = c[min(c)], c[max(c)]
    noise = sampling_noise(first, num_val)
    seen = (f"kNN top-1 {first:.1f}% at iteration 0 -> {last:.1f}% at iteration {max(c)}, "
            f"{num_val} validation images")
    if last - first > noise:
        return (f"the pretrained backbone separates the object classes better than its random "
                f"initialisation ({seen}; the gain is above the {noise:.1f}-point sampling noise), "
                f"so SoCo learned something from these images")
    trend = "rose by less than" if last > first else "did not rise; compare with"
    return (f"the kNN probe {trend} its {noise:.1f}-point sampling noise (two standard "
            f"errors; {seen}): this run does not show that SoCo learned. That is expected at a "
            f"demo's scale: in the longest CPU runs measured (600 iterations, 3 seeds, "
            f"BENCHMARKS.md, 'Learning') SoCo's kNN stayed within its noise too; SoCo needs "
            f"GPU-scale pretraining (hundreds of epochs of ImageNet) to show its gain")


def probe_command(cfg, checkpoint: str) -> str:
    """The ``tools/probe.py`` command that probes ``checkpoint`` as the pretraining's kNN monitor
    did (same crops, image size, BN statistics, k and temperature)."""
    k = cfg.MONITOR.KNN
    return (f"python tools/probe.py --weights {checkpoint} --random-init --depth {cfg.MODEL.RESNETS.DEPTH} "
            f"--train-root {k.TRAIN_ROOT} --val-root {k.VAL_ROOT} --image-size {k.IMAGE_SIZE} "
            f"--bn-stats {k.BN_STATS} --k {k.K} --temperature {k.TEMPERATURE}")


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _count_files(folder: str) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def _register_datasets(data: DemoData) -> Tuple[str, str]:
    from soco_d2.finetune import register_coco_instances

    # Names carry the paths, so several demos in one process never collide.
    train = f"demo_train:{data.train_json}:{data.train_images}"
    val = f"demo_val:{data.val_json}:{data.val_images}"
    register_coco_instances(train, data.train_json, data.train_images)
    register_coco_instances(val, data.val_json, data.val_images)
    return train, val


def backbone_init_check(model: torch.nn.Module, pretrained: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """How many ResNet tensors of a detector equal those of the pretrained online backbone
    (``backbone.body.*`` in both; BN ``num_batches_tracked`` left out)."""
    own = {k: v for k, v in model.state_dict().items()
           if k.startswith("backbone.body.") and not k.endswith("num_batches_tracked")}
    equal = sum(1 for k, v in own.items()
                if k in pretrained and pretrained[k].shape == v.shape and torch.equal(pretrained[k], v))
    return {"tensors": len(own), "equal_to_pretrained": equal}


def _finetune(s: DemoSettings, data: DemoData, datasets: Tuple[str, str], weights: str,
              out: str, iters: int, pretrained: Dict[str, torch.Tensor]) -> Dict:
    from soco_d2.finetune.trainer import FinetuneTrainer

    cfg = _load_config(s.finetune_config, "--finetune-config", s.finetune_opts)
    cfg.DATASETS.TRAIN = (datasets[0],)
    cfg.DATASETS.TEST = (datasets[1],)
    cfg.MODEL.NUM_CLASSES = data.num_classes
    cfg.MODEL.WEIGHTS = weights
    cfg.SOLVER.MAX_ITER = iters
    cfg.SEED = s.seed
    cfg.OUTPUT_DIR = out
    cfg.freeze()
    trainer = FinetuneTrainer(cfg)
    trainer.resume_or_load(resume=s.resume)
    # The check of the initial weights needs iteration 0 (a resumed run starts later); the
    # record of the first start is kept.
    init_file = os.path.join(out, "backbone_init.json")
    if trainer.start_iter == 0:
        init = backbone_init_check(trainer.model, pretrained)
        with open(init_file, "w") as f:
            json.dump(init, f)
    else:
        with open(init_file) as f:
            init = json.load(f)
    results = trainer.train()
    from soco_d2.evaluation.coco_evaluation import flatten_results

    return {"output_dir": out, "weights": weights, "iterations": iters,
            "backbone_init": init, "metrics": flatten_results(results)}


# ------------------------------------------------------------------------------------------------
# 6. Report
# ------------------------------------------------------------------------------------------------


def _json_safe(obj):
    """NaN / inf (COCO's AP of an absent object size) as null, so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.2f}"


def format_ap_table(soco: Dict[str, float], scratch: Dict[str, float]) -> str:
    """AP rows (APbb, APbb50, ..., APmk, ...) for both runs and their difference, in AP points.
    Metrics a run lacks, or NaN ones (no object of that size in the val set), print as n/a."""
    lines = [f"{'metric':<9}{'SoCo pretrained':>17}{'scratch':>10}{'delta':>9}", "-" * 45]
    for label, key in TABLE_ROWS:
        a, b = soco.get(key), scratch.get(key)
        if a is None and b is None:
            continue
        both = a is not None and b is not None and math.isfinite(a) and math.isfinite(b)
        delta = f"{a - b:+.2f}" if both else "n/a"
        lines.append(f"{label:<9}{_fmt(a):>17}{_fmt(b):>10}{delta:>9}")
    return "\n".join(lines)


def plot_curves(pretrain_rows: List[Dict], runs: Dict[str, List[Dict]], path: str) -> None:
    """Left: pretraining loss per iteration. Right: fine-tuning loss of each run and, on a second
    axis, its box / mask AP at every evaluation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    rows = [r for r in pretrain_rows if "total_loss" in r]
    left.plot([r["iteration"] for r in rows], [r["total_loss"] for r in rows], "o-", color="tab:purple",
              markersize=3)
    left.set(title="SoCo pretraining", xlabel="iteration", ylabel="loss (negative cosine similarity)")
    left.grid(alpha=0.3)
    ap_axis = right.twinx()
    colours = {"SoCo pretrained": "tab:blue", "scratch": "tab:orange"}
    for name, run in runs.items():
        c = colours.get(name, None)
        loss = [r for r in run if "total_loss" in r]
        right.plot([r["iteration"] for r in loss], [r["total_loss"] for r in loss], "-", color=c,
                   label=f"{name}: loss")
        for key, style in (("bbox/AP", "s--"), ("segm/AP", "^:")):
            ev = [r for r in run if key in r]
            if ev:
                ap_axis.plot([r["iteration"] for r in ev], [r[key] for r in ev], style, color=c,
                             markersize=7, label=f"{name}: {key}")
    right.set(title="Mask R-CNN fine-tuning", xlabel="iteration", ylabel="loss")
    ap_axis.set_ylabel("AP (points)")
    right.grid(alpha=0.3)
    handles = right.get_legend_handles_labels()
    extra = ap_axis.get_legend_handles_labels()
    right.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, ncol=2,
                 loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    fig.savefig(path)


_FOOTER = """\
Note: {n_train} training / {n_val} validation images and minutes of CPU training make these APs
noisy (one image more or less moves them by points); either run can come out ahead, and the
numbers say nothing about SoCo at scale. Real numbers need SoCo pretraining on ImageNet and
fine-tuning on COCO: see README ("Quick start" and the sections after it), docs/TRAINING.md and
docs/TRANSFER.md."""


# ------------------------------------------------------------------------------------------------
# The whole demo
# ------------------------------------------------------------------------------------------------


_SETTINGS_FILE = "demo_settings.json"


def _settings_record(s: DemoSettings) -> Dict:
    """The settings that decide the demo's outputs (what ``--resume`` must find unchanged)."""
    return {k: v for k, v in asdict(s).items() if k not in ("overwrite", "resume", "progress", "workers")}


def _prepare_output_dir(s: DemoSettings) -> None:
    present = [n for n in _OUTPUTS if os.path.exists(os.path.join(s.output_dir, n))]
    record = os.path.join(s.output_dir, _SETTINGS_FILE)
    if s.resume:
        if s.overwrite:
            raise DemoError("--resume continues the demo in --output-dir, --overwrite replaces it: pass one.")
        if not os.path.isfile(record):
            raise DemoError(f"--resume: {s.output_dir!r} holds no demo to continue (no {_SETTINGS_FILE}); "
                            "run without --resume.")
        with open(record) as f:
            before = json.load(f)
        now = json.loads(json.dumps(_settings_record(s)))
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if changed:
            raise DemoError(f"--resume: the demo in {s.output_dir!r} ran with other settings ("
                            + ", ".join(f"{k}: {before.get(k)!r} then, {now.get(k)!r} now" for k in changed)
                            + "); continue it with the same options, or start a new one.")
        return
    if present and not s.overwrite:
        raise DemoError(f"--output-dir {s.output_dir!r} already holds demo outputs ({', '.join(present)}): "
                        "choose a new folder or pass --overwrite to replace them.")
    for name in present:
        path = os.path.join(s.output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    os.makedirs(s.output_dir, exist_ok=True)
    with open(record, "w") as f:
        json.dump(_settings_record(s), f, indent=2)


def run_demo(settings: DemoSettings, stream: TextIO = None) -> Dict:
    """Run every stage; returns the summary also written to ``output_dir/demo_summary.json``."""
    from soco_d2.engine.writers import setup_logging

    s = settings
    stream = stream or sys.stdout

    def say(msg: str = "") -> None:
        print(msg, file=stream, flush=True)

    # Fail on a bad config, override or user data set before anything is written or trained.
    _load_config(s.pretrain_config, "--pretrain-config", s.pretrain_opts)
    _load_config(s.finetune_config, "--finetune-config", s.finetune_opts)
    user_data = any([s.train_json, s.train_images, s.val_json, s.val_images])
    stages: Dict[str, float] = {}
    stages_cpu: Dict[str, float] = {}  # CPU seconds of this process and its children, per stage
    total_start, total_cpu_start = time.perf_counter(), _cpu_seconds()
    steps = 6
    budget: Optional[Budget] = None

    def stage(i: int, key: str, title: str):
        say(f"\n==> [{i}/{steps}] {title}")
        return key, time.perf_counter(), _cpu_seconds()

    def done(token) -> None:
        key, start, cpu_start = token
        stages[key] = round(time.perf_counter() - start, 2)
        stages_cpu[key] = round(_cpu_seconds() - cpu_start, 2)
        line = f"    ({key}: {stages[key]:.1f} s, CPU {stages_cpu[key]:.1f} s"
        if budget is not None:
            line += (f"; {(time.perf_counter() - total_start) / 60:.1f} min so far, about "
                     f"{eta_seconds(budget.projected, stages) / 60:.1f} min left")
        say(line + ")")

    t = stage(1, "data", "Data")
    data = prepare_data(s, say) if user_data else None
    _prepare_output_dir(s)
    setup_logging(s.output_dir)  # the trainers' logs of every stage go to output_dir/log.txt
    data = data or prepare_data(s, say)
    from soco_d2.data.image_list import list_images

    try:
        images = list_images(data.pretrain_images)
    except (FileNotFoundError, ValueError) as e:
        raise DemoError(f"pretraining images: {e}") from None
    probe = probe_folders(s, data, say)
    budget = plan_budget(s.minutes, len(images), data.num_val,
                         sum(_count_files(p) for p in probe) if probe else 0,
                         s.pretrain_iters, s.finetune_iters)
    say(f"    plan: {budget.pretrain_iters} pretraining iterations"
        + (f" with {budget.knn_points + 1} kNN probes" if probe else "")
        + f", 2 x {budget.finetune_iters} fine-tuning iterations; projected {budget.total / 60:.1f} min "
          f"on 2 idle CPU cores ({machine_load()})")
    done(t)

    t = stage(2, "proposals", "Selective-search proposals of the unlabeled pretraining images")
    from soco_d2.data.selective_search import run_generation

    proposals = os.path.join(s.output_dir, "proposals.socoprop")
    gen = run_generation(images, proposals, workers=s.workers, progress=s.progress,
                         resume=s.resume)
    say(f"    {gen.format()}")
    done(t)

    t = stage(3, "pretrain", f"SoCo pretraining: {budget.pretrain_iters} iterations "
                             f"({os.path.relpath(s.pretrain_config)})")
    pretrain_cfg = _pretrain_config(s, data, proposals, budget, probe)
    from soco_d2.data.visualize import write_view_sheets

    sheets = write_view_sheets(pretrain_cfg, data.pretrain_images, os.path.join(s.output_dir, "views"),
                               num_images=1, seed=s.seed, proposals_file=proposals)
    say(f"    what SoCo trains on (proposals, views, boxes; colour = proposal id): {sheets[0]}")
    checkpoint = _pretrain(pretrain_cfg, resume=s.resume)
    pretrain_rows = read_metrics(os.path.join(s.output_dir, "pretrain", "metrics.json"))
    losses = [r for r in pretrain_rows if "total_loss" in r]
    say(f"    loss {_fmt(losses[0]['total_loss'])} -> {_fmt(losses[-1]['total_loss'])};"
        f" checkpoint {checkpoint}")
    curve = knn_curve(pretrain_rows)
    if curve:
        say("    kNN top-1 (%) of the object crops during pretraining:\n"
            + "\n".join("      " + line for line in format_knn_curve(curve).splitlines()))
    done(t)

    t = stage(4, "convert", "Conversion of the online network (backbone, FPN, box head) to detectron2 .pkl")
    from soco_d2.checkpoint import convert_to_d2, save_d2_pkl

    d2, report = convert_to_d2(checkpoint)
    converted = os.path.join(s.output_dir, "soco_converted.pkl")
    save_d2_pkl(d2, converted)
    say(f"    {len(report.mapped)} tensors mapped, {len(report.dropped)} dropped (target network, "
        f"projector, predictor) -> {converted}")
    done(t)

    pretrained = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    datasets = _register_datasets(data)
    runs = {}
    t = stage(5, "finetune", f"Mask R-CNN fine-tuning + COCO evaluation, {budget.finetune_iters} iterations "
                             f"each ({os.path.relpath(s.finetune_config)})")
    for key, name, weights in (("soco", "SoCo pretrained", converted), ("scratch", "scratch", "")):
        say(f"\n    --- from {'the SoCo weights' if weights else 'random initialisation'} "
            f"-> finetune_{key}/")
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        runs[key] = _finetune(s, data, datasets, weights, os.path.join(s.output_dir, f"finetune_{key}"),
                              budget.finetune_iters, pretrained)
        stages[f"finetune_{key}"] = round(time.perf_counter() - start, 2)
        stages_cpu[f"finetune_{key}"] = round(_cpu_seconds() - cpu_start, 2)
        init = runs[key]["backbone_init"]
        say(f"    backbone tensors equal to the pretrained ones at iteration 0: "
            f"{init['equal_to_pretrained']}/{init['tensors']}; ({stages[f'finetune_{key}']:.1f} s)")
    soco_init = runs["soco"]["backbone_init"]
    if soco_init["equal_to_pretrained"] != soco_init["tensors"]:
        raise RuntimeError(f"The SoCo weights did not load into the detector's backbone "
                           f"({soco_init['equal_to_pretrained']} of {soco_init['tensors']} tensors equal).")
    done(t)

    t = stage(6, "report", "Results")
    curves = os.path.join(s.output_dir, "demo_curves.png")
    plot_curves(pretrain_rows, {
        "SoCo pretrained": read_metrics(os.path.join(runs["soco"]["output_dir"], "metrics.json")),
        "scratch": read_metrics(os.path.join(runs["scratch"]["output_dir"], "metrics.json")),
    }, curves)
    table = format_ap_table(runs["soco"]["metrics"], runs["scratch"]["metrics"])
    stages["report"] = round(time.perf_counter() - t[1], 2)
    stages_cpu["report"] = round(_cpu_seconds() - t[2], 2)
    total = round(time.perf_counter() - total_start, 2)
    total_cpu = round(_cpu_seconds() - total_cpu_start, 2)
    summary = {
        "settings": asdict(s),
        "data": asdict(data),
        "proposals": {"path": proposals, "images": gen.images_done, "boxes_mean": gen.boxes_mean,
                      "unreadable": len(gen.unreadable)},
        "pretrain": {"output_dir": os.path.dirname(checkpoint), "checkpoint": checkpoint,
                     "iterations": budget.pretrain_iters,
                     "first_loss": losses[0]["total_loss"],
                     "last_loss": losses[-1]["total_loss"],
                     "knn_top1": {k: {str(i): v for i, v in c.items()} for k, c in curve.items()},
                     "view_sheet": sheets[0]},
        "converted": {"path": converted, "mapped": len(report.mapped), "dropped": len(report.dropped)},
        "finetune": runs,
        "curves": curves,
        "budget": {"minutes": s.minutes, "pretrain_iters": budget.pretrain_iters,
                   "finetune_iters": budget.finetune_iters, "knn_points": budget.knn_points,
                   "projected_seconds": {k: round(v, 2) for k, v in budget.projected.items()},
                   "projected_total_seconds": round(budget.total, 2)},
        "stage_seconds": stages,
        "stage_cpu_seconds": stages_cpu,
        "knn_probe_seconds": round(sum(r.get("knn_time", 0.0) for r in pretrain_rows), 2),
        "total_cpu_seconds": total_cpu,
        "total_seconds": total,
    }
    with open(os.path.join(s.output_dir, "demo_summary.json"), "w") as f:
        json.dump(_json_safe(summary), f, indent=2)
    say(f"\nCOCO AP on {data.num_val} validation images after {budget.finetune_iters} fine-tuning "
        f"iterations (AP points):\n")
    say(table)
    if curve:
        say(f"\nkNN top-1 (%) of the pretrained backbone on object crops (weighted kNN, k = 20), "
            f"by pretraining iteration (0 = random initialisation):\n")
        say(format_knn_curve(curve))
        verdict = knn_verdict(curve, _count_files(probe[1]))
        say(f"\nWhat this run shows: {verdict}. What it does not show: how SoCo "
            f"transfers; that needs far longer pretraining on far more images.")
        say("\nThe same probe on the final checkpoint (its random-init row is another draw than "
            "iteration 0 above):\n  " + probe_command(pretrain_cfg, checkpoint))
    else:
        say("\nWhat this run shows: the whole chain runs on your data. What it does not show: "
            "whether SoCo learned (no kNN probe: it needs two categories) or how it transfers.")
    say("\n" + _FOOTER.format(n_train=data.num_train, n_val=data.num_val))
    say(f"\nCurves: {curves}\nSummary: {os.path.join(s.output_dir, 'demo_summary.json')}")
    say("Stage times (wall / CPU): " + ", ".join(f"{k} {v:.0f} / {stages_cpu.get(k, 0):.0f} s"
                                                 for k, v in stages.items())
        + f"; total {total / 60:.1f} / {total_cpu / 60:.1f} min")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True, help="folder for every output of the demo")
    data = p.add_argument_group("your own data (default: a synthetic shapes data set)")
    data.add_argument("--train-json", help="COCO instances json of the fine-tuning training set")
    data.add_argument("--train-images", help="its image folder (default: found next to the json)")
    data.add_argument("--val-json", help="COCO instances json of the evaluation set")
    data.add_argument("--val-images", help="its image folder (default: found next to the json)")
    data.add_argument("--pretrain-images", help="unlabeled pretraining images: a folder, a .txt list "
                      "or a COCO json (default: the training images)")
    p.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                   help="the run's length in minutes on 2 idle CPU cores (default %(default)s); the "
                        "iterations are planned to fill it and the projection is printed before "
                        "training. Longer runs give less noisy AP")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, pretraining and both fine-tunings")
    synth = p.add_argument_group("synthetic data set")
    synth.add_argument("--num-train-images", type=int, default=160)
    synth.add_argument("--num-val-images", type=int, default=40)
    synth.add_argument("--image-size", type=int, default=128)
    adv = p.add_argument_group("advanced")
    adv.add_argument("--pretrain-iters", type=int, help="pretraining iterations (overrides --minutes)")
    adv.add_argument("--finetune-iters", type=int, help="fine-tuning iterations per run (overrides --minutes)")
    adv.add_argument("--workers", type=int, help="proposal processes (default: every usable core)")
    adv.add_argument("--pretrain-config", default=DEFAULT_PRETRAIN_CONFIG)
    adv.add_argument("--finetune-config", default=DEFAULT_FINETUNE_CONFIG)
    adv.add_argument("--pretrain-opts", nargs="+", default=[], metavar="KEY VALUE",
                     help="config overrides for pretraining, e.g. SOLVER.IMS_PER_BATCH 16")
    adv.add_argument("--finetune-opts", nargs="+", default=[], metavar="KEY VALUE",
                     help="config overrides for fine-tuning, e.g. TEST.EVAL_PERIOD 20")
    adv.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier demo")
    adv.add_argument("--resume", action="store_true",
                     help="continue a stopped demo in --output-dir (same options): finished stages "
                          "are reused, the others continue from their last checkpoint")
    adv.add_argument("--no-progress", action="store_true", help="no progress bar for the proposals")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = DemoSettings(
        output_dir=args.output_dir, train_json=args.train_json, train_images=args.train_images,
        val_json=args.val_json, val_images=args.val_images, pretrain_images=args.pretrain_images,
        minutes=args.minutes, seed=args.seed, num_train_images=args.num_train_images,
        num_val_images=args.num_val_images, image_size=args.image_size,
        pretrain_iters=args.pretrain_iters, finetune_iters=args.finetune_iters, workers=args.workers,
        pretrain_config=args.pretrain_config, finetune_config=args.finetune_config,
        pretrain_opts=args.pretrain_opts, finetune_opts=args.finetune_opts,
        overwrite=args.overwrite, resume=args.resume, progress=not args.no_progress,
    )
    try:
        run_demo(settings)
    except (DemoError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
