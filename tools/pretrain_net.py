#!/usr/bin/env python
"""Self-supervised pretraining (SoCo, DetCo).

    python tools/pretrain_net.py --config-file configs/soco/soco_fpn_r50_100ep.yaml --num-gpus 8
    python tools/pretrain_net.py --config-file ... --resume OUTPUT_DIR out/soco_100ep
    torchrun --nproc_per_node 8 tools/pretrain_net.py --config-file ...
    # on detectron2's modules (D2SoCo / D2DetCo; needs detectron2, docs/DETECTRON2.md)
    python tools/pretrain_net.py --config-file configs/detectron2/pretrain/detco_r50_200ep.yaml --num-gpus 8
    srun --ntasks-per-node 8 python tools/pretrain_net.py --config-file ...

``KEY VALUE`` pairs after the options override config values. See docs/TRAINING.md.
"""
import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soco_d2.config import load_config  # noqa: E402
from soco_d2.engine.arguments import (  # noqa: E402
    check_before_launch, default_argument_parser, run_tool)
from soco_d2.engine.launch import launch_from_args  # noqa: E402
from soco_d2.engine.run_setup import check_cpu_run  # noqa: E402


def main(args):
    import soco_d2.data  # noqa: F401  (registers the view mappers)
    import soco_d2.modeling  # noqa: F401  (registers the meta-architectures)
    from soco_d2.engine.trainer import PretrainTrainer

    cfg = load_config(args.config_file, args.opts)
    if cfg.MODEL.DETECTRON2.CONFIG_FILE:
        import soco_d2.detectron2  # noqa: F401  (registers the builder of D2SoCo / D2DetCo)
    trainer = PretrainTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()


def cli(argv=None):
    # No --eval-only: pretraining has no evaluation of its own (transfer: tools/train_net.py).
    parser = default_argument_parser(eval_only=False)
    args = parser.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)  # fail early, before starting processes
    if cfg.MODEL.DETECTRON2.CONFIG_FILE:
        # D2SoCo / D2DetCo: fails at once without detectron2 (with the install instructions) or
        # with a bad detectron2 file / key.
        from soco_d2.detectron2 import pretrain_d2_config

        pretrain_d2_config(cfg)
    check_cpu_run(cfg)  # before anything touches OUTPUT_DIR
    check_before_launch(cfg, args)
    return launch_from_args(main, args, cfg.MODEL.DEVICE)


if __name__ == "__main__":
    run_tool(cli)
