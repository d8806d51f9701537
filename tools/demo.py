#!/usr/bin/env python
"""Quick-start demo: proposals -> SoCo pretraining -> conversion -> Mask R-CNN fine-tuning from
the SoCo weights and from scratch -> COCO AP side by side. CPU only, nothing to download.

    python tools/demo.py --output-dir output/demo                 # synthetic data, ~10 min on 2 CPU cores
    python tools/demo.py --output-dir output/demo --minutes 2     # a 2-minute smoke run
    python tools/demo.py --output-dir output/demo_mine \\
        --train-json my/annotations/instances_train.json --train-images my/train \\
        --val-json my/annotations/instances_val.json --val-images my/val

Writes OUTPUT_DIR/{data,proposals.socoprop,pretrain,soco_converted.pkl,finetune_soco,
finetune_scratch,demo_curves.png,demo_summary.json,log.txt}. See soco_d2/demo.py.
"""
import argparse
import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soco_d2.config import ConfigError  # noqa: E402
from soco_d2.demo import (  # noqa: E402
    DEFAULT_FINETUNE_CONFIG,
    DEFAULT_PRETRAIN_CONFIG,
    REFERENCE_MINUTES,
    DemoError,
    DemoSettings,
    run_demo,
)


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
    p.add_argument("--minutes", type=float, default=REFERENCE_MINUTES,
                   help="scales the pretraining and fine-tuning iterations linearly (default "
                        "%(default)s: 200 pretraining and 2 x 450 fine-tuning iterations, which took "
                        "about 11 minutes on 2 CPU cores shared with other jobs; raise it for less "
                        "noisy AP)")
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
