#!/usr/bin/env python
"""Where a quick-start demo's time went, against what it projected, and the stage costs it implies.

Reads a finished ``tools/demo.py`` output folder (``demo_summary.json``, the metrics of its three
trainings, ``log.txt``) and prints, per stage, the projected and measured wall seconds and the
CPU seconds, then the :class:`StageCosts` fitted from this run: the constants ``tools/demo.py``
plans budgets with were fitted this way from a run on 2 idle cores::

    python tools/demo.py --output-dir /tmp/demo_2min --minutes 2 --overwrite
    python benchmarks/bench_demo_costs.py /tmp/demo_2min
"""
import argparse
import json
import os
import re
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from soco_d2.engine.writers import read_metrics  # noqa: E402


def _demo_tool():
    """tools/demo.py as a module (its StageCosts)."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import demo

    return demo


def _mean_iter_time(rows):
    return statistics.fmean(r["iter_time"] for r in rows if "iter_time" in r)


def fit_costs(out: str, costs) -> dict:
    """StageCosts fields measured in the demo run in ``out``; the start-up costs of proposals and
    the evaluation's share of fine-tuning are taken as ``costs`` has them where one run cannot
    separate them."""
    with open(os.path.join(out, "demo_summary.json")) as f:
        summary = json.load(f)
    wall, budget = summary["stage_seconds"], summary["budget"]
    pre = read_metrics(os.path.join(out, "pretrain", "metrics.json"))
    probes = [r["knn_time"] for r in pre if "knn_time" in r]
    crops = sum(len(files) for _, _, files in os.walk(os.path.join(out, "probe")))
    pretrain_iter = _mean_iter_time(pre)
    with open(os.path.join(out, "log.txt")) as f:
        inference = [float(m) for m in re.findall(r"Inference on \d+ images: ([\d.]+) s", f.read())]
    num_val = summary["data"]["num_val"]
    finetune_iter = statistics.fmean(_mean_iter_time(read_metrics(os.path.join(out, f"finetune_{k}", "metrics.json")))
                                     for k in ("soco", "scratch"))
    finetune_rest = statistics.fmean(wall[f"finetune_{k}"] for k in ("soco", "scratch")) \
        - budget["finetune_iters"] * finetune_iter
    evaluation = statistics.fmean(inference) if inference else 0.0
    return {
        "proposals_start": costs.proposals_start,
        "proposals_per_image": (wall["proposals"] - costs.proposals_start) / summary["proposals"]["images"],
        "pretrain_start": wall["pretrain"] - budget["pretrain_iters"] * pretrain_iter - sum(probes),
        "pretrain_iter": pretrain_iter,
        "knn_probe_per_crop": statistics.fmean(probes) / crops if probes and crops else costs.knn_probe_per_crop,
        "finetune_start": finetune_rest - evaluation,
        "finetune_iter": finetune_iter,
        "evaluation_per_image": evaluation / num_val,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_dir", help="a finished tools/demo.py --output-dir")
    args = p.parse_args(argv)
    demo = _demo_tool()
    with open(os.path.join(args.output_dir, "demo_summary.json")) as f:
        summary = json.load(f)
    budget, wall, cpu = summary["budget"], summary["stage_seconds"], summary["stage_cpu_seconds"]
    print(f"--minutes {budget['minutes']}: {budget['pretrain_iters']} pretraining iterations, "
          f"{budget['knn_points'] + 1} kNN probes, 2 x {budget['finetune_iters']} fine-tuning iterations\n")
    print("| stage | projected s | wall s | CPU s |\n|---|---|---|---|")
    for stage, projected in budget["projected_seconds"].items():
        print(f"| {stage} | {projected:.1f} | {wall[stage]:.1f} | {cpu[stage]:.1f} |")
    others = sum(v for k, v in wall.items() if k not in budget["projected_seconds"] and k != "finetune")
    print(f"| other (data, conversion, report) | 0 | {others:.1f} | |")
    print(f"| total | {budget['projected_total_seconds']:.1f} | {summary['total_seconds']:.1f} | "
          f"{summary['total_cpu_seconds']:.1f} |\n")
    fitted = fit_costs(args.output_dir, demo.COSTS)
    print("StageCosts fitted from this run (now in tools/demo.py):")
    for k, v in fitted.items():
        print(f"  {k} = {v:.4g}  ({getattr(demo.COSTS, k):.4g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
