"""How far SoCo's fast head mode (``per_view``) is from the faithful one: train-mode gradients.

Both modes compute the same loss in eval mode; in train mode their BatchNorm batching differs
(``faithful``: BN statistics per view, box set and level over all N*K boxes pooled on that level,
as the official code; ``per_view``: per view over each box's assigned level only). This script
builds one SoCo model, copies its weights into the other mode, feeds both the same batch
(``bench_pretrain_step.make_batch``: views 224/224/112, K boxes per pair) and reports the loss of
each mode and the cosine between their gradients, per part and overall, for several batch sizes.

``--head-only N ...``: batch sizes at which the backbone runs without gradient (its features are
shared by both modes and only the heads' gradients are compared), for sizes whose full
backward does not fit in memory.

Example::

    python benchmarks/bench_head_modes.py --depth 18 --batches 8 64 --head-only 256
"""
import argparse
import json

import torch
import torch.nn.functional as F

from bench_pretrain_step import make_batch
from soco_d2.config import load_config
from soco_d2.modeling import build_model

PARTS = {
    "backbone": ("backbone.body.",),
    "fpn": ("backbone.fpn.",),
    "box_head": ("box_head.",),
    "projector": ("projector.",),
    "predictor": ("predictor.",),
}


class Replay(torch.nn.Module):
    """Stands in for the online backbone: returns precomputed features, one view per call."""

    def __init__(self, features):
        super().__init__()
        self.features = iter(features)

    def forward(self, x):
        return next(self.features)


def gradients(model, batch, head_only):
    model.zero_grad(set_to_none=True)
    backbone = model.backbone
    if head_only:
        views = list(dict.fromkeys(p[s] for p in batch["pairs"] for s in ("a", "b")))  # call order
        with torch.no_grad():
            model.backbone = Replay([backbone(model.normalize(batch["images"][v])) for v in views])
    try:
        losses = model(batch)
    finally:
        model.backbone = backbone
    total = sum(losses.values())
    total.backward()
    grads = {n: p.grad.detach().flatten().clone() for n, p in model.named_parameters() if p.grad is not None}
    return total.item(), grads


def cosines(a, b):
    out = {}
    for part, prefixes in list(PARTS.items()) + [("all", ("",))]:
        names = [n for n in a if n.startswith(prefixes) and n in b]
        if not names:
            continue
        x = torch.cat([a[n] for n in names])
        y = torch.cat([b[n] for n in names])
        out[part] = F.cosine_similarity(x, y, dim=0).item()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=18)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batches", type=int, nargs="*", default=[8, 64])
    ap.add_argument("--head-only", type=int, nargs="*", default=[256])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="", help="write the results as JSON here")
    args = ap.parse_args()
    cfg = load_config("configs/soco/soco_fpn_r50_100ep.yaml",
                      ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", str(args.depth), "CHANNELS_LAST", "False"])
    torch.manual_seed(args.seed)
    faithful = build_model(cfg).train()
    cfg.defrost()
    cfg.MODEL.SOCO.HEAD_MODE = "per_view"
    per_view = build_model(cfg).train()
    state = faithful.state_dict()

    results = []
    runs = [(n, False) for n in args.batches] + [(n, True) for n in args.head_only]
    print(f"R{args.depth}-FPN, views 224/224/112, K {args.k}, train mode; gradient cosine per_view vs faithful")
    for n, head_only in runs:
        batch = make_batch(n, args.k, seed=args.seed)
        row = {"images": n, "head_only": head_only}
        grads = {}
        for name, model in (("faithful", faithful), ("per_view", per_view)):
            model.load_state_dict(state)  # same weights and BN buffers for both
            row[f"loss_{name}"], grads[name] = gradients(model, batch, head_only)
        row["cosine"] = cosines(grads["faithful"], grads["per_view"])
        results.append(row)
        parts = "  ".join(f"{k} {v:.3f}" for k, v in row["cosine"].items())
        print(f"  N {n:4d}{' (heads only)' if head_only else ''}: loss faithful {row['loss_faithful']:.4f} "
              f"per_view {row['loss_per_view']:.4f}; cosine {parts}", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
