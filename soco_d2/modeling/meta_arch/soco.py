"""SoCo: Selective Object COntrastive learning (BYOL on selective-search boxes, FPN + R-CNN head).

Online network: ``backbone`` (ResNet-FPN, P2-P5) -> scale-aware RoIAlign -> ``box_head``
(4conv1fc) -> ``projector`` -> ``predictor``. Target network: ``target_backbone``,
``target_box_head``, ``target_projector``, deep copies of the online ones that get no gradient,
move by EMA (:meth:`SoCo.momentum_update`, the method contract's, :mod:`.method`) and run in train mode with their own BN statistics.

For a pair of views (a, b) with boxes ``boxes_a`` / ``boxes_b`` and ids ``ids_a`` / ``ids_b``::

    loss_a_b = L(q_a, k_b, ids_a, ids_b) + L(q_b, k_a, ids_b, ids_a)

with ``L`` = :func:`soco_pair_loss`, q the online predictions and k the target projections
(SoCo: pairs V1-V2 and V1-V3, 4 terms, minimum -8; SoCo*: also V1-V4, 6 terms). Each box's q / k
is the one computed on its assigned FPN level (:mod:`soco_d2.modeling.pooler`).

Every view goes once through each backbone. ``MODEL.SOCO.HEAD_MODE`` chooses how the RoI head,
projector and predictor run; in eval mode (running BN statistics) all three give the same loss,
in train mode (batch statistics, how pretraining runs) they differ through BatchNorm:

* ``"faithful"`` (default; the official objective): every box set (one side of one pair: V1 has
  one per pair) is pooled on all four levels, and every BN layer normalises each (view, box set,
  level) group of N*K boxes with that group's statistics, including the three quarters of the
  boxes that the loss then ignores (their level is not the assigned one), as the official code,
  which calls the head once per group. Here the convolutions and linear layers run once over all
  groups (same result, larger batches); only the norms' statistics are per group (one call per
  layer, one collective, on several processes).
* ``"per_view"``: each box pooled on its assigned level only (a quarter of the head's work), BN
  statistics per view over the boxes of all its box sets and levels. A deviation from the
  official objective; measured speed and gradient agreement with ``"faithful"`` in BENCHMARKS.md.
* ``"all"``: as ``"per_view"``, with BN statistics over the boxes of all views at once.
"""
from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..sync_bn import batch_norm_per_group
from ..backbone import build_resnet_fpn_backbone
from ..ema import frozen_copy
from ..heads import box_head_output_dim, build_box_head, build_predictor, build_projector
from ..losses import soco_pair_loss
from ..pooler import build_soco_pooler
from .build import META_ARCH_REGISTRY
from .method import PretrainMethod

HEAD_MODES = ("faithful", "per_view", "all")


class BoxSet(NamedTuple):
    """The boxes of one side of one pair, in pixels of ``view``."""

    key: Tuple[int, str]  # (pair index, "a" or "b")
    view: str
    boxes: Tensor  # (N, K, 4)
    ids: Tensor  # (N, K)


def _view_name(value, key: str) -> str:
    """A pair's view name: a string, or the list of N equal strings made by default collate."""
    if isinstance(value, str):
        return value
    names = set(value)
    if len(names) != 1:
        raise ValueError(f"pair[{key!r}] must name one view for the whole batch; got {sorted(names)}.")
    return names.pop()


def _run_per_segment_norm(module: nn.Module, x: Tensor, sizes: List[int]) -> Tensor:
    """Apply ``module`` to all rows of ``x`` at once, except that every batch norm sees each
    group of rows (``sizes``) separately.

    Same result as running each group through ``module`` on its own (BN statistics per group, the
    running statistics updated once per group, in order), but convolutions and linear layers get
    one large batch instead of one small batch per group (about 1.5x faster for the 4conv1fc
    head on CPU at three groups). On several processes each batch norm is one call with
    per-group statistics: one collective for all groups, not one per group.
    """
    if isinstance(module, nn.Sequential):
        for child in module:
            x = _run_per_segment_norm(child, x, sizes)
        return x
    if isinstance(module, _BatchNorm) and len(sizes) > 1:
        return batch_norm_per_group(module, x, sizes)
    return module(x)


