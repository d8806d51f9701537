#!/usr/bin/env python
"""Do SoCo and DetCo learn? kNN curves over pretraining, against random init, over seeds; then
Mask R-CNN fine-tuning from each method's weights and from scratch at equal budget.

Data (``--data-root``, default ``$SOCO_DATA_ROOT``; see its DATA.md): the unlabeled images of
``coco_mini/{train,val}2017``, ``pennfudan/PNGImages`` and ``caltech101_subset`` for pretraining;
``caltech101_subset`` (100 classes, split per class) for the kNN probe; Penn-Fudan for
fine-tuning. Every size is a flag, so the same script runs the reduced CPU version recorded in
BENCHMARKS.md and a longer GPU version::

    python benchmarks/bench_learning.py --output-dir output/bench_learning \\
        --methods soco detco --seeds 0 1 2 --iters 300 --probe-period 50 --finetune-iters 0
    # on a GPU, R50, longer:
    python benchmarks/bench_learning.py --output-dir output/bench_learning_r50 --device cuda \\
        --depth 50 --iters 5000 --probe-period 500 --probe-size 112 \\
        --soco-opts INPUT.SOCO.VIEW1_SIZE 224 INPUT.SOCO.VIEW2_SIZE 224 INPUT.SOCO.VIEW3_SIZE 112 \\
        --finetune-iters 1000

Per method and seed, pretraining runs ``configs/benchmark/<method>_r18_learning_cpu.yaml`` (the
reproduction recipes, CPU-sized) with the kNN monitor (k = 20, T = 0.07) at iteration 0 (the
model's own random init), every ``--probe-period`` iterations and at the end. The table gives
mean and std over seeds at each probe point; the target (per method) is a final kNN top-1 above
the iteration-0 value by more than 3 x the std over seeds. Writes ``OUTPUT_DIR/summary.json``,
``OUTPUT_DIR/learning_curves.png`` and prints a Markdown table, with how far each run moved the
backbone's weights (relative change per stage from its initialisation).
"""
import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CONFIGS = {"soco": os.path.join(REPO, "configs", "benchmark", "soco_r18_learning_cpu.yaml"),
           "detco": os.path.join(REPO, "configs", "benchmark", "detco_r18_learning_cpu.yaml")}
FINETUNE_CONFIG = os.path.join(REPO, "configs", "finetune", "mask_rcnn_R18_FPN_pennfudan_cpu.yaml")
PRETRAIN_FOLDERS = ("coco_mini/train2017", "coco_mini/val2017", "pennfudan/PNGImages", "caltech101_subset")
PROBE_FOLDER = "caltech101_subset"
STAGES = ("stem", "res2", "res3", "res4", "res5")


def _pretrain_list(data_root: str, out: str) -> str:
    from soco_d2.data.image_list import list_images

    paths = []
    for folder in PRETRAIN_FOLDERS:
        images = list_images(os.path.join(data_root, folder))
        paths += [images.path(i) for i in range(len(images))]
    path = os.path.join(out, "pretrain_images.txt")
    with open(path, "w") as f:
        f.writelines(p + "\n" for p in paths)
    return path


def _proposals(image_list: str, out: str) -> str:
    from soco_d2.data.image_list import list_images
    from soco_d2.data.selective_search import run_generation

    path = os.path.join(out, "proposals.socoprop")
    if not os.path.exists(path):  # the same for every seed and run
        gen = run_generation(list_images(image_list), path, workers=1, progress=False)
        print(f"proposals: {gen.format()}", flush=True)
    return path


def _run_tool(tool: str, config: str, opts) -> None:
    """One training in its own process (tools/pretrain_net.py or tools/train_net.py): runs do not
    share OpenCV / OpenMP thread pools or loader workers forked from a process that used them."""
    import subprocess

    cmd = [sys.executable, os.path.join(REPO, "tools", tool), "--config-file", config,
           "--num-gpus", "1"] + [str(o) for o in opts]
    subprocess.run(cmd, check=True)


