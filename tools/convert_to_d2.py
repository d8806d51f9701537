#!/usr/bin/env python
"""Convert pretrained weights to a detectron2 ``.pkl`` (or a torchvision detector state dict).

Examples:

  # SoCo (this project's model_final.pth or the official ckpt_epoch_400.pth): backbone+FPN+head
  python tools/convert_to_d2.py output/soco_fpn_r50_400ep/model_final.pth soco_fpn_400ep.pkl

  # DetCo / MoCo / torchvision ResNet: the backbone only
  python tools/convert_to_d2.py output/detco_r50_200ep/model_final.pth detco.pkl --parts backbone

  # the EMA / key copy instead of the online network
  python tools/convert_to_d2.py model_final.pth soco_target.pkl --branch target

  # torchvision names for tools/train_net.py (maskrcnn_resnet50_fpn_v2): backbone.body.*, ...
  python tools/convert_to_d2.py model_final.pth soco_tv.pth --format torchvision

The input layout is detected from its keys; a report of mapped / dropped / unmapped keys is
printed. The tool fails (exit status 1) on an unknown layout, a missing requested part, an
incomplete backbone, or keys it does not know how to handle (see --allow-unmapped).
"""
import argparse
import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soco_d2.checkpoint import (  # noqa: E402
    CheckpointError,
    ConversionError,
    convert_to_d2,
    convert_to_torchvision,
    save_d2_pkl,
    save_torchvision_state_dict,
)
from soco_d2.checkpoint.layout import PARTS  # noqa: E402

DETECTRON2_SETTINGS = """\
Fine-tune with detectron2 (weights are torchvision-style: RGB input, stride in the 3x3 conv):
  MODEL.WEIGHTS {output}
  MODEL.PIXEL_MEAN [123.675, 116.280, 103.530]
  MODEL.PIXEL_STD [58.395, 57.120, 57.375]
  INPUT.FORMAT RGB
  MODEL.RESNETS.STRIDE_IN_1X1 False
  MODEL.BACKBONE.FREEZE_AT 0
  SoCo recipe (Mask R-CNN R50-FPN, 4conv1fc box head): MODEL.RESNETS.NORM SyncBN, MODEL.FPN.NORM SyncBN,
    MODEL.ROI_BOX_HEAD.NAME FastRCNNConvFCHead, NUM_CONV 4, NUM_FC 1, NORM SyncBN,
    MODEL.ROI_MASK_HEAD.NORM SyncBN, SOLVER.WEIGHT_DECAY 0.000025, TEST.PRECISE_BN.ENABLED True
  (see docs/TRANSFER.md; configs/detectron2/ has ready-made configs)"""


def _levels(text: str):
    try:
        levels = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fpn-levels {text!r}: expected e.g. 2,3,4,5") from None
    if not levels or any(lv not in (2, 3, 4, 5) for lv in levels):
        raise argparse.ArgumentTypeError(f"--fpn-levels {text!r}: levels must be among 2,3,4,5")
    return levels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("input", help="checkpoint: .pth / .pt / .pth.tar (torch) or .pkl (detectron2)")
    p.add_argument("output", help="output file: .pkl for --format d2, .pth for --format torchvision")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)} (default: all three)")
    p.add_argument("--branch", choices=("online", "target"), default="online",
                   help="online network (default) or its target / key / EMA copy")
    p.add_argument("--format", choices=("d2", "torchvision"), default="d2",
                   help="d2: detectron2 .pkl (default); torchvision: maskrcnn_resnet50_fpn_v2 names")
    p.add_argument("--fpn-levels", type=_levels, default=(2, 3, 4, 5),
                   help="torchvision format: pyramid levels of the detector's FPN inputs "
                        "(2,3,4,5 for Mask R-CNN; 3,4,5 for RetinaNet)")
    p.add_argument("--depth", type=int, default=None, help="expected ResNet depth (checked)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling (only for files from a trusted source)")
    p.add_argument("--allow-unmapped", action="store_true",
                   help="convert even if some input keys are neither mapped nor known to be droppable")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.format == "d2" and not args.output.endswith(".pkl"):
        print(f"error: detectron2 weights are written to a .pkl file, got {args.output}", file=sys.stderr)
        return 1
    common = dict(parts=args.parts, branch=args.branch, depth=args.depth,
                  allow_unmapped=args.allow_unmapped, trust=args.trust_checkpoint)
    try:
        if args.format == "d2":
            weights, report = convert_to_d2(args.input, **common)
            save_d2_pkl(weights, args.output)
        else:
            weights, report = convert_to_torchvision(args.input, fpn_levels=args.fpn_levels, **common)
            save_torchvision_state_dict(weights, args.output)
    except (ConversionError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.format())
    print(f"wrote {len(weights)} tensors to {args.output}")
    if args.format == "d2":
        print(DETECTRON2_SETTINGS.format(output=args.output))
    else:
        print("Load with soco_d2's tools/train_net.py (MODEL.WEIGHTS), or "
              "model.load_state_dict(torch.load(path)['model'], strict=False).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
