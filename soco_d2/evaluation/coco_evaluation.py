"""COCO box / mask AP of a torchvision detector with pycocotools' ``COCOeval`` (or, opt-in,
``faster-coco-eval``'s ``COCOeval_faster``, the same protocol in C++: ``TEST.COCO_EVAL_BACKEND``).

Results follow detectron2's ``COCOEvaluator``: ``{"bbox": {"AP", "AP50", "AP75", "APs", "APm",
"APl"}, "segm": {...}}`` in percent (NaN where the ground truth has no object of that size), and
:func:`flatten_results` gives the ``"bbox/AP"``, ``"segm/AP50"``, ... keys written to
``metrics.json``. As in detectron2, mask AP is computed without the box field of the results,
so that small / medium / large use the mask area.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.cocoeval import COCOeval

from soco_d2.data.coco_catalog import load_coco_json
from soco_d2.utils.watchdog import beat
from soco_d2.utils import comm

__all__ = [
    "METRIC_NAMES",
    "COCOEvaluator",
    "instances_to_coco_results",
    "evaluate_coco_results",
    "flatten_results",
    "format_results_table",
    "inference_on_dataset",
    "COCO_EVAL_BACKENDS",
    "check_coco_eval_backend",
]

logger = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
COCO_EVAL_BACKENDS = ("pycocotools", "faster_coco_eval")


def check_coco_eval_backend(backend: str) -> None:
    """Raise when ``backend`` is unknown or its package is missing (naming the extra)."""
    if backend not in COCO_EVAL_BACKENDS:
        raise ValueError(f"TEST.COCO_EVAL_BACKEND {backend!r} is not one of {COCO_EVAL_BACKENDS}")
    if backend == "faster_coco_eval":
        try:
            import faster_coco_eval  # noqa: F401
        except ImportError:
            raise RuntimeError(
                "TEST.COCO_EVAL_BACKEND faster_coco_eval needs the faster-coco-eval package: "
                "pip install -e \".[faster-coco-eval]\" (or pip install faster-coco-eval), or "
                "use TEST.COCO_EVAL_BACKEND pycocotools.") from None


def _cocoeval(coco_gt, results: List[dict], iou_type: str, backend: str):
    """The COCOeval object of ``backend`` for ``results`` against ``coco_gt`` (pycocotools')."""
    if backend == "faster_coco_eval":
        check_coco_eval_backend(backend)
        import faster_coco_eval

        gt = faster_coco_eval.COCO(coco_gt.dataset, use_deepcopy=True)  # its own index
        return faster_coco_eval.COCOeval_faster(gt, gt.loadRes(results), iou_type,
                                                print_function=print)
    return COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)


def instances_to_coco_results(
    image_id: int,
    output: Dict[str, torch.Tensor],
    category_ids: np.ndarray,
    first_label: int,
    mask_threshold: float = 0.5,
):
    """One image's detector output -> ``(box_results, mask_results)`` lists of COCO dicts.

    ``output`` is torchvision's: ``boxes`` (N, 4) xyxy, ``scores`` (N), ``labels`` (N) and, for
    Mask R-CNN, ``masks`` (N, 1, H, W) probabilities in the original image's pixels. Labels map
    to category ids through ``category_ids[label - first_label]``; masks are thresholded at
    ``mask_threshold`` and RLE-encoded.
    """
    boxes = output["boxes"].detach().float().cpu().numpy().astype(np.float64)
    if len(boxes) == 0:
        return [], []
    boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
    scores = output["scores"].detach().float().cpu().numpy().tolist()
    cats = category_ids[output["labels"].detach().cpu().numpy() - first_label].tolist()
    boxes = boxes.tolist()
    box_results = [
        {"image_id": image_id, "category_id": c, "bbox": b, "score": s}
        for c, b, s in zip(cats, boxes, scores)
    ]
    mask_results = []
    if "masks" in output:
        masks = (output["masks"][:, 0] > mask_threshold).to(torch.uint8).cpu().numpy()
        rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")  # json-serialisable
        mask_results = [
            {"image_id": image_id, "category_id": c, "segmentation": r, "score": s}
            for c, r, s in zip(cats, rles, scores)
        ]
    return box_results, mask_results


def evaluate_coco_results(coco_gt, results: List[dict], iou_type: str, image_ids: Sequence[int],
                          backend: str = "pycocotools"):
    """COCOeval of ``results`` on ``image_ids``: a dict of :data:`METRIC_NAMES` in percent.
    ``backend``: one of :data:`COCO_EVAL_BACKENDS` (the same numbers, faster_coco_eval faster).

    No result at all gives 0 for every metric (pycocotools cannot load an empty result list).
    """
    if not results:
        logger.warning("No %s predictions: every %s metric is 0.", iou_type, iou_type)
        return {k: 0.0 for k in METRIC_NAMES}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ev = _cocoeval(coco_gt, results, iou_type, backend)
        ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    logger.info("COCOeval %s (%s):\n%s", iou_type, backend, out.getvalue().rstrip())
    # stats[i] == -1 when the ground truth has nothing in that area range.
    return {k: float(v * 100) if v >= 0 else math.nan for k, v in zip(METRIC_NAMES, ev.stats[:6])}


