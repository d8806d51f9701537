"""Time one SoCo pretraining step on CPU: soco_d2's model vs. its floor (vs. the official model).

Step = forward + backward (+ EMA update) of a batch of N images with views 224/224/112 and K
boxes per view pair. The contestants are timed round-robin in one process so machine noise hits
all of them alike:

* ``faithful`` — this project's SoCo meta-architecture, ``MODEL.SOCO.HEAD_MODE "faithful"``
  (the official objective; the default).
* ``per_view`` — the same with ``HEAD_MODE "per_view"`` (each box pooled on its level only).
* ``floor``    — the same ResNet-FPN: online forward + backward on the three views plus target
  forward on them, no RoI heads, no loss. No SoCo implementation can be faster than this.
* ``official`` — ``contrast/models/SoCo_FPN.py`` of the official code (pass its checkout with
  ``--official-repo``; it is not part of this project). Its FPN imports ``mmcv.cnn.ConvModule``;
  ``benchmarks/official_soco.py`` supplies a minimal stand-in (conv + BN + optional activation)
  so mmcv is not needed.

Example: ``python benchmarks/bench_pretrain_step.py --rounds 5 --official-repo /path/to/SoCo``
"""
import argparse
import math
import statistics
import time

import torch
from torch import nn

from soco_d2.config import load_config
from soco_d2.modeling import build_model
from soco_d2.modeling.backbone import build_resnet_fpn_backbone

from official_soco import import_official


def make_batch(n, k, sizes=(224, 224, 112), seed=0):
    """Random uint8 views and K boxes per pair with sides 0.3-0.8 of the view (as after SoCo's filter)."""
    g = torch.Generator().manual_seed(seed)
    images = {f"v{i + 1}": torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=g)
              for i, s in enumerate(sizes)}

    def boxes(size):
        side = (0.3 + 0.5 * torch.rand(n, k, 2, generator=g)) * size
        x1y1 = torch.rand(n, k, 2, generator=g) * (size - side)
        return torch.cat([x1y1, x1y1 + side], dim=-1)

    ids = torch.arange(k).repeat(n, 1)
    pairs = [
        {"a": "v1", "b": b, "boxes_a": boxes(sizes[0]), "boxes_b": boxes(sizes[i + 1]),
         "ids_a": ids, "ids_b": ids}
        for i, b in enumerate(("v2", "v3"))
    ]
    return {"images": images, "pairs": pairs}


class Floor(nn.Module):
    """Online ResNet-FPN forward+backward on every view plus target forward; nothing else."""

    def __init__(self, cfg):
        super().__init__()
        self.online = build_resnet_fpn_backbone(cfg)
        self.target = build_resnet_fpn_backbone(cfg)
        for p in self.target.parameters():
            p.requires_grad_(False)

    def step(self, batch, channels_last=False):
        loss = 0.0
        for x in batch["images"].values():
            x = x.float()
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = loss + sum(f.float().mean() for f in self.online(x).values())
            with torch.no_grad():
                self.target(x)
        loss.backward()


class Official(nn.Module):
    """The official SoCo_FPN model, fed the same pixels and boxes in its own input format."""

    def __init__(self, repo, depth):
        super().__init__()
        import_official(repo)  # stand-ins for mmcv / mmdet, a one-process group, sys.path
        nn.SyncBatchNorm.convert_sync_batchnorm = staticmethod(lambda m, *a, **k: m)  # 1 process: BN
        from contrast import resnet
        from contrast.models.SoCo_FPN import SoCo_FPN

        args = argparse.Namespace(
            contrast_num_negative=4096, contrast_momentum=0.99, contrast_temperature=0.2,
            output_size=7, aligned=True, feature_dim=256, head_type="multi_layer",
            in_channels=[c * (4 if depth >= 50 else 1) for c in (64, 128, 256, 512)], out_channels=256,
            num_outs=4, start_level=0, end_level=-1, add_extra_convs=False, extra_convs_on_inputs=True,
            relu_before_extra_convs=False, num_instances=1000, batch_size=4, epochs=100,
            start_epoch=1,
        )
        self.model = SoCo_FPN(getattr(resnet, f"resnet{depth}"), args)

    def step(self, batch, mean, std):
        im = {v: (x.float() - mean) / std for v, x in batch["images"].items()}
        (p12, p13) = batch["pairs"]
        norm = lambda b, s: b / s  # official boxes are fractions of the view
        n, k, _ = p12["boxes_a"].shape
        # Every box id matches its counterpart on its assigned level: a dense 16x16 stand-in
        # (the correspondence values do not change the compute).
        corres = torch.eye(4 * k).repeat(n, 1, 1)
        loss = self.model(
            im["v1"], im["v2"], im["v3"],
            norm(p12["boxes_a"], 224), norm(p13["boxes_a"], 224),
            norm(p12["boxes_b"], 224), norm(p13["boxes_b"], 112), corres, corres,
        )
        loss.backward()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--official-repo", default="", help="checkout of the official SoCo code")
    ap.add_argument("--contiguous", action="store_true",
                    help="NCHW tensors for soco_d2 and the floor (default: channels_last, as the shipped "
                         "SoCo configs' CHANNELS_LAST True; the official model is NCHW either way)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with this process's CPU time (with --threads 1: robust to other load)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config("configs/soco/soco_fpn_r50_100ep.yaml",
                      ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", str(args.depth),
                       "CHANNELS_LAST", str(not args.contiguous)])
    memory_format = torch.contiguous_format if args.contiguous else torch.channels_last
    batch = make_batch(args.batch, args.k)
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(1, 3, 1, 1)

    def soco_step(mode):
        mode_cfg = cfg.clone()
        mode_cfg.defrost()
        mode_cfg.MODEL.SOCO.HEAD_MODE = mode
        model = build_model(mode_cfg).train().to(memory_format=memory_format)  # as the trainer

        def step():
            losses = model(batch)
            sum(losses.values()).backward()
            model.momentum_update(0.99)
            model.zero_grad(set_to_none=True)

        return step

    floor = Floor(cfg).train().to(memory_format=memory_format)
    steps = {"faithful": soco_step("faithful"), "per_view": soco_step("per_view"),
             "floor": lambda: floor.step(batch, not args.contiguous)}
    if args.official_repo:
        official = Official(args.official_repo, args.depth).train()
        steps["official"] = lambda: official.step(batch, mean, std)

    clock = time.process_time if args.cpu_time else time.perf_counter
    times = {name: [] for name in steps}
    for r in range(args.warmup + args.rounds):
        for name, step in steps.items():
            t = clock()
            step()
            floor.zero_grad(set_to_none=True)
            if r >= args.warmup:
                times[name].append(clock() - t)

    print(f"CPU step, R{args.depth}-FPN, batch {args.batch}, views 224/224/112, K {args.k}, "
          f"{'NCHW' if args.contiguous else 'channels_last'}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds, "
          f"median {'CPU' if args.cpu_time else 'wall'} s)")
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in med.items():
        print(f"  {name:9s} {t:7.3f} s   (min {min(times[name]):.3f}, max {max(times[name]):.3f})")
    for mode in ("faithful", "per_view"):
        print(f"  {mode} / floor    = {med[mode] / med['floor']:.3f}")
        if "official" in med:
            print(f"  {mode} / official = {med[mode] / med['official']:.3f}")
    print(f"  faithful / per_view = {med['faithful'] / med['per_view']:.3f}")
    assert all(math.isfinite(v) for v in med.values())


if __name__ == "__main__":
    main()
