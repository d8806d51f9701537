"""Detector fine-tuning: torchvision Mask R-CNN (v2 design) / RetinaNet on COCO-format data."""
from .coco_data import (
    COCODetection,
    get_dataset_paths,
    register_coco_instances,
    registered_datasets,
)
from .detectors import build_detector, first_label

__all__ = [
    "COCODetection",
    "build_detector",
    "first_label",
    "get_dataset_paths",
    "register_coco_instances",
    "registered_datasets",
]