def _pretrain(args, method: str, seed: int, image_list: str, proposals: str) -> str:
    out = os.path.join(args.output_dir, f"{method}_seed{seed}")
    opts = [
        "MODEL.DEVICE", args.device, "MODEL.RESNETS.DEPTH", args.depth, "SEED", seed,
        "SOLVER.MAX_ITER", args.iters, "SOLVER.IMS_PER_BATCH", args.batch,
        "DATASETS.PRETRAIN.IMAGE_ROOT", image_list, "OUTPUT_DIR", out,
        "MONITOR.KNN.ENABLED", True, "MONITOR.KNN.TRAIN_ROOT", os.path.join(args.data_root, PROBE_FOLDER),
        "MONITOR.KNN.PERIOD", args.probe_period, "MONITOR.KNN.IMAGE_SIZE", args.probe_size,
        "MONITOR.KNN.MAX_PER_CLASS", args.probe_max_per_class, "MONITOR.KNN.BN_STATS", args.bn_stats,
    ]
    if method == "soco":
        opts += ["DATASETS.PRETRAIN.PROPOSALS", proposals] + args.soco_opts
    else:
        opts += args.detco_opts
    if os.path.exists(os.path.join(out, "model_final.pth")) and not args.overwrite:
        print(f"{out}: done before, reusing (--overwrite to rerun)", flush=True)
        return out
    if os.path.exists(os.path.join(out, "metrics.json")):
        os.remove(os.path.join(out, "metrics.json"))  # a rerun starts its curve afresh
    _run_tool("pretrain_net.py", CONFIGS[method], opts)
    return out


def _knn_curve(run_dir: str, key: str):
    from soco_d2.engine.writers import read_metrics

    return {r["iteration"]: r[key] for r in read_metrics(os.path.join(run_dir, "metrics.json")) if key in r}


def _weight_change(run_dir: str) -> dict:
    """How far pretraining moved the online ResNet: per stage (stem, res2-res5), the relative L2
    change ||W_final - W_init|| / ||W_init|| over its convolution weights. The initialisation is
    rebuilt from the run's ``config.yaml`` and ``SEED``, as the trainer built it (one process:
    the seed of rank 0). A wrong rebuild shows as a change near sqrt(2), two independent inits."""
    import torch

    import soco_d2.modeling  # noqa: F401  (registers the meta-architectures)
    from soco_d2.checkpoint import convert_to_d2
    from soco_d2.config import load_config
    from soco_d2.engine.run_setup import seed_all
    from soco_d2.modeling import build_model

    cfg = load_config(os.path.join(run_dir, "config.yaml"), [])
    seed_all(cfg.SEED)
    init, _ = convert_to_d2(build_model(cfg).state_dict(), parts=("backbone",))
    final, _ = convert_to_d2(os.path.join(run_dir, "model_final.pth"), parts=("backbone",))
    sums = {}
    for name, w0 in init.items():
        if w0.ndim < 4:  # convolution kernels only; BN parameters have their own (plain SGD) steps
            continue
        w0, w1 = torch.as_tensor(w0, dtype=torch.float64), torch.as_tensor(final[name], dtype=torch.float64)
        acc = sums.setdefault(name.split(".")[0], [0.0, 0.0])
        acc[0] += float((w1 - w0).square().sum())
        acc[1] += float(w0.square().sum())
    return {stage: (d / n) ** 0.5 for stage, (d, n) in sums.items()}


def _mean_std(values):
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _target(first: dict, last: dict, num_points: int, num_seeds: int):
    """``(gain, met)``: the mean gain from the first to the last probe point and whether it
    exceeds 3 x the larger std over seeds of the two; ``met`` is None with one seed (no std)."""
    gain = last["mean"] - first["mean"]
    if num_seeds < 2:
        return gain, None
    return gain, num_points > 1 and gain > 3 * max(last["std"], first["std"])


