"""DetCo (Xie et al., ICCV 2021): MoCo v2 with multi-level, global-and-local contrast.

The official pretraining code was never published; docs/DETCO.md lists what this
reconstruction takes from the paper and what it chooses where the paper is silent.

Per backbone stage ``i`` in ``MODEL.DETCO.LEVELS`` (res2..res5), with global views ``I_q, I_k``
and patch sets ``P_q, P_k`` (query encoder / momentum key encoder)::

    L_i = a * L_gg(q_g(I_q), k_g(I_k), queue_g[i])      # global-global (MoCo v2)
        + b * L_ll(q_l(P_q), k_l(P_k), queue_l[i])      # local-local
        + c * L_lg(q_l(P_q), k_g(I_k), queue_g[i])      # local query vs global key
    L = sum_i w_i L_i                                   # w = LEVEL_WEIGHTS, (a, b, c) = LOSS_WEIGHTS

Features are globally average-pooled stage outputs; each level has its own global and local
2-layer MLP head (MoCo v2) to ``FEATURE_DIM``, L2-normalised. The local feature combines the 9
pooled patch features (``LOCAL_COMBINE``): by default they are concatenated in the order the
patches were shuffled into (the paper), so the local feature depends on the shuffle. Each level
has one global and one local queue, fed with the keys of all processes (rank order).

Shuffle-BN (``KEY_BN "shuffle"``, MoCo): with several processes every BN normalises over its
process's samples and the key batch is shuffled across processes. In one process both encoders'
BN layers normalise ``SHUFFLE_BN_SPLITS`` sub-batches separately (sample ``i`` in sub-batch
``i % SHUFFLE_BN_SPLITS``, a patch in its image's), and the key batch is shuffled before the key
encoder and restored after it, so that a query and its key are normalised with different samples
(MoCo's single-GPU demos). State-dict prefixes: ``encoder_q.body.*`` and ``encoder_k.body.*`` are
torchvision ResNet names (``conv1.weight``, ``layer1.0.conv1.weight``); the split BN keeps them.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models._utils import IntermediateLayerGetter

from ...utils import comm
from ..contrastive import FeatureQueue, check_queue_size, info_nce
from .build import META_ARCH_REGISTRY
from .method import PretrainMethod

__all__ = ["DetCo", "DetCoEncoder", "SplitBatchNorm2d", "batch_shuffle", "frozen_running_stats"]

logger = logging.getLogger(__name__)

_STAGES = {"res2": "layer1", "res3": "layer2", "res4": "layer3", "res5": "layer4"}
_COMBINE = ("concat_shuffled", "concat_grid", "mean")
_KEY_BN = ("shuffle", "sync")


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises ``num_splits`` sub-batches separately: sample
    ``i`` belongs to sub-batch ``i % num_splits`` (one fused ``batch_norm`` call over a
    ``(N / s, s * C, H, W)`` view). Running statistics are the mean of the sub-batches' updates.
    Evaluation, and ``num_splits`` 1, is plain BatchNorm2d; parameters and buffers keep its names.
    """

    def __init__(self, num_features: int, num_splits: int = 1, **kwargs):
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise ValueError(f"SplitBatchNorm2d: num_splits must be >= 1, got {num_splits}")
        self.num_splits = int(num_splits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.num_splits
        if s == 1 or not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        n, c = x.shape[:2]
        if n % s:
            raise ValueError(
                f"SplitBatchNorm2d: a batch of {n} samples cannot be split into {s} sub-batches "
                "(MODEL.DETCO.SHUFFLE_BN_SPLITS): feed a multiple of it."
            )
        factor = 0.0 if self.momentum is None else self.momentum
        track = self.track_running_stats and self.running_mean is not None
        if track and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        mean = self.running_mean.repeat(s) if track else None
        var = self.running_var.repeat(s) if track else None
        out = F.batch_norm(
            x.reshape(n // s, s * c, *x.shape[2:]), mean, var,
            self.weight.repeat(s) if self.affine else None,
            self.bias.repeat(s) if self.affine else None,
            True, factor, self.eps,
        )
        if track:
            with torch.no_grad():
                self.running_mean.copy_(mean.view(s, c).mean(0))
                self.running_var.copy_(var.view(s, c).mean(0))
        out = out.reshape(x.shape)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def _split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace, in place, every ``nn.BatchNorm2d`` inside a freshly built ``module`` by a
    :class:`SplitBatchNorm2d` with the same settings, parameters and buffers."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            split = SplitBatchNorm2d(child.num_features, num_splits, eps=child.eps,
                                     momentum=child.momentum, affine=child.affine,
                                     track_running_stats=child.track_running_stats)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split.train(child.training))
        else:
            _split_batchnorm(child, num_splits)
    return module


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Inside the block, the BN layers of ``module`` still normalise with their batch statistics
    in training but do not update their running statistics (``track_running_stats`` off)."""
    bns = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """MoCo v2 projection head: fc -> ReLU -> fc (no BN)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class DetCoEncoder(nn.Module):
    """ResNet body (stages res2..res5) + one global and one local projection head per level."""

    def __init__(self, cfg, body: Optional[nn.Module] = None, channels: Optional[Dict[str, int]] = None):
        """``body`` (optional, with ``channels``): a module mapping images to ``{level: map}``
        for every level of ``MODEL.DETCO.LEVELS`` and the channels of each; by default
        torchvision's ResNet of ``MODEL.RESNETS``."""
        super().__init__()
        d = cfg.MODEL.DETCO
        r = cfg.MODEL.RESNETS
        if r.NORM != "BN":
            raise ValueError(
                f"MODEL.RESNETS.NORM = {r.NORM!r} is not supported by DetCo; use 'BN' "
                "(cross-process BN of the key encoder is MODEL.DETCO.KEY_BN)."
            )
        self.levels = tuple(d.LEVELS)
        if body is None:
            resnet = getattr(torchvision.models, f"resnet{r.DEPTH}")(
                weights=None, zero_init_residual=r.ZERO_INIT_RESIDUAL
            )
            # The stem and the stages up to the last used one, with torchvision's names (the
            # getter drops the later stages, avgpool and fc).
            body = IntermediateLayerGetter(
                resnet, return_layers={_STAGES[lvl]: lvl for lvl in self.levels}
            )
            expansion = 4 if r.DEPTH >= 50 else 1
            channels = {lvl: 64 * 2 ** (int(lvl[3:]) - 2) * expansion for lvl in self.levels}
        self.body = body
        self.combine = d.LOCAL_COMBINE
        n_patches = cfg.INPUT.DETCO.GRID ** 2
        local_in = {
            lvl: c if self.combine == "mean" else c * n_patches for lvl, c in channels.items()
        }
        hidden = lambda c: d.HEAD_HIDDEN_DIM or c  # noqa: E731
        self.global_heads = nn.ModuleDict(
            {lvl: _mlp(c, hidden(c), d.FEATURE_DIM) for lvl, c in channels.items()}
        )
        self.local_heads = nn.ModuleDict(
            {lvl: _mlp(local_in[lvl], hidden(channels[lvl]), d.FEATURE_DIM) for lvl in self.levels}
        )

    def pooled(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Global-average-pooled stage features, ``{level: (B, C)}``."""
        return {lvl: f.mean(dim=(2, 3)) for lvl, f in self.body(images).items()}

    def forward(
        self, images: torch.Tensor, patches: torch.Tensor, perm: torch.Tensor
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """``images`` (N, 3, S, S), ``patches`` (N, G*G, 3, P, P) float, ``perm`` (N, G*G) cell
        index of each patch. Returns L2-normalised ``{level: (N, D)}`` global and local features.

        ``"concat_shuffled"`` concatenates patch ``j``'s feature at position ``j`` (the shuffled
        order; ``perm`` is unused), ``"concat_grid"`` the feature of the patch cut from cell ``c``
        at position ``c``, ``"mean"`` averages the ``G*G`` features."""
        n, g = patches.shape[:2]
        glob = self.pooled(images)
        # Patch-major (patch j of every image, then patch j + 1): with N a multiple of the BN
        # splits, a patch lands in the same BN sub-batch as its image (entry j * N + i -> i % s).
        # The patches are normalised with their own batch statistics but leave the running ones
        # alone: those are for whole images (the probe, the checkpoint's BN for fine-tuning),
        # and a small patch's are far from them.
        with frozen_running_stats(self.body):
            loc = self.pooled(patches.transpose(0, 1).flatten(0, 1))
        if self.combine == "concat_grid":
            # Un-shuffle: position c of the concatenation holds the patch cut from cell c.
            inv = torch.argsort(perm, dim=1)
        q_g, q_l = {}, {}
        for lvl in self.levels:
            q_g[lvl] = F.normalize(self.global_heads[lvl](glob[lvl]), dim=1)
            f = loc[lvl].view(g, n, -1).transpose(0, 1)
            if self.combine == "mean":
                f = f.mean(dim=1)
            else:
                if self.combine == "concat_grid":
                    f = torch.gather(f, 1, inv[:, :, None].expand_as(f))
                f = f.flatten(1)
            q_l[lvl] = F.normalize(self.local_heads[lvl](f), dim=1)
        return q_g, q_l


@META_ARCH_REGISTRY.register()
class DetCo(PretrainMethod):
    """DetCo pretraining model; ``forward(batch)`` returns the losses (see module docstring).

    ``batch`` is the collated output of ``DetCoViewMapper``: ``"global"`` uint8 (N, 2, 3, S, S),
    ``"local"`` uint8 (N, 2, G*G, 3, P, P), ``"local_perm"`` int64 (N, 2, G*G); index 0 of the
    second dimension goes to the query encoder, index 1 to the key encoder.
    """

    def __init__(self, cfg):
        super().__init__()
        d = cfg.MODEL.DETCO
        self.levels = tuple(d.LEVELS)
        bad = [lvl for lvl in self.levels if lvl not in _STAGES]
        if not self.levels or bad:
            raise ValueError(f"MODEL.DETCO.LEVELS must be a subset of {tuple(_STAGES)}, got {d.LEVELS}.")
        if len(d.LEVEL_WEIGHTS) != len(self.levels):
            raise ValueError(
                f"MODEL.DETCO.LEVEL_WEIGHTS {tuple(d.LEVEL_WEIGHTS)} needs one weight per level "
                f"of MODEL.DETCO.LEVELS {self.levels}."
            )
        if len(d.LOSS_WEIGHTS) != 3:
            raise ValueError(
                "MODEL.DETCO.LOSS_WEIGHTS needs 3 weights (global-global, local-local, "
                f"local-global), got {tuple(d.LOSS_WEIGHTS)}."
            )
        if d.LOCAL_COMBINE not in _COMBINE:
            hint = " ('concat' is now 'concat_grid')" if d.LOCAL_COMBINE == "concat" else ""
            raise ValueError(
                f"MODEL.DETCO.LOCAL_COMBINE must be one of {_COMBINE}, got {d.LOCAL_COMBINE!r}{hint}."
            )
        if d.KEY_BN not in _KEY_BN:
            raise ValueError(f"MODEL.DETCO.KEY_BN must be one of {_KEY_BN}, got {d.KEY_BN!r}.")
        if d.TEMPERATURE <= 0:
            raise ValueError(f"MODEL.DETCO.TEMPERATURE must be positive, got {d.TEMPERATURE}.")
        world = comm.get_world_size()
        per_process = cfg.SOLVER.IMS_PER_BATCH // (world * cfg.SOLVER.GRAD_ACCUM_STEPS)
        if per_process * world * cfg.SOLVER.GRAD_ACCUM_STEPS != cfg.SOLVER.IMS_PER_BATCH:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be divisible by the world "
                f"size ({world}) times SOLVER.GRAD_ACCUM_STEPS ({cfg.SOLVER.GRAD_ACCUM_STEPS})."
            )
        check_queue_size(d.QUEUE_SIZE, cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.GRAD_ACCUM_STEPS)
        self.bn_splits = _one_process_bn_splits(d, world, per_process)

        self.level_weights = dict(zip(self.levels, (float(w) for w in d.LEVEL_WEIGHTS)))
        self.loss_weights = tuple(float(w) for w in d.LOSS_WEIGHTS)
        self.temperature = float(d.TEMPERATURE)
        self.key_bn = d.KEY_BN
        # Read by the trainer: with shuffle-BN every BN stays per process, as MoCo (a synchronised
        # BN would let a query and its key share batch statistics again).
        self.sync_batchnorm = d.KEY_BN == "sync"
        self.encoder_q = self.build_encoder(cfg)
        if self.bn_splits > 1:  # one-process shuffle-BN: the BN of the body over sub-batches
            _split_batchnorm(self.encoder_q, self.bn_splits)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.queues_global = nn.ModuleDict({lvl: FeatureQueue(d.FEATURE_DIM, d.QUEUE_SIZE) for lvl in self.levels})
        self.queues_local = nn.ModuleDict({lvl: FeatureQueue(d.FEATURE_DIM, d.QUEUE_SIZE) for lvl in self.levels})
        mean = torch.tensor(cfg.MODEL.PIXEL_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(cfg.MODEL.PIXEL_STD, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def build_encoder(self, cfg) -> DetCoEncoder:
        """The query encoder (the key encoder is its copy); subclasses change the ResNet."""
        return DetCoEncoder(cfg)

    # ------------------------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> float, standardised with MODEL.PIXEL_MEAN / PIXEL_STD."""
        shape = images.shape
        x = images.to(self.pixel_mean.device, non_blocking=True).reshape(-1, *shape[-3:]).float()
        return ((x - self.pixel_mean) / self.pixel_std).view(shape)

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        device = self.pixel_mean.device
        glob = batch["global"].to(device, non_blocking=True)
        local = batch["local"].to(device, non_blocking=True)
        perm = batch["local_perm"].to(device, non_blocking=True)

        q_g, q_l = self.encoder_q(self.normalize(glob[:, 0]), self.normalize(local[:, 0]), perm[:, 0])
        with torch.no_grad():
            k_g, k_l = self._keys(glob[:, 1], local[:, 1], perm[:, 1])

        w_gg, w_ll, w_lg = self.loss_weights
        terms = {"global_global": [], "local_local": [], "local_global": []}
        out = {}
        for lvl in self.levels:
            neg_g = self.queues_global[lvl].negatives()
            neg_l = self.queues_local[lvl].negatives()
            per_level = {
                "global_global": w_gg * info_nce(q_g[lvl], k_g[lvl], neg_g, self.temperature),
                "local_local": w_ll * info_nce(q_l[lvl], k_l[lvl], neg_l, self.temperature),
                "local_global": w_lg * info_nce(q_l[lvl], k_g[lvl], neg_g, self.temperature),
            }
            for kind, value in per_level.items():
                terms[kind].append(self.level_weights[lvl] * value)
                out[f"{kind}_{lvl}"] = value.detach()
        for kind, values in terms.items():
            out[f"loss_{kind}"] = torch.stack(values).sum()
        # The keys of all processes, gathered for every queue at once.
        queues = [self.queues_global[lvl] for lvl in self.levels] + [self.queues_local[lvl] for lvl in self.levels]
        keys = comm.all_gather_tensors([k_g[lvl] for lvl in self.levels] + [k_l[lvl] for lvl in self.levels])
        for queue, gathered in zip(queues, keys):
            queue.enqueue(gathered, gathered=True)
        return out

    @torch.no_grad()
    def _keys(self, images: torch.Tensor, patches: torch.Tensor, perm: torch.Tensor):
        """Key features of uint8 ``images`` and ``patches``; with ``KEY_BN "shuffle"`` the
        samples are shuffled (across processes, or across the BN sub-batches of one process) for
        the key encoder's BN and restored afterwards (MoCo's shuffle-BN). Processes exchange the
        uint8 pixels (a quarter of the bytes of normalised ones) and normalise afterwards."""
        if self.key_bn == "shuffle" and (comm.get_world_size() > 1 or self.bn_splits > 1):
            (images, patches, perm), restore = batch_shuffle((images, patches, perm))
            k_g, k_l = self.encoder_k(self.normalize(images), self.normalize(patches), perm)
            both = restore({**{("g", k): v for k, v in k_g.items()}, **{("l", k): v for k, v in k_l.items()}})
            return ({k: v for (kind, k), v in both.items() if kind == "g"},
                    {k: v for (kind, k), v in both.items() if kind == "l"})
        return self.encoder_k(self.normalize(images), self.normalize(patches), perm)

    def momentum_pairs(self):
        """The key encoder follows the query encoder (every parameter of the body and heads)."""
        return [(self.encoder_q, self.encoder_k)]

    def probe_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The globally average-pooled deepest stage of the query encoder, ``{level: (B, C)}``."""
        body = self.encoder_q.body(x)
        name = list(body)[-1]
        return {name: body[name].mean(dim=(2, 3))}

    def embedding_module(self) -> nn.Module:
        """The last layer of the deepest level's global head (its output is normalised into q_g)."""
        heads = self.encoder_q.global_heads
        head = heads[list(heads)[-1]]
        leaves = [mod for mod in head.modules() if not list(mod.children())]
        return leaves[-1] if leaves else head

    @property
    def chance_level(self) -> float:
        """An InfoNCE term at chance: ``ln(Q + 1)`` with ``Q`` queue negatives."""
        return math.log(next(iter(self.queues_global.values())).queue.shape[0] + 1)


