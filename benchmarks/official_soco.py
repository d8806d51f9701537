"""Loading the official SoCo code (hologerry/SoCo) into this process, for the benchmarks that
compare against it. The official code is not part of this project: the user passes the path of a
checkout; nothing here copies or fetches it.

The official modules import two OpenMMLab packages that this project does not depend on:

* ``mmcv.cnn.ConvModule`` / ``xavier_init`` (the FPN in ``contrast/models/fpn.py``): a stand-in
  with the same structure (``conv``, then ``bn`` when a norm is configured, then an optional
  activation; conv bias only without a norm, as mmcv's ``bias="auto"``) and the same parameter
  names;
* ``mmdet.core.anchor_inside_flags`` (imported by ``contrast/data/bboxs_utils.py`` for an
  anchor-based level assignment that the SoCo recipes do not use): a stand-in that refuses to run.

It also calls ``numpy.in1d``, which NumPy 2 removed: :func:`install_stand_ins` restores it as
``numpy.isin`` of the flattened input (its documented equivalent).
"""
import os
import sys
import tempfile
import types

import numpy as np
from torch import nn


def install_stand_ins() -> None:
    """Register ``mmcv``, ``mmcv.cnn``, ``mmdet`` and ``mmdet.core`` stand-ins in ``sys.modules``
    (left alone when the real packages are importable)."""

    class ConvModule(nn.Module):
        def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                     conv_cfg=None, norm_cfg=None, act_cfg=dict(type="ReLU"), inplace=True, **_):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                  bias=norm_cfg is None)
            self.bn = nn.BatchNorm2d(out_channels) if norm_cfg is not None else None
            self.act = nn.ReLU(inplace=inplace) if act_cfg is not None else None

        def forward(self, x):
            x = self.conv(x)
            if self.bn is not None:
                x = self.bn(x)
            return self.act(x) if self.act is not None else x

    def xavier_init(module, gain=1, bias=0, distribution="normal"):
        init = nn.init.xavier_uniform_ if distribution == "uniform" else nn.init.xavier_normal_
        init(module.weight, gain=gain)
        if getattr(module, "bias", None) is not None:
            nn.init.constant_(module.bias, bias)

    def anchor_inside_flags(*args, **kwargs):
        raise NotImplementedError("mmdet is not installed; this stand-in only satisfies the import")

    if not hasattr(np, "in1d"):
        np.in1d = lambda ar1, ar2, **kwargs: np.isin(np.ravel(ar1), ar2, **kwargs)
    try:
        import mmcv.cnn  # noqa: F401
    except ImportError:
        mmcv = types.ModuleType("mmcv")
        cnn = types.ModuleType("mmcv.cnn")
        cnn.ConvModule, cnn.xavier_init = ConvModule, xavier_init
        mmcv.cnn = cnn
        sys.modules.update({"mmcv": mmcv, "mmcv.cnn": cnn})
    try:
        import mmdet.core  # noqa: F401
    except ImportError:
        mmdet = types.ModuleType("mmdet")
        core = types.ModuleType("mmdet.core")
        core.anchor_inside_flags = anchor_inside_flags
        mmdet.core = core
        sys.modules.update({"mmdet": mmdet, "mmdet.core": core})


def init_single_process_group() -> None:
    """A one-process gloo group: the official model asks for the world size in its constructor."""
    import torch.distributed as dist

    if not dist.is_initialized():
        store = os.path.join(tempfile.mkdtemp(prefix="soco_official_"), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


def import_official(repo: str) -> None:
    """Make the official ``contrast`` package importable from the checkout at ``repo``."""
    if not os.path.isfile(os.path.join(repo, "contrast", "models", "SoCo_FPN.py")):
        raise FileNotFoundError(
            f"--official-repo {repo!r} is not a checkout of the official SoCo code "
            "(contrast/models/SoCo_FPN.py not found); clone https://github.com/hologerry/SoCo there."
        )
    install_stand_ins()
    init_single_process_group()
    if repo not in sys.path:
        sys.path.insert(0, os.path.abspath(repo))
