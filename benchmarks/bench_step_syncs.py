"""Count the host syncs and collectives of one pretraining step, on CPU, 1 or 2 gloo processes.

A step is ``PretrainTrainer.run_step`` (forward, backward, optimizer step with a gradient scaler,
EMA update; the metrics flush of logging steps is not part of it) on a tiny model (ResNet-18,
small views, 2 images per process) for each method: SoCo ``faithful``, SoCo ``per_view``,
SoCo* (four views, ``faithful``) and DetCo. Each step is counted on its own; the first step
also holds one-time work (DDP's first bucket rebuild, optimizer state), so the later steps
are the steady state.

Host syncs (the host waits for the device), recorded per call site:

* ``scalar``: a tensor read as a Python number (``.item()``, ``int()``, ``float()``, ``bool()``:
  ``aten._local_scalar_dense``);
* ``to_host``: ``.tolist()``, ``.cpu()``, ``.numpy()``;
* ``from_list``: a tensor built from Python data (``torch.tensor``, ``new_tensor``,
  ``as_tensor`` of a list: ``aten.lift_fresh``), a host-to-device copy on a GPU;
* ``dynamic_shape``: ops whose output shape depends on the values (``nonzero``,
  ``masked_select``, ``unique``, boolean indexing, ``repeat_interleave`` without
  ``output_size``, ``bincount``).

On CPU there is no device, so these are the operations that would sync on a GPU, seen through
``TorchFunctionMode`` (Python-level tensor methods) and ``TorchDispatchMode`` (aten ops, also in
backward). The gradient scaler of fp16 training (one sync per step, ``found_inf``) is counted:
the trainer's scaler (off on CPU) is replaced by an enabled one.

Collectives, by kind and bytes: ``torch.distributed`` calls (patched), plus DDP's gradient
buckets (a communication hook that counts, then all-reduces as DDP's default).

Example: ``python benchmarks/bench_step_syncs.py --world-size 1 2 --steps 2 --json out.json``
"""
import argparse
import collections
import contextlib
import functools
import json
import os
import sys
import tempfile
from typing import Dict, List

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

METHODS = ("soco_faithful", "soco_per_view", "soco_star", "detco")

_TO_HOST = {"tolist", "cpu", "numpy"}
_DYNAMIC = {"nonzero", "nonzero_static", "masked_select", "unique", "_unique", "_unique2",
            "unique_dim", "unique_consecutive", "bincount", "argwhere", "nonzero_numpy"}
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object",
                "broadcast", "broadcast_object_list", "all_to_all", "all_to_all_single",
                "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter",
                "barrier", "_all_gather_base", "_reduce_scatter_base")
_HERE = os.path.abspath(__file__)
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def _call_site() -> str:
    """``file:line`` of the innermost frame outside torch and this file."""
    f = sys._getframe(1)
    while f is not None:
        name = os.path.abspath(f.f_code.co_filename)
        if name != _HERE and not name.startswith(_TORCH) and "torchvision" not in name:
            root = name.split(os.sep + "soco_d2" + os.sep)
            short = "soco_d2/" + root[-1] if len(root) > 1 else os.path.basename(name)
            return f"{short}:{f.f_lineno}"
        f = f.f_back
    return "torch"


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