def flatten_results(results: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """``{"bbox": {"AP": x}}`` -> ``{"bbox/AP": x}``."""
    return {f"{task}/{k}": v for task, metrics in results.items() for k, v in metrics.items()}


def format_results_table(results: Dict[str, Dict[str, float]]) -> str:
    """A fixed-width table: one row per task, one column per metric."""
    header = "| task | " + " | ".join(f"{k:>6}" for k in METRIC_NAMES) + " |"
    lines = [header, "|" + "---|" * (len(METRIC_NAMES) + 1)]
    for task, m in results.items():
        lines.append(f"| {task} | " + " | ".join(f"{m[k]:6.3f}" for k in METRIC_NAMES) + " |")
    return "\n".join(lines)


class COCOEvaluator:
    """Collects detections of a :class:`~soco_d2.finetune.coco_data.COCODetection` test set and
    evaluates them against its json (crowd regions included, as COCO's protocol wants).

    ``process(targets, outputs)`` per batch, ``evaluate()`` at the end: predictions of every
    process are gathered on the main process, which returns the results; others return ``{}``.
    """

    def __init__(self, dataset, tasks: Optional[Iterable[str]] = None, backend: str = "pycocotools"):
        check_coco_eval_backend(backend)
        self.backend = backend
        self.json_file = dataset.json_file
        self.category_ids = np.asarray(dataset.category_ids, dtype=np.int64)
        self.first_label = dataset.first_label
        self.tasks = tuple(tasks) if tasks is not None else ("bbox", "segm")
        self.reset()

    def reset(self) -> None:
        self._image_ids: List[int] = []
        self._results = {"bbox": [], "segm": []}
        self.num_skipped = 0

    def skip(self, n: int = 1) -> None:
        """Count images that could not be read (they are left out of the evaluation)."""
        self.num_skipped += n

    def process(self, targets: Sequence[dict], outputs: Sequence[Dict[str, torch.Tensor]]):
        for target, output in zip(targets, outputs):
            image_id = int(target["image_id"])
            boxes, masks = instances_to_coco_results(
                image_id, output, self.category_ids, self.first_label
            )
            self._image_ids.append(image_id)
            self._results["bbox"].extend(boxes)
            self._results["segm"].extend(masks)

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        gathered = comm.all_gather_object((self._image_ids, self._results, self.num_skipped))
        if not comm.is_main_process():
            return {}
        image_ids = [i for ids, _, _ in gathered for i in ids]
        skipped = sum(s for _, _, s in gathered)
        if skipped:
            logger.warning("%d unreadable test images were left out of the evaluation.", skipped)
        if not image_ids:
            raise RuntimeError(f"No test image of {self.json_file!r} could be evaluated.")
        coco_gt = load_coco_json(self.json_file)
        out = {}
        for task in self.tasks:
            results = [r for _, res, _ in gathered for r in res[task]]
            if task == "segm" and not results and any(res["bbox"] for _, res, _ in gathered):
                continue  # a box-only detector has no mask AP
            out[task] = evaluate_coco_results(coco_gt, results, task, image_ids, self.backend)
        logger.info("Evaluation of %d images:\n%s", len(image_ids), format_results_table(out))
        return out


def inference_on_dataset(model, data_loader, evaluator: COCOEvaluator, device=None,
                         amp_dtype: Optional[torch.dtype] = None):
    """Run ``model`` in eval mode over ``data_loader`` and return ``evaluator.evaluate()``.

    Images (``uint8`` CHW) go to ``device`` as float 0-255; images the loader could not read
    (``None``) are skipped and counted.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    evaluator.reset()
    start, n = time.perf_counter(), 0
    try:
        with torch.no_grad():
            for images, targets in data_loader:
                keep = [i for i, im in enumerate(images) if im is not None]
                evaluator.skip(len(images) - len(keep))
                if not keep:
                    continue
                batch = [images[i].to(device, non_blocking=True).float() for i in keep]
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    outputs = model(batch)
                evaluator.process([targets[i] for i in keep], outputs)
                beat("the next evaluation batch")
                n += len(keep)
    finally:
        model.train(was_training)
    elapsed = time.perf_counter() - start
    logger.info("Inference on %d images: %.1f s (%.3f s / image).", n, elapsed, elapsed / max(n, 1))
    return evaluator.evaluate()
