"""soco_d2: detection-aligned self-supervised pretraining (SoCo, DetCo) and its transfer."""
__version__ = "0.1.0"
