"""Parity with the official SoCo code over a whole trajectory: N training steps of this project's
trainer (``PretrainTrainer.run_step``, the real loop) against N steps of the official training loop
(hologerry/SoCo ``main_pretrain.py`` ``train()``: official ``SoCo_FPN`` with its EMA in the forward,
official ``contrast/lars.py`` LARS over SGD, official ``GradualWarmupScheduler`` + cosine), same
weights and the same official samples at every step.

SoCo at small batch is chaotic: rounding differences grow by orders of magnitude in a few steps.
The yardstick is therefore the official code's own float-noise floor: the official loop run a
second time from weights one ulp away (``torch.nextafter`` of every online parameter). A deviation
of ours from the official run is float noise when it stays near that floor; a real difference of
the loop (momentum index, EMA position, lr schedule, BN batching) shows as a deviation far above it
from the first steps. Step 0 is also reported on its own: the same weights, the same input, the
first EMA update, forward, backward and LARS step (differences there are a few ulp, or zero).

Reported per run and step: loss, lr, EMA momentum (and the loss scale and skipped steps in fp16),
and per branch (online, target), kind (weights, BN running statistics) and part (backbone, fpn,
head, projector, predictor) the relative L2 difference ``|a - b| / |a|`` to the official run; the
floor row is the official run from one ulp away against the official run.

Cases (``--cases``, comma separated):

* ``fp32``: R18 (``--depth``), ``--batch`` images, one process, fp32; also a run resumed from the
  trainer's own checkpoint after half of the steps (``resume``), compared with the official run and
  with the uninterrupted run (expected bit-identical).
* ``fp16``: our ``SOLVER.AMP`` float16 with ``torch.amp.GradScaler`` against the official loop under
  apex O1 semantics. apex is not installable here; O1 is emulated: the forward under
  ``torch.autocast`` float16 (apex O1 patches torch functions into fp16 / fp32 lists; autocast's
  lists are similar, not identical), fp32 weights and gradients, and apex's dynamic loss scaler
  (``apex/amp/scaler.py`` ``LossScaler``, used by ``amp.initialize(opt_level="O1")`` and
  ``amp.scale_loss``; https://nvidia.github.io/apex/amp.html): the loss is multiplied by the scale
  (initially 2**16), gradients are multiplied by 1 / scale; if any is inf / NaN the optimizer step is
  skipped and the scale halved, otherwise the step is taken and after 2000 unskipped steps in a row
  the scale doubles (at most 2**24). The official loop still calls ``scheduler.step()`` and its next
  forward still moves the target on a skipped step, as ours. Without a GPU both run under CPU
  autocast; the trainer refuses float16 on CPU, so its AMP dtype and scaler are set after it is
  built (the same ``run_step``).
* ``dist``: 2 gloo processes with SyncBN (``--batch2`` global images, half per process) against the
  official loop at ``--batch2`` images in one process (one process of the official SyncBN at world
  size 2 computes the same), and against our one-process run at ``--batch2``.
* ``accum``: ``SOLVER.GRAD_ACCUM_STEPS 2`` at ``--batch2`` images (two micro-batches) against the
  official loop at ``--batch2``: BN statistics then come from each micro-batch, a real difference
  (docs/TRAINING.md, "Gradient accumulation"), measured here.
* ``r50``: as ``fp32`` at ResNet-50 (``--r50-steps``).

Example (one thread per process; on a loaded 2-core machine fp32 + r50 took 50 minutes, dist +
accum at 6 steps 35 minutes; fp16 on CPU is about 15x slower than fp32)::

    SOCO_DATA_ROOT=/path/to/data python benchmarks/parity_official_trajectory.py \\
        --official-repo /path/to/SoCo --output trajectory.json
"""
import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from soco_d2.config import load_config  # noqa: E402
from soco_d2.engine.trainer import PretrainTrainer  # noqa: E402
from soco_d2.modeling import build_model  # noqa: E402
from soco_d2.utils import comm  # noqa: E402