def _one_process_bn_splits(d, world: int, per_process: int) -> int:
    """Number of BN sub-batches of a one-process shuffle-BN run (1: no split), with a warning
    where shuffle-BN cannot apply."""
    splits = int(d.SHUFFLE_BN_SPLITS)
    if splits < 1:
        raise ValueError(
            f"MODEL.DETCO.SHUFFLE_BN_SPLITS must be >= 1, got {splits} (1 turns one-process "
            "shuffle-BN off)."
        )
    if d.KEY_BN != "shuffle" or world > 1:
        return 1  # several processes: MoCo's cross-process shuffle
    consequence = (
        "query and key encoders normalise with the statistics of the same samples, the shortcut "
        "MoCo's shuffle-BN prevents (a positive pair can be told by its shared batch statistics)"
    )
    if splits == 1:
        logger.warning("One process and MODEL.DETCO.SHUFFLE_BN_SPLITS = 1: no shuffle-BN; %s.",
                       consequence)
        return 1
    if per_process % splits or per_process // splits < 2:
        fits = [s for s in range(2, per_process // 2 + 1) if per_process % s == 0]
        fix = (f"set MODEL.DETCO.SHUFFLE_BN_SPLITS to one of {fits}" if fits
               else "use at least 4 images per step")
        logger.warning(
            "One process: MODEL.DETCO.SHUFFLE_BN_SPLITS = %d needs a multiple of %d images per "
            "step (at least 2 per sub-batch), got %d: no shuffle-BN; %s. To fix it, %s.",
            splits, splits, per_process, consequence, fix,
        )
        return 1
    return splits


@torch.no_grad()
def batch_shuffle(tensors):
    """MoCo's batch shuffle. Across processes: all processes gather the batches (rank order),
    rank 0's random permutation is broadcast, and each process takes its slice of the shuffled
    global batch. In one process: a random permutation of the batch. Returns the shuffled
    tensors and ``restore(dict_of_tensors)``, which brings per-sample outputs back to this
    process's original samples. All processes must hold the same number of samples. The
    tensors are exchanged in one collective per dtype, the outputs in one."""
    world, rank = comm.get_world_size(), comm.get_rank()
    n = tensors[0].shape[0]
    if world == 1:
        order = torch.randperm(n, device=tensors[0].device)
        back = torch.argsort(order)
        return [t[order] for t in tensors], lambda outputs: {k: v[back] for k, v in outputs.items()}
    gathered = comm.all_gather_tensors(list(tensors))
    device = gathered[0].device
    comm_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    order = torch.randperm(n * world, device=comm_device)
    dist.broadcast(order, src=0)
    order = order.to(device)
    mine = order.view(world, n)[rank]
    back = torch.argsort(order).view(world, n)[rank]

    def restore(outputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: v[back] for k, v in zip(outputs, comm.all_gather_tensors(list(outputs.values())))}

    return [t[mine] for t in gathered], restore
