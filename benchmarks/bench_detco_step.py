"""Time one DetCo pretraining step on CPU: soco_d2's model vs. its floor (and SoCo's step).

Step = forward + backward + momentum update of a batch of N images, each with two global
views (S px) and two sets of G x G jigsaw patches (P px), in the collated format of
``DetCoViewMapper``. Contestants, timed round-robin in one process so machine noise hits all
of them alike:

* ``detco``      — this project's DetCo meta-architecture (4 levels, 8 heads, 8 queues, 12
  InfoNCE terms, momentum update of the key encoder), with one-process shuffle-BN over
  ``--bn-splits`` BN sub-batches (``MODEL.DETCO.SHUFFLE_BN_SPLITS``).
* ``detco_nosplit`` — the same model without shuffle-BN (``SHUFFLE_BN_SPLITS 1``: query and
  key share batch statistics), to price the one-process shuffle-BN.
* ``detco_floor``— the same ResNet body on the same pixels: query forward + backward on the
  global view and on the N*G*G patches, key forward on the other view and patch set; no heads,
  no queues, a trivial loss (mean of the last stage). No DetCo can be faster than this.
* ``soco``       — for reference, this project's SoCo step (R-FPN + RoI head, views
  224/224/112, K boxes) on ``make_batch`` of ``bench_pretrain_step.py``, same N and depth.
* ``soco_floor`` — (``--soco-floor``) that benchmark's SoCo floor.

Example: ``python benchmarks/bench_detco_step.py --rounds 5``

Both DetCo contestants use the shipped config's other settings (local features concatenated
in the shuffled order).
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pretrain_step import Floor as SoCoFloor  # noqa: E402
from bench_pretrain_step import make_batch as make_soco_batch  # noqa: E402

from soco_d2.config import load_config  # noqa: E402
from soco_d2.modeling import build_model  # noqa: E402


def make_detco_batch(n, global_size=224, patch=64, grid=3, seed=0):
    """Random uint8 views and patch sets as ``DetCoViewMapper`` returns them, collated."""
    g = torch.Generator().manual_seed(seed)
    cells = grid * grid
    return {
        "global": torch.randint(0, 256, (n, 2, 3, global_size, global_size), dtype=torch.uint8, generator=g),
        "local": torch.randint(0, 256, (n, 2, cells, 3, patch, patch), dtype=torch.uint8, generator=g),
        "local_perm": torch.stack([torch.randperm(cells, generator=g) for _ in range(2 * n)]).view(n, 2, cells),
    }


class DetCoFloor(nn.Module):
    """Query ResNet body forward + backward on view 0 and patch set 0, key body forward on view 1
    and patch set 1 (global and patches in separate calls: their sizes differ); nothing else."""

    def __init__(self, depth):
        super().__init__()

        def body():
            resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None)
            return IntermediateLayerGetter(resnet, return_layers={"layer4": "res5"})

        self.query, self.key = body(), body()
        for p in self.key.parameters():
            p.requires_grad_(False)

    def step(self, batch):
        glob, local = batch["global"], batch["local"]
        q_inputs = (glob[:, 0].float(), local[:, 0].flatten(0, 1).float())
        k_inputs = (glob[:, 1].float(), local[:, 1].flatten(0, 1).float())
        loss = sum(self.query(x)["res5"].mean() for x in q_inputs)
        with torch.no_grad():
            for x in k_inputs:
                self.key(x)
        loss.backward()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--queue-size", type=int, default=65536, help="MODEL.DETCO.QUEUE_SIZE")
    ap.add_argument("--bn-splits", type=int, default=2,
                    help="MODEL.DETCO.SHUFFLE_BN_SPLITS of `detco` (must divide --batch)")
    ap.add_argument("--no-nosplit", action="store_true", help="skip the detco_nosplit step")
    ap.add_argument("--k", type=int, default=4, help="SoCo boxes per view pair")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--no-soco", action="store_true", help="skip the SoCo reference step")
    ap.add_argument("--soco-floor", action="store_true", help="also time SoCo's floor")
    ap.add_argument("--profile", default="", help="write a torch.profiler table of one DetCo step here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def detco_cfg(splits):
        return load_config("configs/detco/detco_r50_200ep.yaml",
                           ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", str(args.depth),
                            "SOLVER.IMS_PER_BATCH", str(args.batch),
                            "MODEL.DETCO.QUEUE_SIZE", str(args.queue_size),
                            "MODEL.DETCO.SHUFFLE_BN_SPLITS", str(splits)])

    cfg = detco_cfg(args.bn_splits)
    d = cfg.INPUT.DETCO
    batch = make_detco_batch(args.batch, d.GLOBAL_SIZE, d.PATCH_SIZE, d.GRID)

    detco = build_model(cfg).train()
    assert detco.bn_splits == args.bn_splits, "--bn-splits must divide --batch (>= 2 per sub-batch)"
    floor = DetCoFloor(args.depth).train()
    models = [detco, floor]

    def make_step(model):
        def step():
            losses = model(batch)
            sum(v for k, v in losses.items() if k.startswith("loss")).backward()
            model.momentum_update(cfg.MODEL.EMA.BASE_MOMENTUM)
        return step

    detco_step = make_step(detco)
    steps = {"detco": detco_step}
    if not args.no_nosplit:
        nosplit = build_model(detco_cfg(1)).train()
        models.append(nosplit)
        steps["detco_nosplit"] = make_step(nosplit)
    steps["detco_floor"] = lambda: floor.step(batch)
    if not args.no_soco:
        soco_cfg = load_config("configs/soco/soco_fpn_r50_100ep.yaml",
                               ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", str(args.depth),
                                "CHANNELS_LAST", "False"])
        soco_batch = make_soco_batch(args.batch, args.k)
        soco = build_model(soco_cfg).train()
        models.append(soco)

        def soco_step():
            losses = soco(soco_batch)
            sum(losses.values()).backward()
            soco.momentum_update(0.99)

        steps["soco"] = soco_step
        if args.soco_floor:
            soco_floor = SoCoFloor(soco_cfg).train()
            models.append(soco_floor)
            steps["soco_floor"] = lambda: soco_floor.step(soco_batch)

    times = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    for r in range(args.warmup + args.rounds):
        for name, step in steps.items():
            t, c = time.perf_counter(), time.process_time()
            step()
            for m in models:
                m.zero_grad(set_to_none=True)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)

    print(f"CPU step, R{args.depth}, batch {args.batch}; DetCo: 2 x {d.GLOBAL_SIZE} px global views + "
          f"2 x {d.GRID ** 2} x {d.PATCH_SIZE} px patches, queue {args.queue_size}, "
          f"{args.bn_splits} BN splits; SoCo: views "
          f"224/224/112, K {args.k}; {torch.get_num_threads()} threads, {args.rounds} rounds "
          f"(median s), load average {os.getloadavg()[0]:.1f}")
    med = {name: statistics.median(t) for name, t in times.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    print(f"  {'':13s} {'wall s':>7s} {'img/s':>6s} {'CPU s':>7s}   wall min-max")
    for name, t in med.items():
        print(f"  {name:13s} {t:7.3f} {args.batch / t:6.2f} {med_cpu[name]:7.3f}   "
              f"{min(times[name]):.3f}-{max(times[name]):.3f}")
    ratios = [("detco / detco_floor", "detco", "detco_floor"),
              ("detco / detco_nosplit", "detco", "detco_nosplit"),
              ("detco_nosplit / detco_floor", "detco_nosplit", "detco_floor"),
              ("detco / soco", "detco", "soco"), ("soco / soco_floor", "soco", "soco_floor")]
    for label, a, b in ratios:
        if a in med and b in med:
            print(f"  {label:27s} = {med[a] / med[b]:.3f} (wall), {med_cpu[a] / med_cpu[b]:.3f} (CPU)")
    assert all(math.isfinite(v) for v in med.values())

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            detco_step()
        detco.zero_grad(set_to_none=True)
        with open(args.profile, "w") as f:
            f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        print(f"profile of one DetCo step: {args.profile}")


if __name__ == "__main__":
    main()
