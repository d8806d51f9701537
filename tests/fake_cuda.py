"""Run a model on a fake ``cuda:0`` without a GPU, and list the host syncs it makes.

torch's ``FakeTensorMode`` gives every tensor a device and a shape but no data. A model built
under ``torch.device(DEVICE)`` inside :func:`fake_cuda` has its parameters on the fake
``cuda:0``; an operation that mixes in a CPU tensor then raises
``FakeTensorDeviceMismatchError`` (0-dim CPU scalars excepted, as on a GPU). Host syncs are
listed by :class:`HostSyncRecorder`, each with the innermost frame of this project or
torchvision that made it, and the run goes on:

* ``scalar read``: ``.item()``, ``.tolist()``, ``int(t)``, ``float(t)``, ``bool(t)`` of a device
  tensor. The value returned is False for the result of ``any``, True for that of ``all`` (the
  checks that find nothing wrong), else 1 / 1.0 / True: code whose shapes follow such values can
  stop with a shape error after the sync (:class:`HostSyncsFound` then lists the syncs so far).
* ``device to host`` / ``host to device``: a copy between the CPU and the device, e.g. ``.cpu()``
  or ``torch.tensor(python_list, device=...)`` (a blocking copy from pageable memory).
* ``data-dependent shape``: an op whose output size depends on values (``nonzero``, boolean
  indexing, ``bincount``, ``torchvision.ops.nms``, ...): the host waits for the device to size
  the output. The run goes on as if every element were selected.

The same ops on CPU tensors are no device syncs: they get the same fake results, unlisted.
The autograd engine needs a real device, so no backward runs under fake CUDA.
"""
import collections
import contextlib
import os
import traceback
from typing import List, NamedTuple
from unittest import mock

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorDeviceMismatchError,
    FakeTensorMode,
)
from torch.utils._python_dispatch import TorchDispatchMode

from soco_d2.engine.run_setup import move_to_device

DEVICE = torch.device("cuda", 0)


class HostSync(NamedTuple):
    kind: str  # "scalar read", "device to host", "host to device", "data-dependent shape"
    where: str  # "<package>/<path>.py:<function>", innermost frame of soco_d2 or torchvision


class HostSyncsFound(AssertionError):
    """Host syncs where none may be (or a run that could not go on past the fake value of one)."""


def _frame_name(frame):
    path = frame.filename.replace(os.sep, "/")
    for package in ("soco_d2", "torchvision"):
        marker = f"/{package}/"
        if marker in path:
            return f"{package}/{path.rsplit(marker, 1)[1]}:{frame.name}"
    return None


def _call_site() -> str:
    frames = [name for name in map(_frame_name, traceback.extract_stack()) if name]
    return frames[-1] if frames else "?"


def _long_indices(indices):
    """The boolean masks of an index list as the long indices of all their elements."""
    out = []
    for index in indices:
        if index is not None and index.dtype in (torch.bool, torch.uint8):
            out.extend(torch.empty(index.numel(), dtype=torch.long, device=index.device)
                       for _ in range(index.dim()))
        else:
            out.append(index)
    return out


