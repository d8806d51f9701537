"""Time one R50-FPN training step on CPU: soco_d2's torchvision detector vs. detectron2's.

``--detector mask_rcnn`` (default):

* ``soco_d2``     — ``build_detector`` from ``configs/finetune/mask_rcnn_R50_FPN_1x.yaml`` (the
  detectron2-equal choices: 1-conv RPN head, detectron2's anchors, ROIAlignV2, L1 box losses;
  4conv1fc BN box head, 4-conv BN mask head); ``sum(model(images, targets).values())``,
  backward, SGD step.
* ``detectron2``  — ``GeneralizedRCNN`` from ``configs/detectron2/mask_rcnn_R50_FPN_1x.yaml``
  (SyncBN -> BN); ``sum(model(batched_inputs).values())``, backward, SGD step.

Same recipe on both sides: 2000 / 1000 RPN proposals, 512 RoIs per image.

``--detector retinanet``:

* ``soco_d2``     — ``build_detector`` from ``configs/finetune/retinanet_R50_FPN_1x.yaml``
  (detectron2's anchors, EMA loss normaliser, L1 box loss; BN in backbone and FPN, heads
  without norm).
* ``detectron2``  — ``RetinaNet`` from ``configs/detectron2/retinanet_R50_FPN_1x.yaml``
  (SyncBN -> BN).

Both detectors: 2 images of SIZE x SIZE (synthetic shapes with masks, read through the project's
dataset class), 3 classes, no resizing, SGD (lr 0.0025, momentum 0.9). Steps alternate, the
order flips every round. Needs detectron2 (docs/DETECTRON2.md).

Example: ``python benchmarks/bench_detector_vs_detectron2.py --detector retinanet --warmup 2 --timed 4``
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soco_d2.config import load_config  # noqa: E402
from soco_d2.data.synthetic import make_synthetic_coco  # noqa: E402
from soco_d2.finetune.coco_data import COCODetection  # noqa: E402
from soco_d2.finetune.detectors import build_detector, first_label  # noqa: E402

from paired_timing import profile_alternating, report, run_alternating  # noqa: E402  (benchmarks/)

CONFIGS = {  # detector -> (soco_d2 config, detectron2 config, title)
    "mask_rcnn": ("configs/finetune/mask_rcnn_R50_FPN_1x.yaml", "configs/detectron2/mask_rcnn_R50_FPN_1x.yaml",
                  "Mask R-CNN R50-FPN 4conv1fc BN"),
    "retinanet": ("configs/finetune/retinanet_R50_FPN_1x.yaml", "configs/detectron2/retinanet_R50_FPN_1x.yaml",
                  "RetinaNet R50-FPN BN"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detector", choices=sorted(CONFIGS), default="mask_rcnn")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timed", type=int, default=4)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--profile", type=int, default=0, metavar="ROUNDS",
                        help="then profile this many more alternating rounds: own CPU time per operator, "
                             "side by side")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from detectron2.config import get_cfg as get_d2_cfg
    from detectron2.modeling import build_model as build_d2_model
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage

    from soco_d2.detectron2.train import sync_bn_to_bn

    ours_cfg, d2_cfg_file, title = CONFIGS[args.detector]
    cfg = load_config(ours_cfg, [
        "MODEL.DEVICE", "cpu", "MODEL.NUM_CLASSES", 3, "INPUT.MIN_SIZE_TRAIN", f"({args.size},)",
        "INPUT.MAX_SIZE_TRAIN", args.size])
    ours = build_detector(cfg).train()
    mask_on = args.detector == "mask_rcnn"

    tmp = tempfile.mkdtemp(prefix="bench_d2_")
    json_file, image_dir = make_synthetic_coco(tmp, 2, image_size=args.size, seed=0)
    label0 = first_label(cfg)
    dataset = COCODetection(json_file, image_dir, is_train=True, first_label=label0, flip_prob=0.0,
                            mask_on=mask_on)
    samples = [dataset[(i, 0)] for i in range(2)]
    images = [s[0].float() for s in samples]
    targets = [s[1] for s in samples]

    d2_cfg = get_d2_cfg()
    d2_cfg.merge_from_file(d2_cfg_file)
    d2_cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", 3,
                            "MODEL.RETINANET.NUM_CLASSES", 3])
    sync_bn_to_bn(d2_cfg, 1)
    theirs = build_d2_model(d2_cfg).train()
    batched = []
    for im, t in zip(images, targets):
        inst = Instances(tuple(im.shape[1:]))
        inst.gt_boxes = Boxes(t["boxes"])
        inst.gt_classes = t["labels"] - label0  # detectron2 counts classes from 0
        if mask_on:
            inst.gt_masks = BitMasks(t["masks"].bool())
        batched.append({"image": im, "height": im.shape[1], "width": im.shape[2], "instances": inst})

    def stepper(model, forward):
        opt = torch.optim.SGD(model.parameters(), lr=0.0025, momentum=0.9, weight_decay=2.5e-5)

        def step(_round):
            loss = sum(forward().values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    contestants = [("soco_d2", stepper(ours, lambda: ours(images, targets))),
                   ("detectron2", stepper(theirs, lambda: theirs(batched)))]
    print(f"{title}, 2 images {args.size}x{args.size}, CPU, "
          f"{torch.get_num_threads()} threads; {args.warmup} warmup + {args.timed} timed rounds")
    with EventStorage(0):  # detectron2's training forward logs into one
        times, cpu = run_alternating(contestants, args.warmup, args.timed)
        report(times, cpu)
        if args.profile:
            profile_alternating(contestants, args.profile)


if __name__ == "__main__":
    main()