class StepCounter(contextlib.ContextDecorator):
    """Inside the block, record host syncs (``syncs``: list of ``(kind, what, site)``) and
    collectives (``collectives``: list of ``(kind, bytes, site)``)."""

    def __init__(self):
        self.syncs: List[tuple] = []
        self.collectives: List[tuple] = []
        counter = self

        class _Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in _TO_HOST and args and isinstance(args[0], torch.Tensor):
                    counter.syncs.append(("to_host", name, _call_site()))
                return func(*args, **(kwargs or {}))

        class _Aten(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                kind = counter._aten_kind(func, args, kwargs)
                if kind is not None:
                    counter.syncs.append((kind, func.overloadpacket.__name__, _call_site()))
                return func(*args, **kwargs)

        self._modes = (_Functions(), _Aten())
        self._patched = {}
        self._inside = False

    @staticmethod
    def _aten_kind(func, args, kwargs):
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            return "scalar"
        if name == "lift_fresh":
            return "from_list"
        if name in _DYNAMIC:
            return "dynamic_shape"
        if name == "repeat_interleave" and kwargs.get("output_size") is None and (
                len(args) < 4 or args[3] is None) and isinstance(args[0], torch.Tensor) and (
                args[0].dim() == 1 and args[0].dtype in (torch.int32, torch.int64)
                and func._overloadname == "Tensor"):
            return "dynamic_shape"
        if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in indices if i is not None):
                return "dynamic_shape"
        return None

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self._inside:  # torch.distributed.f calling distributed_c10d.f: one collective
                return fn(*args, **kwargs)
            tensors = [a for a in args if isinstance(a, (torch.Tensor, list, tuple))]
            size = _nbytes(tensors[1:2] if name == "all_to_all" else tensors[:1])
            self.collectives.append((name, size, _call_site()))
            self._inside = True
            try:
                return fn(*args, **kwargs)
            finally:
                self._inside = False
        return counted

    def __enter__(self):
        for name in _COLLECTIVES:
            for mod in (dist, dist.distributed_c10d):
                fn = getattr(mod, name, None)
                if fn is not None:
                    self._patched[(mod, name)] = fn
                    setattr(mod, name, self._wrap(name, fn))
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        for (mod, name), fn in self._patched.items():
            setattr(mod, name, fn)
        self._patched.clear()
        return False

    def ddp_hook(self, state, bucket):
        """DDP communication hook: count the bucket, then DDP's default all-reduce."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.collectives.append(("ddp_bucket_all_reduce", _nbytes(bucket.buffer()), "DDP"))
        self._inside = True  # its all_reduce is this bucket's
        try:
            return allreduce_hook(state, bucket)
        finally:
            self._inside = False

    def summary(self) -> Dict:
        syncs = collections.Counter(kind for kind, _, _ in self.syncs)
        sites = collections.Counter(f"{kind} {what} @ {site}" for kind, what, site in self.syncs)
        calls = collections.Counter(kind for kind, _, _ in self.collectives)
        size = collections.Counter()
        for kind, n, _ in self.collectives:
            size[kind] += n
        return {
            "host_syncs": sum(syncs.values()),
            "host_syncs_by_kind": dict(sorted(syncs.items())),
            "host_sync_sites": dict(sorted(sites.items())),
            "collectives": sum(calls.values()),
            "collectives_by_kind": {k: {"calls": calls[k], "bytes": size[k]} for k in sorted(calls)},
            "collective_bytes": sum(size.values()),
            "collective_sites": dict(sorted(collections.Counter(
                f"{kind} @ {site}" for kind, _, site in self.collectives).items())),
        }


# ---------------------------------------------------------------------------------------------
def tiny_cfg(method: str, world_size: int, output_dir: str):
    from soco_d2.config import get_cfg

    cfg = get_cfg()
    opts = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18, "SOLVER.IMS_PER_BATCH", 2 * world_size,
            "OUTPUT_DIR", output_dir, "DATALOADER.NUM_WORKERS", 0, "SOLVER.OPTIMIZER", "LARS"]
    if method.startswith("soco"):
        mode = "per_view" if method == "soco_per_view" else "faithful"
        opts += ["MODEL.META_ARCHITECTURE", "SoCo", "MODEL.SOCO.HEAD_MODE", mode,
                 "MODEL.FPN.OUT_CHANNELS", 16, "MODEL.ROI_BOX_HEAD.NUM_CONV", 4,
                 "MODEL.ROI_BOX_HEAD.CONV_DIM", 16, "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
                 "MODEL.SOCO.PROJECTOR_HIDDEN_DIM", 32, "MODEL.SOCO.PROJECTOR_OUT_DIM", 16,
                 "MODEL.SOCO.PREDICTOR_HIDDEN_DIM", 32]
    else:
        opts += ["MODEL.META_ARCHITECTURE", "DetCo", "MODEL.RESNETS.ZERO_INIT_RESIDUAL", False,
                 "MODEL.DETCO.QUEUE_SIZE", 8 * world_size, "MODEL.DETCO.HEAD_HIDDEN_DIM", 32,
                 "MODEL.DETCO.FEATURE_DIM", 16, "INPUT.DETCO.GLOBAL_SIZE", 32,
                 "INPUT.DETCO.PATCH_SIZE", 16, "MODEL.DETCO.SHUFFLE_BN_SPLITS", 1,
                 "SOLVER.OPTIMIZER", "SGD"]
    cfg.merge_from_list(opts)
    return cfg


def tiny_batch(method: str, n: int, seed: int, k: int = 3) -> Dict:
    """A collated batch of ``n`` images as the view mappers give (uint8 views, float boxes)."""
    g = torch.Generator().manual_seed(seed)
    if method == "detco":
        return {
            "global": torch.randint(0, 256, (n, 2, 3, 32, 32), dtype=torch.uint8, generator=g),
            "local": torch.randint(0, 256, (n, 2, 9, 3, 16, 16), dtype=torch.uint8, generator=g),
            "local_perm": torch.stack([torch.randperm(9, generator=g) for _ in range(2 * n)]).view(n, 2, 9),
        }
    sizes = {"v1": 64, "v2": 64, "v3": 32}
    if method == "soco_star":
        sizes["v4"] = 32
    images = {v: torch.randint(0, 256, (n, 3, s, s), generator=g, dtype=torch.uint8) for v, s in sizes.items()}

    def boxes(size):
        side = (0.2 + 0.7 * torch.rand(n, k, 2, generator=g)) * size
        xy = torch.rand(n, k, 2, generator=g) * (size - side)
        return torch.cat([xy, xy + side], dim=-1)

    ids = torch.arange(k).repeat(n, 1)
    pairs = [{"a": "v1", "b": b, "boxes_a": boxes(64), "boxes_b": boxes(sizes[b]), "ids_a": ids, "ids_b": ids}
             for b in sizes if b != "v1"]
    flips = {v: torch.rand(n, generator=g) < 0.5 for v in sizes}
    return {"images": images, "pairs": pairs, "flips": flips}


def count_steps(method: str, steps: int = 2) -> List[Dict]:
    """Run ``steps`` training steps of ``method`` in this process (of a gloo group, or alone)
    and return the counts of each step."""
    from soco_d2.engine.trainer import PretrainTrainer
    from soco_d2.modeling import build_model
    from soco_d2.utils import comm

    world, rank = comm.get_world_size(), comm.get_rank()
    if method not in METHODS:
        raise ValueError(f"method {method!r}: use one of {METHODS}")
    with tempfile.TemporaryDirectory() as out:
        cfg = tiny_cfg(method, world, out if rank == 0 else os.path.join(out, f"rank{rank}"))
        torch.manual_seed(0)
        model = build_model(cfg)
        trainer = PretrainTrainer(cfg, model=model, dataset=list(range(1000)))
        counter = StepCounter()
        if isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel):
            trainer.model.register_comm_hook(None, counter.ddp_hook)
        trainer.scaler = torch.amp.GradScaler("cpu", enabled=True)  # as fp16 runs on a GPU
        trainer.model.train()
        per_process = cfg.SOLVER.IMS_PER_BATCH // world
        trainer._data = iter([tiny_batch(method, per_process, seed=100 * it + rank) for it in range(steps)])
        results = []
        for it in range(steps):
            counter.syncs.clear()
            counter.collectives.clear()
            with counter:
                trainer.run_step(it)
            results.append(counter.summary())
    return results


def _worker(out_file: str, methods, steps: int):
    from soco_d2.utils import comm

    result = {m: count_steps(m, steps) for m in methods}
    if comm.get_rank() == 0:
        with open(out_file, "w") as f:
            json.dump(result, f)


def run(world_size: int, methods=METHODS, steps: int = 2) -> Dict:
    """Counts per method and step on ``world_size`` gloo processes (rank 0's)."""
    from soco_d2.engine.launch import launch

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "counts.json")
        if world_size == 1:
            _worker(out, methods, steps)
        else:
            launch(_worker, num_gpus_per_machine=world_size, backend="gloo",
                   args=(out, list(methods), steps))
        with open(out) as f:
            return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-size", type=int, nargs="+", default=[1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--sites", action="store_true", help="list the host syncs per call site")
    p.add_argument("--json", help="also write the counts here")
    args = p.parse_args()
    torch.set_num_threads(1)
    everything = {}
    print(f"{'processes':>9} {'method':<14} {'step':>4} {'host syncs':>10} {'collectives':>11} "
          f"{'bytes':>10}  collectives by kind")
    for w in args.world_size:
        counts = run(w, args.methods, args.steps)
        everything[w] = counts
        for m in args.methods:
            for i, c in enumerate(counts[m]):
                kinds = ", ".join(f"{k} {v['calls']} ({v['bytes'] / 1e6:.3g} MB)"
                                  for k, v in c["collectives_by_kind"].items())
                print(f"{w:>9} {m:<14} {i + 1:>4} {c['host_syncs']:>10} {c['collectives']:>11} "
                      f"{c['collective_bytes']:>10}  {kinds}")
                if args.sites:
                    for site, n in list(c["host_sync_sites"].items()) + list(c["collective_sites"].items()):
                        print(f"{'':>30}{n:>5} x {site}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=1)


if __name__ == "__main__":
    main()
