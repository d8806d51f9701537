"""A small synthetic detection dataset (images + COCO-format labels) made on the fly.

It lets the quick-start demo and the tests run the whole chain (proposals, pretraining,
conversion, fine-tuning, COCO evaluation) with nothing to download. Each image is a textured
background with a few filled shapes (three categories: box, disc, triangle) whose instance
masks are written as COCO polygons.
"""
import json
import os

import cv2
import numpy as np

CATEGORIES = [
    {"id": 1, "name": "box", "supercategory": "shape"},
    {"id": 2, "name": "disc", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]


def _background(rng, size):
    """Smooth random colour field plus fine noise, so shapes are not trivially separable."""
    low = rng.integers(40, 216, size=(4, 4, 3)).astype(np.uint8)
    img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    img += rng.integers(-20, 21, size=img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_polygon(rng, category, cx, cy, r):
    if category == 1:  # axis-aligned box with a random aspect ratio
        a = rng.uniform(0.6, 1.0)
        w, h = (r, r * a) if rng.random() < 0.5 else (r * a, r)
        return np.array([[cx - w, cy - h], [cx + w, cy - h], [cx + w, cy + h], [cx - w, cy + h]])
    if category == 2:  # disc as a 24-gon
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
    t = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def make_synthetic_coco(output_dir, num_images, image_size=128, seed=0, split="train"):
    """Write ``num_images`` PNG images and ``annotations/instances_<split>.json``.

    Returns ``(json_path, image_dir)``. Shapes do not overlap, so every polygon is also the
    visible mask.
    """
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(output_dir, split)
    ann_dir = os.path.join(output_dir, "annotations")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        img = _background(rng, image_size)
        placed = []  # (cx, cy, r) of shapes already drawn
        for _ in range(int(rng.integers(1, 4))):
            for _attempt in range(20):
                r = rng.uniform(0.12, 0.28) * image_size
                cx, cy = rng.uniform(r, image_size - r, size=2)
                if all(np.hypot(cx - px, cy - py) > r + pr + 2 for px, py, pr in placed):
                    break
            else:
                continue
            placed.append((cx, cy, r))
            category = int(rng.integers(1, 4))
            poly = _shape_polygon(rng, category, cx, cy, r)
            poly = np.clip(poly, 0, image_size - 1)
            colour = [int(c) for c in rng.integers(0, 256, size=3)]
            cv2.fillPoly(img, [np.round(poly).astype(np.int32)], colour)
            x1, y1 = poly.min(0)
            x2, y2 = poly.max(0)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                    "area": float(cv2.contourArea(poly.astype(np.float32))),
                    "segmentation": [poly.reshape(-1).round(2).tolist()],
                    "iscrowd": 0,
                }
            )
        file_name = f"{split}_{image_id:05d}.png"
        cv2.imwrite(os.path.join(image_dir, file_name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        images.append(
            {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
        )
    json_path = os.path.join(ann_dir, f"instances_{split}.json")
    with open(json_path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    return json_path, image_dir
