"""Safe reading of checkpoint files (``.pth`` / ``.pt`` / ``.pkl``).

* ``.pth`` / ``.pt`` / anything torch wrote: ``torch.load(weights_only=True)``, which admits only
  tensors and plain containers. A file holding other objects is refused with an explanation;
  ``trust=True`` (``--trust-checkpoint`` on the command line) loads it with full unpickling.
* ``.pkl`` (detectron2 / Caffe2 style): read with :class:`RestrictedUnpickler`, which admits only
  plain containers, safe builtins and numpy arrays / dtypes / scalars; anything else is refused
  naming the class.

``load_checkpoint_file`` also unwraps the usual wrappers (``{"model": ...}``,
``{"state_dict": ...}``, ``{"model_ema": ...}``) and returns ``{name: tensor or ndarray}``.
"""
import _compat_pickle
import collections
import os
import pickle
import re
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "RestrictedUnpickler",
    "read_checkpoint_object",
    "unwrap_state_dict",
    "load_checkpoint_file",
]

# Keys under which training code stores the model weights, in order of preference.
STATE_DICT_KEYS = ("model", "state_dict", "model_ema")

_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or holds no state dict."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that holds objects other than tensors, arrays and plain containers."""


# pickle's standard library has no "allow-list" unpickler, and torch's weights_only loader does not
# read numpy arrays from plain pickles, so the allow-list below is written here.
_SAFE_GLOBALS = {
    ("builtins", name)
    for name in (
        "dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool",
        "str", "bytes", "bytearray", "slice", "range",
    )
}
_SAFE_GLOBALS |= {
    ("collections", "OrderedDict"),
    # Python-2-era pickles (protocol <= 2) encode byte strings through _codecs.encode.
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
for _np_core in ("numpy.core", "numpy._core"):
    _SAFE_GLOBALS |= {
        (f"{_np_core}.multiarray", "_reconstruct"),
        (f"{_np_core}.multiarray", "scalar"),
        (f"{_np_core}.numeric", "_frombuffer"),
    }


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only admits plain containers, safe builtins and numpy arrays / dtypes."""

    def find_class(self, module: str, name: str):
        # Protocol <= 2 pickles use Python 2 names (``__builtin__.set``); map them as pickle does
        # (the keys of these tables are Python 2 names only).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        # numpy >= 1.25 pickles dtypes of arrays as numpy.dtypes.<Name>DType classes.
        if module == "numpy.dtypes" and name.endswith("DType"):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing to unpickle '{module}.{name}': a weights .pkl may only contain plain "
            "containers and numpy arrays"
        )


def _load_pkl(path: str, trust: bool) -> Any:
    with open(path, "rb") as f:
        if trust:
            return pickle.load(f, encoding="latin1")
        try:
            # latin1: Caffe2/detectron2 model-zoo pickles were written by Python 2.
            return RestrictedUnpickler(f, encoding="latin1").load()
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(
                f"{path}: {e}. If you trust this file, load it with trust=True "
                "(--trust-checkpoint)."
            ) from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e


def _not_written_by_torch(path: str) -> Optional[str]:
    """Why ``path`` cannot be a file ``torch.save`` wrote, or ``None``. It writes a zip archive
    (torch >= 1.6) or, in the legacy format, pickles that start with the PROTO opcode (0x80).
    Checked here because torch reports such files with unpickler internals (``invalid load key``,
    ``Unsupported operand``, ``KeyError: 101``) that do not say the file is not a checkpoint."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return "the file is empty"
    if head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80":
        return None
    return (f"it is neither a zip archive (what torch.save writes) nor a pickle (its first bytes: "
            f"{head.hex(' ')})")


def _weights_only_reason(error: Exception) -> str:
    """The specific part of torch's weights_only refusal (after its generic preamble)."""
    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it references {found.group(1)}"
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    return found.group(1).strip() if found else text.strip().splitlines()[0]


def _load_torch(path: str, trust: bool) -> Any:
    not_torch = _not_written_by_torch(path)
    if not_torch:
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint: {not_torch}. It is damaged, truncated or "
            "another kind of file: check the path, or copy it again.")
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if trust:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})") from e
        what = _weights_only_reason(e)
        if what.startswith("it references"):
            raise UnsafeCheckpointError(
                f"{path} contains objects other than tensors and plain containers, so "
                f"torch.load(weights_only=True) refused it ({what}). If you trust this file, "
                "pass --trust-checkpoint (trust=True) to load it with full unpickling."
            ) from None
        raise UnsafeCheckpointError(
            f"{path} is not a readable torch checkpoint with torch.load(weights_only=True), which "
            f"refused it ({what}): the file is damaged, or holds more than tensors and plain "
            "containers. If it comes from a trusted source, --trust-checkpoint (trust=True) loads "
            "it with full unpickling."
        ) from None
    except Exception as e:  # torch raises RuntimeError, KeyError, EOFError... on corrupt files
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})"
        ) from e


def read_checkpoint_object(path: Union[str, os.PathLike], trust: bool = False) -> Any:
    """Read the raw object stored in ``path`` (see the module docstring for the rules)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    # A torch zip archive is read by torch.load whatever its extension.
    if path.endswith(".pkl") and magic != _ZIP_MAGIC:
        return _load_pkl(path, trust)
    return _load_torch(path, trust)


def _is_array(v: Any) -> bool:
    return isinstance(v, (torch.Tensor, np.ndarray))


def unwrap_state_dict(obj: Any, key: Optional[str] = None, source: str = "checkpoint") -> Dict[str, Any]:
    """Return the ``{name: tensor or ndarray}`` dict inside ``obj``.

    ``obj`` may be the state dict itself or a training checkpoint wrapping it under ``key`` (default:
    the first of ``"model"``, ``"state_dict"``, ``"model_ema"`` that is present). Non-array entries
    of the state dict (e.g. a stray ``"__author__"``) are an error naming the key.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict of weights, found {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"{source}: no {key!r} entry; top-level keys: {sorted(obj)[:10]}")
        state = obj[key]
    elif obj and all(_is_array(v) for v in obj.values()):
        state = obj
    else:
        found = [k for k in STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)]
        if not found:
            raise CheckpointError(
                f"{source}: no state dict found: the file is neither a flat dict of tensors nor "
                f"wraps one under {list(STATE_DICT_KEYS)}; top-level keys: {sorted(map(str, obj))[:10]}"
            )
        state = obj[found[0]]
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{source}: the state dict is empty or not a dict")
    bad = [k for k, v in state.items() if not _is_array(v)]
    if bad:
        raise CheckpointError(
            f"{source}: state-dict entries that are not tensors/arrays: {bad[:5]} "
            f"(e.g. {bad[0]!r} is {type(state[bad[0]]).__name__})"
        )
    return collections.OrderedDict((str(k), v) for k, v in state.items())


def load_checkpoint_file(
    path: Union[str, os.PathLike], trust: bool = False, key: Optional[str] = None
) -> Dict[str, Any]:
    """Read ``path`` safely and return its state dict ``{name: tensor or ndarray}``."""
    return unwrap_state_dict(read_checkpoint_object(path, trust=trust), key=key, source=os.fspath(path))
