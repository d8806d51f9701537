import cv2
import numpy as np
from pycocotools.coco import COCO

from soco_d2.data.synthetic import CATEGORIES, make_synthetic_coco


def test_labels_match_pixels(tmp_path):
    json_path, image_dir = make_synthetic_coco(str(tmp_path), num_images=6, image_size=96, seed=3)
    coco = COCO(json_path)
    assert len(coco.imgs) == 6 and len(coco.anns) >= 6
    assert sorted(coco.cats) == [c["id"] for c in CATEGORIES]
    for ann in coco.anns.values():
        info = coco.imgs[ann["image_id"]]
        img = cv2.imread(f"{image_dir}/{info['file_name']}")[:, :, ::-1]
        mask = coco.annToMask(ann).astype(bool)
        # The painted shape is one flat colour: inside the mask (less its rim) pixels barely vary.
        core = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        inside = img[core].astype(np.float32)
        assert inside.std(0).max() < 12
        # The box encloses the mask.
        ys, xs = np.nonzero(mask)
        x, y, w, h = ann["bbox"]
        assert xs.min() >= np.floor(x) - 1 and xs.max() <= np.ceil(x + w) + 1
        assert ys.min() >= np.floor(y) - 1 and ys.max() <= np.ceil(y + h) + 1
        assert abs(mask.sum() - ann["area"]) / ann["area"] < 0.25


def test_same_seed_same_data(tmp_path):
    a, _ = make_synthetic_coco(str(tmp_path / "a"), 3, seed=7)
    b, _ = make_synthetic_coco(str(tmp_path / "b"), 3, seed=7)
    assert open(a).read() == open(b).read()