PARTS = ("backbone", "fpn", "head", "projector", "predictor")
BUFFERS = ("running_mean", "running_var")
CASES = ("fp32", "fp16", "dist", "accum", "r50")


# ------------------------------------------------------------------------------------------------
# Snapshots: one file per run and step (online and target weights, BN buffers, in our names)
# ------------------------------------------------------------------------------------------------
class Run:
    """The record of one trajectory: per-step scalars in memory, states on disk."""

    def __init__(self, name: str, root: str):
        self.name, self.dir = name, os.path.join(root, name)
        os.makedirs(self.dir, exist_ok=True)
        self.steps: List[Dict] = []

    def add(self, state: Dict[str, torch.Tensor], **scalars) -> None:
        torch.save({k: v.detach().float().cpu().clone() for k, v in state.items()
                    if v.is_floating_point()}, os.path.join(self.dir, f"{len(self.steps)}.pt"))
        self.steps.append(scalars)

    def state(self, step: int) -> Dict[str, torch.Tensor]:
        return torch.load(os.path.join(self.dir, f"{step}.pt"), weights_only=True)


def group_of(key: str):
    """(branch, kind, part) of a state key of this project's SoCo, or None (other buffers)."""
    branch = "target" if key.startswith("target_") else "online"
    name = key[len("target_"):] if branch == "target" else key
    leaf = name.rsplit(".", 1)[-1]
    kind = "bn" if leaf in BUFFERS else "weights" if leaf in ("weight", "bias") else None
    if kind is None:
        return None
    if name.startswith("backbone.fpn."):
        part = "fpn"
    elif name.startswith("backbone."):
        part = "backbone"
    elif name.startswith("box_head."):
        part = "head"
    else:
        part = name.split(".", 1)[0]
    return branch, kind, part


