"""How many of SoCo's boxes the two FPN level rules put on different levels.

Runs the SoCo view mapper of a config over an image folder with its proposals file, several
draws per image, and compares ``MODEL.SOCO.LEVEL_ASSIGNMENT "official"`` with ``"torchvision"``
(modeling/pooler.py) on every box of every box set. Also prints the share of boxes per level and
view under the official rule.

Example::

    python tools/generate_proposals.py --images $SOCO_DATA_ROOT/coco_mini/train2017 --output coco.socoprop
    python benchmarks/bench_level_rules.py --images $SOCO_DATA_ROOT/coco_mini/train2017 \\
        --proposals coco.socoprop --draws 25
"""
import argparse

import torch

from soco_d2.config import load_config
from soco_d2.data.dataset import build_pretrain_dataset
from soco_d2.modeling.pooler import ScaleAwareRoIPooler


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/soco/soco_fpn_r50_100ep.yaml")
    ap.add_argument("--images", required=True)
    ap.add_argument("--proposals", required=True)
    ap.add_argument("--draws", type=int, default=25, help="samples per image (sample seeds 0..draws-1)")
    args = ap.parse_args()
    cfg = load_config(args.config, ["DATASETS.PRETRAIN.IMAGE_ROOT", args.images,
                                    "DATASETS.PRETRAIN.PROPOSALS", args.proposals])
    dataset = build_pretrain_dataset(cfg)
    rules = {name: ScaleAwareRoIPooler(level_assignment=name) for name in ("official", "torchvision")}
    total = moved = 0
    shares = {}
    for seed in range(args.draws):
        for index in range(len(dataset)):
            for pair in dataset[(index, seed)]["pairs"]:
                for side in ("a", "b"):
                    boxes = pair[f"boxes_{side}"]
                    official = rules["official"].assign_levels(boxes)
                    total += len(official)
                    moved += int((official != rules["torchvision"].assign_levels(boxes)).sum())
                    counts = shares.setdefault(pair[side], torch.zeros(4))
                    counts += torch.bincount(official, minlength=4)
    print(f"{len(dataset)} images x {args.draws} draws: {total} boxes, {moved} on another level "
          f"({100 * moved / total:.2f}%)")
    for view, counts in shares.items():
        share = " ".join(f"P{level + 2} {100 * c:.1f}%" for level, c in enumerate((counts / counts.sum()).tolist()))
        print(f"  {view} (official rule): {share}")


if __name__ == "__main__":
    main()