class HostSyncRecorder(TorchDispatchMode):
    """Lists host syncs under :func:`fake_cuda` (see the module docstring): ``with
    HostSyncRecorder() as recorder: ...``, then ``recorder.syncs``."""

    def __init__(self):
        super().__init__()
        self.syncs: List[HostSync] = []
        self._verdicts = {}  # id(result of any / all) -> (result, value); kept alive: ids stay unique

    def add(self, kind: str, where: str) -> None:
        self.syncs.append(HostSync(kind, where))

    def counts(self) -> collections.Counter:
        return collections.Counter(self.syncs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if name in ("aten::_to_copy", "aten::copy_"):
            src, dst = (args[1], args[0].device) if name == "aten::copy_" else (args[0], kwargs.get("device"))
            dst = torch.device(dst) if dst is not None else src.device
            if src.device.type != dst.type:
                self.add("device to host" if dst.type == "cpu" else "host to device", _call_site())
        on_device = any(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args)
        try:
            out = func(*args, **kwargs)
        except DataDependentOutputException:
            if on_device:
                self.add("scalar read", _call_site())
            x = args[0]
            if id(x) in self._verdicts:
                return self._verdicts[id(x)][1]
            return True if x.dtype == torch.bool else (1.0 if x.dtype.is_floating_point else 1)
        except DynamicOutputShapeException:
            if on_device:
                self.add("data-dependent shape", _call_site())
            return self._as_if_all_selected(func, args, kwargs)
        if name.startswith(("aten::any", "aten::all")):
            self._verdicts[id(out)] = (out, name.startswith("aten::all"))
        return out

    @staticmethod
    def _as_if_all_selected(func, args, kwargs):
        x, name = args[0], func.name()
        if name in ("aten::nonzero", "aten::argwhere"):
            return torch.empty((x.numel(), x.dim()), dtype=torch.long, device=x.device)
        if name in ("aten::index.Tensor", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
            return func(x, _long_indices(args[1]), *args[2:], **kwargs)
        if name == "aten::masked_select":
            size = torch.broadcast_shapes(x.shape, args[1].shape).numel()
            return torch.empty(size, dtype=x.dtype, device=x.device)
        if name == "aten::bincount":  # as if every value were below minlength
            minlength = args[2] if len(args) > 2 else kwargs.get("minlength", 0)
            return torch.empty(max(minlength, 1), dtype=torch.long, device=x.device)
        if name == "torchvision::nms":
            return torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        raise NotImplementedError(f"tests/fake_cuda.py: no 'all selected' result for {name}; add one.")


_real_swap_tensors = torch.utils.swap_tensors


def _swap_tensors(t1, t2):
    """``Module.to`` swaps a fake parameter with its converted copy, which torch refuses (the
    fake mode holds a weak reference to it): set its data instead. Right for a change of memory
    format; ``.to(DEVICE)`` of a model built on the device changes nothing."""
    try:
        return _real_swap_tensors(t1, t2)
    except RuntimeError:
        if not (isinstance(t1, FakeTensor) and isinstance(t2, FakeTensor)) or t1.device != t2.device:
            raise
        t1.data = t2.data


def _deepcopy(self, memo):
    """``copy.deepcopy`` of a fake tensor in its own fake mode (torch's makes another mode, whose
    tensors cannot meet the first's; the target networks are deep copies)."""
    if id(self) not in memo:
        with torch.no_grad():
            new = self.clone()
        if getattr(self, "_is_param", False):
            new = torch.nn.Parameter(new, requires_grad=self.requires_grad)
        memo[id(self)] = new
    return memo[id(self)]


@contextlib.contextmanager
def fake_cuda():
    """Inside, every tensor is fake. Build the model under ``torch.device(DEVICE)`` and run it
    outside that block: tensors made there without a device are on the CPU, as in a real run.
    Yields the ``FakeTensorMode``."""
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    with mode, mock.patch.object(FakeTensor, "__deepcopy__", _deepcopy), \
            mock.patch("torch.utils.swap_tensors", _swap_tensors):
        yield mode


@contextlib.contextmanager
def fake_autocast(dtype=torch.float16):
    """``torch.autocast("cuda", dtype)`` on the fake device (autocast turns itself off where
    ``torch.cuda.is_available()`` is False; it is True while autocast starts)."""
    with mock.patch("torch.cuda.is_available", return_value=True):
        autocast = torch.autocast("cuda", dtype=dtype)
        autocast.__enter__()
    try:
        yield
    finally:
        autocast.__exit__(None, None, None)


def to_fake_device(mode: FakeTensorMode, batch):
    """A batch of real CPU tensors (a collated loader batch) as fake tensors on the fake device,
    moved as the trainer moves a batch (:func:`~soco_d2.engine.run_setup.move_to_device`)."""

    def fake(obj):
        if isinstance(obj, torch.Tensor):
            return mode.from_tensor(obj)
        if isinstance(obj, dict):
            return {k: fake(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(fake(v) for v in obj)
        return obj

    return move_to_device(fake(batch), DEVICE)


def run_without_host_syncs(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` under a :class:`HostSyncRecorder`; raises :class:`HostSyncsFound`
    listing them (by kind and place, with counts) if it made any. A device mismatch raises as is."""
    recorder = HostSyncRecorder()
    try:
        with recorder:
            out = fn(*args, **kwargs)
    except Exception as e:
        if not recorder.syncs or isinstance(e, FakeTensorDeviceMismatchError):
            raise
        raise HostSyncsFound(f"host syncs {dict(recorder.counts())}; the run stopped after them: "
                             f"{type(e).__name__}: {e}") from e
    if recorder.syncs:
        raise HostSyncsFound(f"host syncs {dict(recorder.counts())}")
    return out