def check_head_mode(cfg) -> str:
    mode = cfg.MODEL.SOCO.HEAD_MODE
    if mode not in HEAD_MODES:
        raise ValueError(f"MODEL.SOCO.HEAD_MODE = {mode!r}; use one of {list(HEAD_MODES)}.")
    return mode


@META_ARCH_REGISTRY.register()
class SoCo(PretrainMethod):
    """SoCo meta-architecture; ``forward(batch)`` returns ``{"loss_<a>_<b>": loss}`` per pair."""

    def __init__(self, cfg):
        super().__init__()
        self.head_mode = check_head_mode(cfg)
        self.channels_last = cfg.CHANNELS_LAST
        self.backbone = build_resnet_fpn_backbone(cfg)
        channels = self.backbone.out_channels
        self.pooler = build_soco_pooler(cfg)
        self.box_head = build_box_head(cfg, channels)
        self.projector = build_projector(cfg, box_head_output_dim(cfg, channels))
        self.predictor = build_predictor(cfg)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_box_head = frozen_copy(self.box_head)
        self.target_projector = frozen_copy(self.projector)
        self.embedding_tap = nn.Identity()  # see _online_heads
        for name, value in (("pixel_mean", cfg.MODEL.PIXEL_MEAN), ("pixel_std", cfg.MODEL.PIXEL_STD)):
            self.register_buffer(name, torch.tensor(value).view(1, 3, 1, 1), persistent=False)

    @property
    def online_modules(self) -> List[nn.Module]:
        return [self.backbone, self.box_head, self.projector]

    @property
    def target_modules(self) -> List[nn.Module]:
        return [self.target_backbone, self.target_box_head, self.target_projector]

    def momentum_pairs(self) -> List[Tuple[nn.Module, nn.Module]]:
        return list(zip(self.online_modules, self.target_modules))

    def probe_features(self, x: Tensor) -> Dict[str, Tensor]:
        """Globally average-pooled res5 of the online backbone (``"res5"``) and the box-head
        embedding of the whole-image box (``"box"``)."""
        if not hasattr(self.backbone, "body"):
            raise NotImplementedError(
                f"MONITOR.KNN: {type(self).__name__} has no probe_features for its backbone "
                f"({type(self.backbone).__name__}, no 'body'); turn MONITOR.KNN.ENABLED off.")
        body = self.backbone.body(x)
        out = {"res5": list(body.values())[-1].mean(dim=(2, 3))}
        pyramid = list(self.backbone.fpn(body).values())
        h, w = x.shape[-2:]
        boxes = x.new_tensor([0.0, 0.0, w, h]).expand(x.shape[0], 1, 4)
        out["box"] = self.box_head(self.pooler(pyramid, boxes, (h, w)))
        return out

    def embedding_module(self) -> nn.Module:
        """``embedding_tap``: the projector outputs of the rows the loss uses (the faithful head
        runs every box on four levels and the loss uses one)."""
        return self.embedding_tap

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (or 0-255 float) N x 3 x H x W images -> normalised float on the model's device."""
        x = images.to(self.pixel_mean.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x.float() - self.pixel_mean) / self.pixel_std  # keeps the memory format

    def forward(self, batch: Dict) -> Dict[str, Tensor]:
        pairs = self._box_sets(batch)
        sets_of_view: Dict[str, List[BoxSet]] = {}
        for a, b in pairs:
            for s in (a, b):
                sets_of_view.setdefault(s.view, []).append(s)
        if any(v not in batch["images"] for v in sets_of_view):
            raise KeyError(
                f"Pairs name views {sorted(sets_of_view)}; batch['images'] has {sorted(batch['images'])}."
            )
        flips = self._flips(batch, sets_of_view)
        if self.head_mode == "faithful":
            q, k = self._faithful_outputs(batch, sets_of_view, flips)
            losses = self._pair_losses(pairs, q, k)
        else:
            q, k, unused_levels = self._assigned_level_outputs(batch, sets_of_view, flips)
            losses = self._pair_losses(pairs, q, k)
            if unused_levels:
                # A level without boxes in a view still gets a (zero) gradient: otherwise that
                # level's FPN output conv and SyncBN would be skipped in backward on some
                # processes only, and SyncBN's backward all-reduce and DDP's gradient reduction
                # would hang. (The faithful mode pools every level.)
                first = next(iter(losses))
                losses[first] = losses[first] + 0.0 * sum(f.float().sum() for f in unused_levels)
        return losses

    @staticmethod
    def _pair_losses(pairs, q: Dict[tuple, Tensor], k: Dict[tuple, Tensor]) -> Dict[str, Tensor]:
        return {
            f"loss_{a.view}_{b.view}": soco_pair_loss(q[a.key], k[b.key], a.ids, b.ids)
            + soco_pair_loss(q[b.key], k[a.key], b.ids, a.ids)
            for a, b in pairs
        }

    def _flips(self, batch: Dict, sets_of_view: Dict[str, List[BoxSet]]) -> Dict[str, Tensor]:
        """``batch["flips"]`` (optional): per view, whether each image was flipped horizontally,
        for the official level rule, which reads the box before the flip."""
        flips = {}
        for v, f in batch.get("flips", {}).items():
            if v not in sets_of_view:
                continue
            n = sets_of_view[v][0].boxes.shape[0]
            f = torch.as_tensor(f).to(self.pixel_mean.device, non_blocking=True)
            if f.shape != (n,):
                raise ValueError(f"batch['flips'][{v!r}] must hold one flag per image, ({n},); got {tuple(f.shape)}.")
            flips[v] = f
        return flips

    def _faithful_outputs(self, batch: Dict, sets_of_view: Dict[str, List[BoxSet]], flips: Dict[str, Tensor]):
        """q and k ``(N, K, C)`` per box set: every box pooled on all levels, the heads' norms per
        (view, box set, level) group, then each box's row of its assigned level."""
        online, target, levels = {}, {}, {}
        for v, sets in sets_of_view.items():
            x = self.normalize(batch["images"][v])
            size = tuple(x.shape[-2:])
            features = list(self.backbone(x).values())
            with torch.no_grad():
                target_features = list(self.target_backbone(x).values())
            for s in sets:
                # (L, N*K, C, S, S) -> L groups of N*K rows, level-major.
                online[s.key] = self.pooler.pool_all_levels(features, s.boxes, size).flatten(0, 1)
                with torch.no_grad():
                    target[s.key] = self.pooler.pool_all_levels(target_features, s.boxes, size).flatten(0, 1)
                levels[s.key] = self.pooler.assign_levels(s.boxes, flips.get(v))
        num_levels = len(features)
        shapes = {s.key: s.boxes.shape[:2] for sets in sets_of_view.values() for s in sets}

        def rows_of_assigned_levels(key: tuple, out: Tensor) -> Tensor:
            per_level = out.view(num_levels, -1, out.shape[-1])  # (L, N*K, C)
            rows = torch.arange(per_level.shape[1], device=out.device)
            return per_level[levels[key], rows]

        def assigned(outputs: Dict[tuple, Tensor]) -> Dict[tuple, Tensor]:
            return {key: rows_of_assigned_levels(key, out).view(*shapes[key], -1) for key, out in outputs.items()}

        q = self._online_heads(online, num_levels, rows_of_assigned_levels)
        with torch.no_grad():
            k = self._heads(target, self.target_modules[1:], num_levels)
        return assigned(q), assigned(k)

    def _assigned_level_outputs(
        self, batch: Dict, sets_of_view: Dict[str, List[BoxSet]], flips: Dict[str, Tensor]
    ):
        """q and k ``(N, K, C)`` per box set, each box pooled on its assigned level only; the
        heads' norms per view (``"per_view"``) or over all views (``"all"``)."""
        # One RoIAlign call per view and network; level plans for all views read in one sync.
        boxes = {v: torch.cat([s.boxes for s in sets], dim=1) for v, sets in sets_of_view.items()}
        plans = {v: self.pooler.level_plan(b, flips.get(v)) for v, b in boxes.items()}
        all_counts = torch.stack([counts for _, counts in plans.values()]).tolist()
        plans = {v: (order, counts) for (v, (order, _)), counts in zip(plans.items(), all_counts)}

        online, target, unused_levels = {}, {}, []
        for v in sets_of_view:
            x = self.normalize(batch["images"][v])
            size = tuple(x.shape[-2:])
            features = list(self.backbone(x).values())
            online[v] = self.pooler(features, boxes[v], size, plans[v])
            unused_levels += [f for f, count in zip(features, plans[v][1]) if count == 0]
            with torch.no_grad():
                target[v] = self.pooler(self.target_backbone(x).values(), boxes[v], size, plans[v])

        q = self._online_heads(online)
        with torch.no_grad():
            k = self._heads(target, self.target_modules[1:])
        return self._split(q, sets_of_view), self._split(k, sets_of_view), unused_levels

    def _box_sets(self, batch: Dict) -> List[Sequence[BoxSet]]:
        device = self.pixel_mean.device
        pairs = []
        for i, p in enumerate(batch["pairs"]):
            sides = []
            for side in ("a", "b"):
                bx = p[f"boxes_{side}"].to(device, non_blocking=True).float()
                ids = p[f"ids_{side}"].to(device, non_blocking=True)
                if bx.dim() != 3 or bx.shape[-1] != 4 or ids.shape != bx.shape[:2]:
                    raise ValueError(
                        f"batch['pairs'][{i}]: boxes_{side} must be (N, K, 4) and ids_{side} (N, K); "
                        f"got {tuple(bx.shape)} and {tuple(ids.shape)}."
                    )
                sides.append(BoxSet((i, side), _view_name(p[side], side), bx, ids))
            pairs.append(tuple(sides))
        return pairs

    def _online_heads(self, pooled: Dict, groups_per_entry: int = 1, used_rows=None) -> Dict:
        """The online predictions of each entry of ``pooled`` (box head, projector, predictor; see
        :meth:`_heads`). The projector outputs that the loss uses go through ``embedding_tap``
        (an identity) on the way, for the monitors' hook (:mod:`soco_d2.engine.model_taps`): all of
        them, or ``used_rows(key, outputs)`` of each entry (the faithful head's assigned levels)."""
        z = self._heads(pooled, [self.box_head, self.projector], groups_per_entry)
        for key, out in z.items():
            self.embedding_tap(used_rows(key, out) if used_rows is not None else out)
        return self._heads(z, [self.predictor], groups_per_entry)

    def _heads(
        self, pooled: Dict, modules: Sequence[nn.Module], groups_per_entry: int = 1
    ) -> Dict:
        """Run ``modules`` in sequence on the rows of each entry of ``pooled``.

        Each entry holds ``groups_per_entry`` equal groups of rows; every BN layer normalises
        each group with its own statistics (``"all"``: one group over everything), the other
        layers run once over all rows.
        """
        sizes = [len(x) for x in pooled.values()]
        x = torch.cat(list(pooled.values()))
        if self.head_mode == "all":
            groups = [len(x)]
        else:
            groups = [size // groups_per_entry for size in sizes for _ in range(groups_per_entry)]
        for m in modules:
            x = _run_per_segment_norm(m, x, groups)
        return dict(zip(pooled, x.split(sizes)))

    @staticmethod
    def _split(outputs: Dict[str, Tensor], sets_of_view: Dict[str, List[BoxSet]]) -> Dict[tuple, Tensor]:
        """Per-view rows (image-major over the view's concatenated box sets) -> (N, K, C) per set."""
        result = {}
        for v, sets in sets_of_view.items():
            n = sets[0].boxes.shape[0]
            per_image = outputs[v].view(n, -1, outputs[v].shape[-1])
            parts = per_image.split([s.boxes.shape[1] for s in sets], dim=1)
            result.update({s.key: part for s, part in zip(sets, parts)})
        return result
