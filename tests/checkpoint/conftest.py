"""Fixtures of the conversion tests: detectron2's real key shapes (when available) and
checkpoints of this project's SoCo layout."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from weight_layouts import box_head, resnet_fpn, shifted, soco_layout  # noqa: E402


@pytest.fixture(scope="session")
def d2_shapes():
    """detectron2's real state-dict keys and shapes (``$SOCO_D2_SHAPES``, or
    ``$SOCO_DATA_ROOT/../reference/d2_state_dict_shapes.json``); skips when absent."""
    candidates = [os.environ.get("SOCO_D2_SHAPES", "")]
    if os.environ.get("SOCO_DATA_ROOT"):
        candidates.append(
            os.path.join(os.environ["SOCO_DATA_ROOT"], "..", "reference", "d2_state_dict_shapes.json")
        )
    for path in candidates:
        if path and os.path.isfile(path):
            with open(path) as f:
                return {m: {k: tuple(s) for k, s in keys.items()} for m, keys in json.load(f).items()}
    pytest.skip("d2_state_dict_shapes.json not found (set SOCO_D2_SHAPES or SOCO_DATA_ROOT)")


@pytest.fixture(scope="session")
def modules():
    bb, head = resnet_fpn(0), box_head(1)
    return {"bb": bb, "head": head, "bb_t": shifted(bb), "head_t": shifted(head)}


@pytest.fixture(scope="session")
def soco_state(modules):
    return soco_layout(modules)


@pytest.fixture(scope="session")
def small_soco_state():
    """The same layout over a ResNet-18 + 32-channel FPN and head, for quick tests."""
    bb, head = resnet_fpn(4, depth=18, width=32), box_head(5, width=32, fc=64)
    return soco_layout({"bb": bb, "head": head, "bb_t": shifted(bb), "head_t": shifted(head)})
