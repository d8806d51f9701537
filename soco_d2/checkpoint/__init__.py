"""Safe loading of checkpoints and conversion to detectron2 ``.pkl`` / torchvision weights."""
from .io import CheckpointError, UnsafeCheckpointError, load_checkpoint_file
from .layout import ConversionError
from .to_d2 import ConversionReport, convert_to_d2, save_d2_pkl
from .to_torchvision import convert_to_torchvision, d2_to_torchvision, save_torchvision_state_dict

__all__ = [
    "CheckpointError",
    "ConversionError",
    "ConversionReport",
    "UnsafeCheckpointError",
    "convert_to_d2",
    "convert_to_torchvision",
    "d2_to_torchvision",
    "load_checkpoint_file",
    "save_d2_pkl",
    "save_torchvision_state_dict",
]
