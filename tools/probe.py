#!/usr/bin/env python
"""Rank pretrained backbones without fine-tuning: weighted kNN (and a linear probe) on frozen,
globally average-pooled res5 features, on a labelled image folder (one sub-folder per class).

Examples:

  # our pretraining checkpoint, a converted .pkl and a random-init baseline, on one folder
  python tools/probe.py --weights output/soco/model_final.pth soco.pkl --random-init --depth 18 \\
      --train-root datasets/caltech101_subset --image-size 112

  # torchvision or MoCo-style ResNet-50 weights, separate train / val folders, with a linear probe
  python tools/probe.py --weights resnet50.pth moco_v2_200ep.pth.tar \\
      --train-root imagenet100/train --val-root imagenet100/val --linear

Accepted weights: anything tools/convert_to_d2.py reads (this project's checkpoints, detectron2
.pkl, torchvision / MoCo / DetCo / official SoCo ResNets); the ResNet depth is read from the keys.
Prints a table (best kNN top-1 first) and, with --output, writes one JSON object per backbone.
--bn-stats train recomputes every BN layer's running statistics over the training images before
probing (use it to compare weights whose statistics come from other data, and for a random-init
baseline: a new network's statistics, mean 0 / variance 1, make each BN an identity).
Images: shorter side to SIZE / 0.875, centre crop SIZE. One folder is split per class
(--val-fraction, seeded by --split-seed); empty classes and classes with one image are skipped
and counted, unreadable images too.
"""
import argparse
import json
import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soco_d2.checkpoint import CheckpointError, ConversionError  # noqa: E402
from soco_d2.evaluation.knn import ProbeDataError, build_probe_split  # noqa: E402
from soco_d2.evaluation.probe import (  # noqa: E402
    BN_STATS,
    format_probe_table,
    load_probe_backbone,
    probe_backbones,
)
from soco_d2.utils.env import collect_env, file_provenance, format_env  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    w = p.add_argument_group("backbones (one or more)")
    w.add_argument("--weights", nargs="+", default=[], help="weight files to probe")
    w.add_argument("--random-init", action="store_true", help="also probe a randomly initialised "
                   "ResNet (needs --depth): the baseline a pretrained backbone must beat")
    w.add_argument("--depth", type=int, help="ResNet depth (checked against the weights; needed "
                   "for --random-init)")
    w.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    w.add_argument("--branch", choices=("online", "target"), default="online",
                   help="the online network or its EMA / key copy")
    w.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling (only for files from a trusted source)")
    d = p.add_argument_group("data")
    d.add_argument("--train-root", required=True, help="labelled folder, one sub-folder per class")
    d.add_argument("--val-root", default="", help="validation folder (default: split --train-root)")
    d.add_argument("--val-fraction", type=float, default=0.5)
    d.add_argument("--split-seed", type=int, default=0)
    d.add_argument("--max-per-class", type=int, default=0, help="images per class and side (0: all)")
    d.add_argument("--image-size", type=int, default=224)
    k = p.add_argument_group("probe")
    k.add_argument("--k", type=int, default=20)
    k.add_argument("--temperature", type=float, default=0.07)
    k.add_argument("--linear", action="store_true", help="also fit a linear probe (L-BFGS)")
    k.add_argument("--batch-size", type=int, default=64)
    k.add_argument("--bn-stats", choices=BN_STATS, default="weights",
                   help="BN running statistics to probe with: those of the weights, or recomputed "
                   "over the training images ('train'; compares backbones by their weights alone: "
                   "a random init's own statistics make every BN an identity)")
    k.add_argument("--device", default="cpu")
    p.add_argument("--output", help="write the results here (JSON lines)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.weights and not args.random_init:
        print("error: give --weights FILE [FILE ...] and/or --random-init --depth N", file=sys.stderr)
        return 2
    try:
        split = build_probe_split(args.train_root, args.val_root, args.val_fraction,
                                  args.max_per_class, args.split_seed, names=("--train-root", "--val-root", "--val-fraction"))
        print(format_env(collect_env()))
        print(f"probe data: {split.describe()}")
        backbones = [load_probe_backbone(f, args.depth, branch=args.branch, trust=args.trust_checkpoint)
                     for f in args.weights]
        if args.random_init:
            backbones.append(load_probe_backbone(depth=args.depth, random_init=True, seed=args.seed))
    except (ProbeDataError, ConversionError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, b in enumerate(backbones):
        print(f"{b.name}: ResNet-{b.depth}, {b.description}")
        if i < len(args.weights):
            print(f"  from {file_provenance(args.weights[i])}")
    results = probe_backbones(backbones, split, args.image_size, args.k, args.temperature,
                              args.linear, args.batch_size, args.device, args.bn_stats,
                              progress=lambda line: print(line, flush=True))
    print(format_probe_table(results))
    if results[0]["unreadable"]:
        print(f"{results[0]['unreadable']} unreadable image(s) skipped")
    if args.output:
        with open(args.output, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