def _finetune(args, name: str, weights: str, seed: int) -> dict:
    """One Penn-Fudan fine-tuning; its final evaluation. A finished run with the same command is
    reused (``result.json`` in its folder) unless ``--overwrite``: an interrupted benchmark
    resumes where it stopped."""
    from soco_d2.engine.writers import read_metrics

    out = os.path.join(args.output_dir, f"finetune_{name}_seed{seed}")
    opts = [str(o) for o in [
        "MODEL.DEVICE", args.device, "MODEL.RESNETS.DEPTH", args.depth, "MODEL.WEIGHTS", weights,
        "SEED", seed, "SOLVER.MAX_ITER", args.finetune_iters, "SOLVER.CHECKPOINT_PERIOD", 0,
        "SOLVER.WARMUP_ITERS", min(30, max(1, args.finetune_iters // 4)),
        "OUTPUT_DIR", out] + args.finetune_opts]
    done = os.path.join(out, "result.json")
    if os.path.exists(done) and not args.overwrite:
        with open(done) as f:
            previous = json.load(f)
        if previous["opts"] == opts:
            print(f"{out}: done before, reusing (--overwrite to rerun)", flush=True)
            return previous["result"]
    if os.path.exists(os.path.join(out, "metrics.json")):
        os.remove(os.path.join(out, "metrics.json"))  # a rerun starts its record afresh
    _run_tool("train_net.py", FINETUNE_CONFIG, opts)
    evals = [r for r in read_metrics(os.path.join(out, "metrics.json")) if "bbox/AP" in r]
    with open(done, "w") as f:
        json.dump({"opts": opts, "result": evals[-1]}, f, indent=1)
    return evals[-1]


def _plot(curves, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(curves), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (method, by_key) in zip(axes, curves.items()):
        for key, per_seed in by_key.items():
            its = sorted(set.intersection(*(set(c) for c in per_seed.values())))
            stats = [_mean_std(c[i] for c in per_seed.values()) for i in its]
            mean = [m for m, _ in stats]
            line = ax.plot(its, mean, "o-", markersize=3, label=f"{key} (mean of {len(per_seed)} seeds)")[0]
            ax.fill_between(its, [m - s for m, s in stats], [m + s for m, s in stats],
                            color=line.get_color(), alpha=0.2)
            ax.axhline(mean[0], color=line.get_color(), ls=":", lw=1,
                       label=f"{key} at iteration 0 (random init)")
        ax.set(title=f"{method}: kNN top-1 on Caltech-101 (100 classes)", xlabel="iteration",
               ylabel="top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=os.environ.get("SOCO_DATA_ROOT", ""))
    p.add_argument("--output-dir", required=True)
    p.add_argument("--methods", nargs="+", default=["soco", "detco"], choices=sorted(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--depth", type=int, default=18)
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=300, help="pretraining iterations per run")
    p.add_argument("--batch", type=int, default=16, help="pretraining images per step")
    p.add_argument("--probe-period", type=int, default=50)
    p.add_argument("--probe-size", type=int, default=64)
    p.add_argument("--probe-max-per-class", type=int, default=0)
    p.add_argument("--bn-stats", choices=("train", "weights"), default="train",
                   help="BN statistics of every probe (MONITOR.KNN.BN_STATS): recomputed over the probe's "
                        "training images (default; iteration 0 is then probed as the same kind of function as "
                        "later points), or the model's running statistics")
    p.add_argument("--soco-opts", nargs="*", default=[], metavar="KEY VALUE")
    p.add_argument("--detco-opts", nargs="*", default=[], metavar="KEY VALUE")
    p.add_argument("--finetune-iters", type=int, default=0, help="0 skips the fine-tuning stage")
    p.add_argument("--finetune-seeds", nargs="+", type=int, default=None,
                   help="default: --seeds (the pretraining run of the same seed is used)")
    p.add_argument("--finetune-opts", nargs="*", default=[], metavar="KEY VALUE")
    p.add_argument("--overwrite", action="store_true", help="rerun finished pretraining and fine-tuning runs")
    args = p.parse_args(argv)
    if not args.data_root or not os.path.isdir(os.path.join(args.data_root, PROBE_FOLDER)):
        p.error(f"--data-root {args.data_root!r} must hold {PROBE_FOLDER}/ (set SOCO_DATA_ROOT)")
    os.makedirs(args.output_dir, exist_ok=True)
    os.environ.setdefault("SOCO_DATASETS", args.data_root)  # pennfudan_train / _val
    start = time.perf_counter()
    image_list = _pretrain_list(args.data_root, args.output_dir)
    proposals = _proposals(image_list, args.output_dir) if "soco" in args.methods else ""

    runs, curves = {}, {}
    for seed in args.seeds:  # seed-major: an interrupted run still has every method
        for method in args.methods:
            t0 = time.perf_counter()
            runs[(method, seed)] = _pretrain(args, method, seed, image_list, proposals)
            print(f"{method} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    for method in args.methods:
        keys = ["knn_res5_top1"] + (["knn_box_top1"] if method == "soco" else [])
        curves[method] = {k: {s: _knn_curve(runs[(method, s)], k) for s in args.seeds} for k in keys}

    summary = {"args": vars(args), "knn": {}, "finetune": {}}
    lines = ["| method | feature | iteration | kNN top-1 mean | std | per seed |", "|---|---|---|---|---|---|"]
    for method, by_key in curves.items():
        for key, per_seed in by_key.items():
            its = sorted(set.intersection(*(set(c) for c in per_seed.values())))
            rows = {}
            for it in its:
                vals = [per_seed[s][it] for s in args.seeds]
                m, sd = _mean_std(vals)
                rows[it] = {"mean": m, "std": sd, "per_seed": vals}
                lines.append(f"| {method} | {key[4:-5]} | {it} | {m:.2f} | {sd:.2f} | "
                             + ", ".join(f"{v:.1f}" for v in vals) + " |")
            first, last = rows[its[0]], rows[its[-1]]
            gain, met = _target(first, last, len(its), len(args.seeds))
            rows["target"] = {"gain": gain, "met": met}
            summary["knn"][f"{method}/{key}"] = rows
            verdict = "n/a: one seed has no std" if met is None else ("met" if met else "NOT met")
            lines.append(f"| {method} | {key[4:-5]} | gain {its[0]} -> {its[-1]} | {gain:+.2f} | "
                         f"target (> 3 std) {verdict} | |")
    png = os.path.join(args.output_dir, "learning_curves.png")
    _plot(curves, png)
    print("\n".join(lines), flush=True)

    # Whether the optimizer moved the backbone at all, so that a flat kNN curve can be told apart
    # from weights that barely changed (e.g. LARS at a small batch).
    summary["weight_change"] = {}
    moved = ["| method | seed | " + " | ".join(STAGES) + " |", "|---|---|" + "---|" * len(STAGES)]
    for (method, seed), run_dir in runs.items():
        change = _weight_change(run_dir)
        summary["weight_change"][f"{method}/seed{seed}"] = change
        moved.append(f"| {method} | {seed} | " + " | ".join(f"{change[s]:.4f}" for s in STAGES) + " |")
    print("relative change of the backbone's convolution weights, initialisation -> final:", flush=True)
    print("\n".join(moved), flush=True)

    if args.finetune_iters > 0:
        from soco_d2.checkpoint import convert_to_d2, save_d2_pkl

        seeds = args.finetune_seeds if args.finetune_seeds is not None else args.seeds
        results = {}
        for seed in seeds:
            sources = {"scratch": ""}
            for method in args.methods:
                ckpt = os.path.join(runs[(method, seed)], "model_final.pth")
                parts = ("backbone", "fpn", "head") if method == "soco" else ("backbone",)
                d2, _ = convert_to_d2(ckpt, parts=parts)
                pkl = os.path.join(args.output_dir, f"{method}_seed{seed}.pkl")
                save_d2_pkl(d2, pkl)
                sources[method] = pkl
            for name, weights in sources.items():
                t0 = time.perf_counter()
                results.setdefault(name, {})[seed] = _finetune(args, name, weights, seed)
                print(f"fine-tuning {name} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
        ft = ["| init | APbb mean | std | APmk mean | std | per seed (APbb / APmk) |", "|---|---|---|---|---|---|"]
        for name, per_seed in results.items():
            bb = _mean_std(r["bbox/AP"] for r in per_seed.values())
            mk = _mean_std(r["segm/AP"] for r in per_seed.values())
            summary["finetune"][name] = {"bbox/AP": bb, "segm/AP": mk, "per_seed": per_seed}
            ft.append(f"| {name} | {bb[0]:.2f} | {bb[1]:.2f} | {mk[0]:.2f} | {mk[1]:.2f} | "
                      + ", ".join(f"{r['bbox/AP']:.1f} / {r['segm/AP']:.1f}" for r in per_seed.values()) + " |")
        print("\n".join(ft), flush=True)
    summary["seconds"] = time.perf_counter() - start
    summary["png"] = png
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print(f"curves: {png}; total {summary['seconds'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
