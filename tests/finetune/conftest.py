import json
import os

import cv2
import numpy as np
import pytest

# Category ids are not contiguous on purpose (3 -> label 1, 7 -> label 2).
CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "triangle"}]

# Overrides that make any shipped fine-tuning config run in seconds on a CPU.
TINY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.RESNETS.DEPTH", 18,
    "MODEL.NUM_CLASSES", 2,
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 200,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", 50,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 200,
    "MODEL.RPN.POST_NMS_TOPK_TEST", 30,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16,
    "MODEL.ROI_BOX_HEAD.CONV_DIM", 16,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 16,
    "TEST.DETECTIONS_PER_IMAGE", 20,
    "INPUT.MIN_SIZE_TRAIN", "(64, 96)",
    "INPUT.MAX_SIZE_TRAIN", 128,
    "INPUT.MIN_SIZE_TEST", 96,
    "INPUT.MAX_SIZE_TEST", 128,
    "SOLVER.IMS_PER_BATCH", 2,
    "SOLVER.MAX_ITER", 2,
    "SOLVER.STEPS", "(0.5,)",
    "SOLVER.WARMUP_ITERS", 1,
    "DATALOADER.NUM_WORKERS", 0,
    "TEST.PRECISE_BN.NUM_ITER", 1,
    "LOG_PERIOD", 1,
]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major run lengths, starting with zeros)."""
    flat = mask.flatten(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": counts, "size": list(mask.shape)}


def write_tiny_coco(root, split="train"):
    """4 images: two objects; an object + a crowd region + a zero-area box; no annotation;
    one object. Returns ``(json_path, image_dir)``."""
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    sizes = [(80, 96), (96, 80), (64, 64), (96, 96)]  # (h, w)
    shapes = {
        1: [(3, [10, 10, 40, 10, 40, 40, 10, 40]), (7, [50, 60, 80, 60, 65, 30])],
        2: [(7, [20, 50, 60, 50, 40, 20])],
        3: [],
        4: [(3, [30, 30, 70, 30, 70, 60, 30, 60])],
    }
    images, anns = [], []
    rng = np.random.default_rng(0)
    for image_id, (h, w) in enumerate(sizes, start=1):
        img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
        for cat, poly in shapes[image_id]:
            pts = np.array(poly, dtype=np.float64).reshape(-1, 2)
            cv2.fillPoly(img, [np.round(pts).astype(np.int32)], (200, 80 + cat * 10, 40))
            x1, y1 = pts.min(0)
            x2, y2 = pts.max(0)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float((x2 - x1) * (y2 - y1) / 2),
                         "segmentation": [poly], "iscrowd": 0})
        if image_id == 2:
            crowd = np.zeros((h, w), dtype=np.uint8)
            crowd[5:20, 5:30] = 1
            anns.append({"id": len(anns) + 1, "image_id": 2, "category_id": 3,
                         "bbox": [5.0, 5.0, 25.0, 15.0], "area": 375.0,
                         "segmentation": uncompressed_rle(crowd), "iscrowd": 1})
            anns.append({"id": len(anns) + 1, "image_id": 2, "category_id": 3,
                         "bbox": [60.0, 60.0, 0.0, 10.0], "area": 0.0,
                         "segmentation": [[60, 60, 60, 70, 60, 65]], "iscrowd": 0})
        name = f"{split}_{image_id}.png"
        cv2.imwrite(os.path.join(image_dir, name), img[:, :, ::-1])
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    path = os.path.join(root, "annotations", f"instances_{split}.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": CATEGORIES}, f)
    return path, image_dir


@pytest.fixture
def tiny_coco(tmp_path):
    return write_tiny_coco(str(tmp_path / "data"))


@pytest.fixture
def tiny_overrides():
    return list(TINY)