def compare_states(ref: Dict[str, torch.Tensor], other: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """``|a - b| / |a|`` (L2 over every tensor of the group) per ``branch/kind/part``, and the
    largest over all groups (``max``)."""
    num: Dict[str, float] = {}
    den: Dict[str, float] = {}
    for key, a in ref.items():
        g = group_of(key)
        if g is None:
            continue
        name = "/".join(g)
        d = (a.double() - other[key].double()).pow(2).sum().item()
        num[name] = num.get(name, 0.0) + d
        den[name] = den.get(name, 0.0) + a.double().pow(2).sum().item()
    out = {k: math.sqrt(num[k]) / max(math.sqrt(den[k]), 1e-30) for k in sorted(num)}
    out["max"] = max(out.values())
    return out


def compare_runs(ref: Run, other: Run, steps: int) -> List[Dict]:
    rows = []
    for t in range(steps):
        a, b = ref.steps[t], other.steps[t]
        row = {"step": t, "loss_rel_diff": abs(a["loss"] - b["loss"]) / max(abs(a["loss"]), 1e-30),
               "lr_rel_diff": abs(a["lr"] - b["lr"]) / a["lr"], "momentum_abs_diff": abs(a["momentum"] - b["momentum"])}
        row.update(compare_states(ref.state(t), other.state(t)))
        rows.append(row)
    return rows


def identical(a: Run, b: Run, steps: range) -> bool:
    for t in steps:
        sa, sb = a.state(t), b.state(t)
        if a.steps[t]["loss"] != b.steps[t]["loss"] or any(not torch.equal(v, sb[k]) for k, v in sa.items()):
            return False
    return True


# ------------------------------------------------------------------------------------------------
# The official loop (main_pretrain.py train(), one process)
# ------------------------------------------------------------------------------------------------
class ApexO1Scaler:
    """apex's dynamic loss scaler as ``amp.initialize(opt_level="O1")`` uses it (see the module
    docstring); written out because apex cannot be installed here."""

    def __init__(self):
        self.scale, self.unskipped, self.max_scale, self.window = 2.0 ** 16, 0, 2.0 ** 24, 2000

    def backward(self, loss: torch.Tensor) -> None:
        (loss.float() * self.scale).backward()

    def unscale_and_update(self, params) -> bool:
        """Gradients times 1 / scale; returns whether the step is skipped (overflow)."""
        grads = [p.grad for p in params if p.grad is not None]
        overflow = any(not torch.isfinite(g).all() for g in grads)
        if overflow:
            self.scale /= 2.0
            self.unskipped = 0
        else:
            for g in grads:
                g.mul_(1.0 / self.scale)
            self.unskipped += 1
        if self.unskipped == self.window:
            self.scale = min(self.max_scale, self.scale * 2.0)
            self.unskipped = 0
        return overflow


def official_momentum(model) -> float:
    """The momentum the official forward's next EMA update uses (``SoCo_FPN`` line ~102)."""
    return 1.0 - (1.0 - model.contrast_momentum) * (math.cos(math.pi * model.k / model.K) + 1.0) / 2.0


def run_official(name, root, oargs, pristine, origin, samples, steps, total, warmup, ulp=False, fp16=False):
    """The official loop from the weights ``pristine`` (official state dict) over ``samples``
    (official 9-tuples, images normalised as this project normalises them)."""
    from contrast.lars import LARS, add_weight_decay
    from contrast.lr_scheduler import get_scheduler
    from parity_official_soco import build_official

    model = build_official(oargs, 0)
    model.load_state_dict(pristine)
    if ulp:  # every weight, online and target, one ulp up (BN running statistics unchanged)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, math.inf)))
    model.K, model.k = total, 0  # the schedule's length in iterations; a fresh start
    model.train()
    batch = samples[0][0].shape[0]
    lr = batch / 256 * oargs.base_learning_rate  # main_pretrain.py build_model, one process
    optimizer = LARS(torch.optim.SGD(add_weight_decay(model, oargs.weight_decay), lr=lr,
                                     momentum=oargs.momentum))
    sargs = copy.copy(oargs)
    sargs.epochs, sargs.warmup_epoch = total, warmup  # one iteration per "epoch"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = get_scheduler(optimizer, 1, sargs)
    scaler = ApexO1Scaler() if fp16 else None
    run = Run(name, root)
    inverse = {src[len("module."):]: key for key, src in origin.items()}
    for t in range(steps):
        lr_t, m_t = optimizer.param_groups[0]["lr"], official_momentum(model)
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            loss = model(*samples[t])
        optimizer.zero_grad()
        skipped = False
        if scaler is None:
            loss.backward()
        else:
            scaler.backward(loss)
            skipped = scaler.unscale_and_update(model.parameters())
        if not skipped:
            optimizer.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler.step()
        extra = {"scale": scaler.scale, "skipped": skipped} if scaler else {}
        run.add({inverse[k]: v for k, v in model.state_dict().items()},
                loss=loss.item(), lr=lr_t, momentum=m_t, **extra)
    return run


# ------------------------------------------------------------------------------------------------
# Our loop: PretrainTrainer.run_step
# ------------------------------------------------------------------------------------------------
class _Sized:
    """The trainer's dataset argument: only its length is read (``SOLVER.MAX_ITER`` is set)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def slice_batch(batch: Dict, lo: int, hi: int) -> Dict:
    def cut(x):
        if isinstance(x, torch.Tensor):
            return x[lo:hi]
        if isinstance(x, dict):
            return {k: cut(v) for k, v in x.items()}
        if isinstance(x, list):
            return [cut(v) for v in x]
        return x
    return cut(batch)


def our_cfg(config, depth, batch, total, warmup, out_dir, accum=1, overrides=()):
    return load_config(config, [
        "MODEL.RESNETS.DEPTH", str(depth), "MODEL.DEVICE", "cpu", "CHANNELS_LAST", "False",
        "SOLVER.AMP.ENABLED", "False", "SOLVER.IMS_PER_BATCH", str(batch), "SOLVER.MAX_ITER", str(total),
        "SOLVER.EPOCHS", str(total), "SOLVER.WARMUP_EPOCHS", str(warmup),
        "SOLVER.GRAD_ACCUM_STEPS", str(accum), "SOLVER.CHECKPOINT_PERIOD", "0",
        "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", out_dir, *overrides])


def make_trainer(cfg, state, fp16=False):
    model = build_model(cfg)
    if state is not None:
        model.load_state_dict(state)
    trainer = PretrainTrainer(cfg, model=model, dataset=_Sized(10 ** 6))
    if fp16:  # the trainer refuses float16 on a CPU (module docstring): set after it is built
        trainer.amp_dtype = torch.float16
        trainer.cfg.defrost()
        trainer.cfg.SOLVER.AMP.ENABLED = True
        trainer.cfg.SOLVER.AMP.DTYPE = "float16"
        trainer.cfg.freeze()
        trainer.scaler = trainer.checkpointer.scaler = torch.amp.GradScaler(trainer.device.type)
    trainer.model.train()
    return trainer


def run_ours(trainer, run, micro_batches, first, last):
    """``trainer.run_step(it)`` for it in [first, last), recording into ``run``."""
    accum = trainer.cfg.SOLVER.GRAD_ACCUM_STEPS
    trainer._data = iter(micro_batches[first * accum:])
    for it in range(first, last):
        scale = trainer.scaler.get_scale() if trainer.scaler.is_enabled() else None
        trainer.run_step(it)
        w = trainer._window[-1]
        vec = w["vec"]
        if comm.get_world_size() > 1:  # the loss of the global batch, as the trainer logs it
            vec = comm.all_reduce_sum(vec) / comm.get_world_size()
        values = dict(zip(trainer._loss_names, vec.tolist()))
        extra = {}
        if scale is not None:  # GradScaler halves the scale exactly when it skips the step
            extra = {"scale": trainer.scaler.get_scale(), "skipped": trainer.scaler.get_scale() < scale}
        if run is not None:
            run.add(comm.unwrap(trainer.model).state_dict(), loss=values["total_loss"], lr=w["lr"],
                    momentum=w["momentum"], **extra)
    trainer._window.clear()


def dist_worker(config, depth, batch, total, warmup, steps, state_path, batches_path, root, name):
    """One process of the 2-process run (launched by soco_d2.engine.launch); rank 0 records."""
    rank, world = comm.get_rank(), comm.get_world_size()
    cfg = our_cfg(config, depth, batch, total, warmup, os.path.join(root, f"{name}_out"))
    per = batch // world
    full = torch.load(batches_path, weights_only=False)
    mine = [slice_batch(b, rank * per, (rank + 1) * per) for b in full]
    trainer = make_trainer(cfg, torch.load(state_path, weights_only=True))
    run = Run(name, root) if rank == 0 else None
    run_ours(trainer, run, mine, 0, steps)
    if rank == 0:
        with open(os.path.join(root, f"{name}.json"), "w") as f:
            json.dump(run.steps, f)


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------
def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference between ``a`` and ``b`` in units of the last place of ``a``."""
    ulp = (torch.nextafter(a, torch.full_like(a, math.inf)) - a).abs()
    return float(((a - b).abs() / ulp).max())


def step0_probe(cfg, state, ref: Run, ours: Run, batch) -> Dict:
    """Step 0 alone. (1) The first EMA update: our target after step 0 against the official one,
    in ulps (the optimizer step leaves the target alone). (2) Our model given the official
    weights right before the official step-0 forward (online as loaded, target after the
    official EMA) computes the step-0 loss, compared in float32 ulps of the official loss."""
    off0, ours0 = ref.state(0), ours.state(0)
    target = [k for k in off0 if k.startswith("target_") and k.rsplit(".", 1)[-1] in ("weight", "bias")]
    model = build_model(cfg)
    model.load_state_dict({**state, **{k: off0[k] for k in target}})
    model.train()
    loss = sum(model(batch).values()).item()  # with autograd on, as in training
    return {"ema_max_ulps": max(ulps(off0[k], ours0[k]) for k in target),
            "ema_tensors_bit_identical": sum(torch.equal(off0[k], ours0[k]) for k in target),
            "ema_tensors": len(target),
            "loss_official": ref.steps[0]["loss"], "loss_ours_from_official_weights": loss,
            "loss_diff_ulps": ulps(torch.tensor(ref.steps[0]["loss"], dtype=torch.float32),
                                   torch.tensor(loss, dtype=torch.float32))}


def build_reference(repo, depth, seed):
    """The official model (BN affine / statistics randomised, target perturbed: see
    parity_official_soco.build_official), its state, our model's state converted from it, origin."""
    from parity_official_soco import build_official, load_official_weights, official_args, official_checkpoint

    oargs = official_args(repo, depth)
    off = build_official(oargs, seed)
    pristine = copy.deepcopy(off.state_dict())
    return oargs, pristine, official_checkpoint(off)


def samples_for(dataset, batch, steps, seed, mean, std):
    """Per step: the official 9-tuple (images normalised as our model does) and our batch."""
    from parity_official_soco import official_batch, to_model_batch

    official, ours = [], []
    for t in range(steps):
        sample, flips = official_batch(dataset, batch, seed + 1000 * t)
        b = to_model_batch(sample, flips, mean, std)
        ims = tuple((b["images"][v].float() - mean) / std for v in ("v1", "v2", "v3"))
        official.append(ims + tuple(sample[3:]))
        ours.append(b)
    return official, ours


def run_case(case, a, dataset, mean, std, root, log):
    from parity_official_soco import load_official_weights

    depth = 50 if case == "r50" else a.depth
    steps = a.r50_steps if case == "r50" else a.steps
    batch = a.batch2 if "dist" in case or "accum" in case else a.batch
    oargs, pristine, ckpt = build_reference(a.official_repo, depth, a.seed)
    cfg = our_cfg(a.config, depth, batch, a.total, a.warmup, os.path.join(root, f"{case}_out"))
    model = build_model(cfg)
    origin = load_official_weights(model, ckpt, depth)
    state = copy.deepcopy(model.state_dict())
    del model
    off_samples, our_batches = samples_for(dataset, batch, steps, a.seed, mean, std)
    fp16 = case == "fp16"
    t0 = time.perf_counter()
    ref = run_official(f"{case}_official", root, oargs, pristine, origin, off_samples, steps, a.total, a.warmup, fp16=fp16)
    log(f"{case}: official loop, {steps} steps, {time.perf_counter() - t0:.0f} s")
    floor = run_official(f"{case}_official_ulp", root, oargs, pristine, origin, off_samples, steps, a.total, a.warmup,
                         ulp=True, fp16=fp16)
    log(f"{case}: official loop from one ulp away")
    runs = {"floor (official from 1 ulp)": floor}
    if case in ("fp32", "fp16", "r50"):
        ours = Run(f"{case}_ours", root)
        run_ours(make_trainer(cfg, state, fp16), ours, our_batches, 0, steps)
        runs["ours"] = ours
        log(f"{case}: ours")
    if case == "fp32":
        half = steps // 2
        rdir = os.path.join(root, "fp32_resume_out")
        cfg_r = our_cfg(a.config, depth, batch, a.total, a.warmup, rdir)
        first = make_trainer(cfg_r, state)
        resumed = Run("fp32_resumed", root)
        run_ours(first, resumed, our_batches, 0, half)
        first._save(f"model_{half:07d}.pth", half)  # the trainer's own checkpoint
        del first
        second = make_trainer(cfg_r, None)
        second.resume_or_load(resume=True)
        assert second.start_iter == half, second.start_iter
        run_ours(second, resumed, our_batches, half, steps)
        runs[f"ours, resumed after step {half}"] = resumed
        log(f"{case}: ours resumed at {half}")
    if "dist" in case or "accum" in case:
        ours1 = Run(f"{case}_ours_1proc", root)
        run_ours(make_trainer(cfg, state), ours1, our_batches, 0, steps)
        runs[f"ours, 1 process, {batch} images"] = ours1
        log(f"{case}: ours, one process")
    if "dist" in case:
        from soco_d2.engine.launch import launch

        state_path, batches_path = os.path.join(root, "dist_state.pt"), os.path.join(root, "dist_batches.pt")
        torch.save(state, state_path)
        torch.save(our_batches, batches_path)
        launch(dist_worker, num_gpus_per_machine=2, backend="gloo",
               args=(a.config, depth, batch, a.total, a.warmup, steps, state_path, batches_path, root, "dist_ours"))
        two = Run("dist_ours", root)
        with open(os.path.join(root, "dist_ours.json")) as f:
            two.steps = json.load(f)
        runs["ours, 2 gloo processes (SyncBN)"] = two
        log(f"{case}: ours, two processes")
    if "accum" in case:
        cfg_a = our_cfg(a.config, depth, batch, a.total, a.warmup, os.path.join(root, "accum2_out"), accum=2)
        acc = Run("accum_ours", root)
        micro = [slice_batch(b, lo, lo + batch // 2) for b in our_batches for lo in (0, batch // 2)]
        run_ours(make_trainer(cfg_a, state), acc, micro, 0, steps)
        runs[f"ours, GRAD_ACCUM_STEPS 2 x {batch // 2} images"] = acc
        log(f"{case}: ours, accumulation")
    result = {"depth": depth, "images": batch, "steps": steps, "total": a.total, "warmup": a.warmup,
              "official": ref.steps, "runs": {}}
    if not fp16:
        first = next(r for k, r in runs.items() if k.startswith("ours"))
        result["step0_probe"] = step0_probe(cfg, state, ref, first, our_batches[0])
    for label, run in runs.items():
        result["runs"][label] = {"steps": run.steps, "vs_official": compare_runs(ref, run, steps)}
    if "ours" in runs or any(k.startswith("ours, 1 process") for k in runs):
        base = runs.get("ours") or next(r for k, r in runs.items() if k.startswith("ours, 1 process"))
        for label, run in runs.items():
            if label.startswith("ours") and run is not base:
                result["runs"][label]["vs_ours"] = compare_runs(base, run, steps)
                if "resumed" in label:
                    result["runs"][label]["bit_identical_to_ours"] = identical(base, run, range(steps))
    for label, run in list(runs.items()) + [("official", ref)]:
        shutil.rmtree(run.dir, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def print_case(case: str, r: Dict) -> None:
    print(f"\n== {case}: R{r['depth']}, {r['images']} images, {r['steps']} of {r['total']} iterations "
          f"({r['warmup']} warmup) ==")
    off = r["official"]
    print("official: " + "  ".join(f"t{t} loss {s['loss']:+.5f} lr {s['lr']:.3g} m {s['momentum']:.5f}"
                                   + (f" scale {s['scale']:.0f}{' SKIP' if s['skipped'] else ''}" if "scale" in s else "")
                                   for t, s in enumerate(off)))
    groups = [k for k in r["runs"]["floor (official from 1 ulp)"]["vs_official"][0]
              if "/" in k]
    for label, d in r["runs"].items():
        print(f"-- {label} vs official: max over groups of |a-b|/|a| per step; loss rel diff; lr, momentum diff")
        for row in d["vs_official"]:
            print(f"  t{row['step']:2d}  weights+BN {row['max']:.1e}  loss {row['loss_rel_diff']:.1e}  "
                  f"lr {row['lr_rel_diff']:.1e}  m {row['momentum_abs_diff']:.1e}")
        if "vs_ours" in d:
            print(f"   vs our uninterrupted / one-process run: max per step "
                  + " ".join(f"{row['max']:.1e}" for row in d["vs_ours"])
                  + (f"; bit-identical: {d['bit_identical_to_ours']}" if "bit_identical_to_ours" in d else ""))
    if "step0_probe" in r:
        p = r["step0_probe"]
        print(f"-- step 0 probe: first EMA update, ours vs official: max {p['ema_max_ulps']:.0f} ulp "
              f"({p['ema_tensors_bit_identical']} of {p['ema_tensors']} target tensors bit-identical); loss of "
              f"our model on the official pre-forward weights {p['loss_ours_from_official_weights']:+.8f} vs official "
              f"{p['loss_official']:+.8f} ({p['loss_diff_ulps']:.0f} ulp)")
    floor = r["runs"]["floor (official from 1 ulp)"]["vs_official"]
    for label, d in r["runs"].items():
        if label.startswith("ours"):
            ratios = [row["max"] / max(f["max"], 1e-30) for row, f in zip(d["vs_official"], floor)]
            print(f"-- {label}: deviation / floor per step: " + " ".join(f"{x:.2g}" for x in ratios))
    last = r["steps"] - 1
    print(f"-- per group at step 0 and step {last}: |a-b|/|a| to the official run")
    print(f"{'group':30s} " + " ".join(f"{lab[:22]:>22s}" for lab in r["runs"]))
    for g in groups:
        cells = []
        for d in r["runs"].values():
            rows = d["vs_official"]
            cells.append(f"{rows[0][g]:.1e} / {rows[last][g]:.1e}")
        print(f"{g:30s} " + " ".join(f"{c:>22s}" for c in cells))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official-repo", required=True, help="checkout of hologerry/SoCo")
    ap.add_argument("--images", default=os.path.join(os.environ.get("SOCO_DATA_ROOT", "datasets"), "coco_mini", "train2017"))
    ap.add_argument("--num-images", type=int, default=8, help="images used (proposals are computed for each)")
    ap.add_argument("--config", default="configs/soco/soco_fpn_r50_100ep.yaml")
    ap.add_argument("--cases", default="fp32,dist,accum,r50,fp16")
    ap.add_argument("--depth", type=int, default=18)
    ap.add_argument("--steps", type=int, default=10, help="steps compared")
    ap.add_argument("--r50-steps", type=int, default=4)
    ap.add_argument("--total", type=int, default=12, help="length of the lr / momentum schedules")
    ap.add_argument("--warmup", type=int, default=2, help="warmup iterations")
    ap.add_argument("--batch", type=int, default=2, help="images per step (fp32, fp16, r50)")
    ap.add_argument("--batch2", type=int, default=4, help="global images per step (dist, accum)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="")
    a = ap.parse_args(argv)
    cases = a.cases.split(",")
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"--cases: unknown {bad}; choose from {list(CASES)}")
    if "dist" in cases and "accum" in cases:  # the same reference runs at --batch2 serve both
        cases = [c for c in cases if c != "accum"]
        cases[cases.index("dist")] = "dist+accum"
    torch.set_num_threads(a.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    from official_soco import import_official
    from parity_official_soco import compute_proposals, list_images, official_args, official_dataset

    import_official(a.official_repo)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    paths = list_images(a.images, a.num_images)
    proposals = compute_proposals(paths)
    root = tempfile.mkdtemp(prefix="soco_trajectory_")
    dataset = official_dataset(official_args(a.official_repo, 50), paths, proposals, root)
    cfg0 = load_config(a.config)
    mean = torch.tensor(cfg0.MODEL.PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cfg0.MODEL.PIXEL_STD).view(1, 3, 1, 1)
    report = {"command": " ".join(sys.argv), "official_repo": os.path.abspath(a.official_repo),
              "images": f"{a.images} ({len(paths)})", "cases": {}}
    try:
        for case in cases:
            report["cases"][case] = run_case(case, a, dataset, mean, std, root, log)
            print_case(case, report["cases"][case])
            if a.output:
                with open(a.output, "w") as f:
                    json.dump(report, f, indent=1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    log("done")
    return report


if __name__ == "__main__":
    main()
