#!/usr/bin/env python
"""Fine-tune and evaluate a detector (torchvision Mask R-CNN / RetinaNet) on COCO-format data.

    python tools/train_net.py --config-file configs/finetune/mask_rcnn_R50_FPN_1x.yaml \
        --num-gpus 8 MODEL.WEIGHTS soco_r50_fpn.pkl OUTPUT_DIR out/mask_rcnn_1x
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS out/model_final.pth
    python tools/train_net.py --config-file ... --resume OUTPUT_DIR out/mask_rcnn_1x
    # detectron2's trainer (a detectron2-format config; needs detectron2, docs/DETECTRON2.md)
    python tools/train_net.py --config-file configs/detectron2/mask_rcnn_R50_FPN_1x.yaml \
        --num-gpus 8 MODEL.WEIGHTS soco_fpn.pkl OUTPUT_DIR out/d2_mask_rcnn_1x

Same command line as pretraining (``--num-gpus``, ``--num-machines``, ``--machine-rank``,
``--dist-url``, ``--resume``, ``--eval-only``, ``KEY VALUE`` overrides; torchrun / SLURM
environments are detected). See docs/FINETUNE.md.
"""
import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soco_d2.config import get_finetune_cfg, is_detectron2_config, load_config  # noqa: E402
from soco_d2.engine.arguments import (  # noqa: E402
    check_before_launch, default_argument_parser, run_tool)
from soco_d2.engine.run_setup import check_cpu_run  # noqa: E402
from soco_d2.engine.launch import launch_from_args  # noqa: E402


def main(args):
    from soco_d2.finetune.trainer import FinetuneTrainer

    cfg = load_config(args.config_file, args.opts, defaults=get_finetune_cfg)
    if args.eval_only:
        trainer = FinetuneTrainer(cfg, train=False)
        iteration = trainer.load_for_eval(resume=args.resume)
        return trainer.test(iteration)
    trainer = FinetuneTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None):
    parser = default_argument_parser()
    parser.add_argument(
        "--backend", choices=("auto", "torchvision", "detectron2"), default="auto",
        help="detectron2: detectron2's trainer with soco_d2's registrations (needs detectron2, see "
             "docs/DETECTRON2.md); torchvision: soco_d2's detector; auto (default): detectron2 for a "
             "detectron2-format config (configs/detectron2/*.yaml)",
    )
    args = parser.parse_args(argv)
    if args.backend == "detectron2" or (args.backend == "auto" and is_detectron2_config(args.config_file)):
        # Fails at once with the install instructions when detectron2 is missing.
        from soco_d2.detectron2.train import launch_finetune

        return launch_finetune(args)
    # fail early, before spawning processes
    cfg = load_config(args.config_file, args.opts, defaults=get_finetune_cfg)
    check_cpu_run(cfg)  # before anything touches OUTPUT_DIR
    check_before_launch(cfg, args)
    return launch_from_args(main, args, cfg.MODEL.DEVICE)


if __name__ == "__main__":
    run_tool(cli)
