"""Sheets that show what a pretraining run trains on (``tools/visualize_views.py``).

* SoCo (:func:`soco_sheet`): the image with its selective-search proposals (kept by the filter in
  green, filtered out in red), then the views V1..V4 the mapper made of it, each with its K
  sampled boxes. A box's colour and label are its proposal id, so the same colour marks the same
  proposal in every view.
* DetCo (:func:`detco_sheet`): the image with the crops of the two jigsaw patch sets, the two
  global views, and each patch set twice: as the encoder receives it (shuffled, each patch labelled
  with the grid cell it was cut from) and put back in cell order.

Boxes use the continuous pixel convention of :mod:`soco_d2.data.augment` (pixel ``i`` spans
``[i, i + 1)``); :func:`box_pixels` turns a box into the pixels its outline is drawn on: the
first and last pixel whose centre lies inside the box.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from .boxes import crop_boxes

__all__ = ["box_colour", "box_pixels", "draw_boxes", "soco_sheet", "detco_sheet", "hstack_panels",
           "write_view_sheets"]

# Distinct colours (matplotlib's tab10 and its lighter half), RGB.
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
            (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
            (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229)]
KEPT, FILTERED = (0, 200, 0), (220, 0, 0)


def box_colour(i: int) -> Tuple[int, int, int]:
    return _PALETTE[int(i) % len(_PALETTE)]


def box_pixels(box: Sequence[float], scale: int = 1) -> Tuple[int, int, int, int]:
    """Inclusive pixel extents ``(x0, y0, x1, y1)`` of a box (x1, y1, x2, y2) drawn on an image
    enlarged ``scale`` times (nearest neighbour): the first and last pixel whose centre is
    inside the box (at least one pixel)."""
    x1, y1, x2, y2 = (float(v) * scale for v in box)
    xa, ya = int(np.floor(x1 + 0.5)), int(np.floor(y1 + 0.5))
    xb, yb = int(np.ceil(x2 - 0.5)) - 1, int(np.ceil(y2 - 0.5)) - 1
    return xa, ya, max(xa, xb), max(ya, yb)


def draw_boxes(image: np.ndarray, boxes: np.ndarray, ids: Optional[Sequence[int]] = None,
               colour: Optional[Tuple[int, int, int]] = None, scale: int = 1,
               thickness: int = 1, labels: bool = True) -> np.ndarray:
    """A copy of the RGB ``image`` enlarged ``scale`` times (nearest) with the box outlines drawn
    (colour by id unless ``colour``), each labelled with its id."""
    out = np.ascontiguousarray(np.repeat(np.repeat(image, scale, 0), scale, 1)) if scale > 1 else image.copy()
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    for j, box in enumerate(boxes):
        c = colour if colour is not None else box_colour(ids[j] if ids is not None else j)
        x0, y0, x1, y1 = box_pixels(box, scale)
        cv2.rectangle(out, (x0, y0), (x1, y1), c, thickness)
        if labels and ids is not None:
            cv2.putText(out, str(int(ids[j])), (x0 + 2, y0 + 11), cv2.FONT_HERSHEY_PLAIN, 0.8, c, 1,
                        cv2.LINE_AA)
    return out


def _titled(panel: np.ndarray, title: str) -> np.ndarray:
    """``panel`` under a white title bar (one text line per line of ``title``)."""
    lines = title.split("\n")
    bar = np.full((4 + 14 * len(lines), panel.shape[1], 3), 255, np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(bar, line, (3, 13 + 14 * i), cv2.FONT_HERSHEY_PLAIN, 0.85, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, panel])


def hstack_panels(panels: Sequence[np.ndarray], gap: int = 6) -> np.ndarray:
    """Panels side by side, top-aligned on a white background."""
    h = max(p.shape[0] for p in panels)
    w = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = np.full((h, w, 3), 255, np.uint8)
    x = 0
    for p in panels:
        out[: p.shape[0], x: x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


def _vstack(rows: Sequence[np.ndarray], gap: int = 6) -> np.ndarray:
    w = max(r.shape[1] for r in rows)
    out = np.full((sum(r.shape[0] for r in rows) + gap * (len(rows) - 1), w, 3), 255, np.uint8)
    y = 0
    for r in rows:
        out[y: y + r.shape[0], : r.shape[1]] = r
        y += r.shape[0] + gap
    return out


def _fit(image: np.ndarray, boxes: np.ndarray, target: int) -> Tuple[np.ndarray, np.ndarray]:
    """Resize so that the longer side is ``target`` px; boxes follow."""
    s = target / max(image.shape[:2])
    h, w = max(1, round(image.shape[0] * s)), max(1, round(image.shape[1] * s))
    sx, sy = w / image.shape[1], h / image.shape[0]
    out = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    return out, np.asarray(boxes, np.float64).reshape(-1, 4) * [sx, sy, sx, sy]


def _view_scale(size: int, target: int) -> int:
    return max(1, target // size)


def _chw(t) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(t).transpose(1, 2, 0))


def soco_sheet(image: np.ndarray, proposals: np.ndarray, filtered: np.ndarray, sample: Dict,
               min_box_size: float = 1.0, panel: int = 224, max_filtered: int = 200) -> np.ndarray:
    """The SoCo sheet of one image (see the module docstring).

    ``proposals``: the boxes the mapper got (after the proposal filter); ``filtered``: the raw
    selective-search boxes the filter dropped (shown at most ``max_filtered``); ``sample``: the
    mapper's output for ``image`` and ``proposals``. Proposals narrower or shorter than
    ``min_box_size`` (``INPUT.SOCO.MIN_BOX_SIZE``) are unusable for V1 and drawn as filtered too.
    """
    _, usable = crop_boxes(proposals, (0, 0) + image.shape[:2], min_box_size)
    dropped = np.concatenate([np.asarray(filtered, np.float32).reshape(-1, 4), proposals[~usable]])
    shown = dropped[:max_filtered]
    small, fb = _fit(image, shown, panel)
    _, kb = _fit(image, proposals[usable], panel)
    orig = draw_boxes(small, fb, colour=FILTERED, labels=False)
    orig = draw_boxes(orig, kb, colour=KEPT, labels=False)
    more = f" (first {len(shown)})" if len(shown) < len(dropped) else ""
    panels = [_titled(orig, f"proposals: {int(usable.sum())} kept (green)\n{len(dropped)} filtered (red){more}")]
    v1 = _chw(sample["images"]["v1"])
    s1 = _view_scale(v1.shape[0], panel)
    pairs = sample["pairs"]
    boxes_v1 = np.concatenate([np.asarray(p["boxes_a"]) for p in pairs])
    ids_v1 = np.concatenate([np.asarray(p["ids_a"]) for p in pairs])
    panels.append(_titled(draw_boxes(v1, boxes_v1, ids_v1, scale=s1),
                          f"V1 {v1.shape[0]}px (x{s1})\npaired with " + ", ".join(str(p["b"]).upper() for p in pairs)))
    for p in pairs:
        view = _chw(sample["images"][p["b"]])
        s = _view_scale(view.shape[0], panel)
        panels.append(_titled(draw_boxes(view, np.asarray(p["boxes_b"]), np.asarray(p["ids_b"]), scale=s),
                              f"{str(p['b']).upper()} {view.shape[0]}px (x{s})\nids {sorted(set(np.asarray(p['ids_b']).tolist()))}"))
    return hstack_panels(panels)


def _patch_grid(patches: np.ndarray, cells: Sequence[int], labels: Sequence[str], grid: int,
                scale: int) -> np.ndarray:
    """Patches placed on a grid x grid board: patch ``j`` at board position ``cells[j]``."""
    p = patches.shape[1] * scale
    gap = 3
    board = np.full((grid * (p + gap), grid * (p + gap), 3), 255, np.uint8)
    for j, (patch, cell) in enumerate(zip(patches, cells)):
        r, c = divmod(int(cell), grid)
        big = np.repeat(np.repeat(patch, scale, 0), scale, 1)
        big = np.ascontiguousarray(big)
        cv2.putText(big, labels[j], (2, 12), cv2.FONT_HERSHEY_PLAIN, 0.9, (255, 255, 0), 1, cv2.LINE_AA)
        board[r * (p + gap): r * (p + gap) + p, c * (p + gap): c * (p + gap) + p] = big
    return board


def detco_sheet(image: np.ndarray, global_views: Sequence[np.ndarray], patch_sets: Sequence,
                grid: int, panel: int = 224) -> np.ndarray:
    """The DetCo sheet of one image: ``global_views`` (S x S x 3 each) and ``patch_sets``
    (:class:`~soco_d2.data.detco_views.PatchSet`) as made by the mapper's ``global_view`` /
    ``patch_set``."""
    crops = np.array([[x0, y0, x0 + w, y0 + h] for y0, x0, h, w in (s.crop for s in patch_sets)],
                     np.float64)
    small, cb = _fit(image, crops, panel)
    orig = draw_boxes(small, cb, ids=list(range(len(crops))), labels=True)
    top = [_titled(orig, "patch-set crops\n(0: query, 1: key)")]
    for i, v in enumerate(global_views):
        s = _view_scale(v.shape[0], panel)
        big = np.repeat(np.repeat(v, s, 0), s, 1) if s > 1 else v
        top.append(_titled(np.ascontiguousarray(big), f"global view {i}\n({'query' if i == 0 else 'key'}, x{s})"))
    rows = [hstack_panels(top)]
    n = grid * grid
    for i, ps in enumerate(patch_sets):
        scale = max(1, (panel // grid) // ps.patches.shape[1])
        shuffled = _patch_grid(ps.patches, range(n), [f"c{c}" for c in ps.perm], grid, scale)
        ordered = _patch_grid(ps.patches, ps.perm, [f"c{c}" for c in ps.perm], grid, scale)
        flip = ", flipped" if ps.flipped else ""
        rows.append(hstack_panels([
            _titled(shuffled, f"patch set {i} as fed (shuffled)\ncells {','.join(map(str, ps.perm.tolist()))}"),
            _titled(ordered, f"patch set {i} in cell order\n(crop {i}{flip})"),
        ]))
    return _vstack(rows)


def _rows_match(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mask of the rows of ``a`` that occur in ``b``."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros(len(a), bool)
    return (np.abs(a[:, None, :] - b[None, :, :]) < 0.5).all(-1).any(1)


def write_view_sheets(cfg, image_source: str, output_dir: str, num_images: int = 4,
                      random_sample: bool = False, seed: int = 0,
                      proposals_file: Optional[str] = None, panel: int = 224) -> List[str]:
    """PNG sheets (the ``view_sheet`` of ``cfg.INPUT.MAPPER``, :mod:`.view_mapper`) of the first
    ``num_images`` images of ``image_source`` (a folder, a ``.txt`` list or a COCO json), or of a random sample of
    them (``random_sample``, seeded). The mapper of image ``i`` draws from
    ``default_rng([seed, i])``. SoCo proposals: those of ``proposals_file`` when it has the
    image, else selective search with the generator's settings; the filtered-out boxes are always
    recomputed from the raw selective-search boxes (for mappers that ``uses_proposals``). Returns
    the written paths."""
    import os

    from .image_list import list_images, read_image
    from .proposals import ProposalStore
    from .registry import build_mapper
    from .selective_search import filter_boxes, raw_proposals

    images = list_images(image_source)
    if len(images) == 0:
        raise ValueError(f"{image_source!r} holds no images.")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}.")
    rng = np.random.default_rng(seed)
    order = (rng.permutation(len(images)) if random_sample else np.arange(len(images)))[:num_images]
    mapper = build_mapper(cfg)
    if not callable(getattr(mapper, "view_sheet", None)):
        raise TypeError(f"INPUT.MAPPER {cfg.INPUT.MAPPER!r} has no view_sheet(); derive it from "
                        "soco_d2.data.view_mapper.ViewMapper to visualise its views.")
    uses_proposals = getattr(mapper, "uses_proposals", True)
    store = ProposalStore.open(proposals_file) if proposals_file and uses_proposals else None
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    for n, i in enumerate(order):
        image = read_image(images.source(int(i)))
        key = images.keys[int(i)]
        r = np.random.default_rng([seed, int(i)])
        kept = filtered = None
        if uses_proposals:
            raw = raw_proposals(image)
            stored = store.get(key) if store is not None else None
            kept = (np.asarray(stored, np.float32) if stored is not None and len(stored)
                    else filter_boxes(raw, image.shape[:2]).astype(np.float32))
            if len(kept) == 0:
                kept = np.array([[0, 0, image.shape[1], image.shape[0]]], np.float32)  # the dataset's fallback
            filtered = raw[~_rows_match(raw, kept)]
        sheet = mapper.view_sheet(image, r, panel, proposals=kept, filtered=filtered)
        stem = os.path.splitext(key.replace("/", "_"))[0]
        path = os.path.join(output_dir, f"{getattr(mapper, 'sheet_name', 'views')}_views_{n:02d}_{stem}.png")
        cv2.imwrite(path, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths
