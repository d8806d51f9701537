"""Training engine: launch, optimizer (LARS), schedules, checkpoints, metric writers, trainer."""
from .arguments import default_argument_parser
from .checkpoint import Checkpointer, CheckpointMismatchError
from .launch import default_backend, launch
from .optimizer import LARS, build_optimizer
from .schedules import build_lr_schedule, build_momentum_schedule, max_iter_from_cfg, scaled_lr
from .trainer import PretrainTrainer

__all__ = [
    "default_argument_parser",
    "launch",
    "default_backend",
    "LARS",
    "build_optimizer",
    "scaled_lr",
    "max_iter_from_cfg",
    "build_lr_schedule",
    "build_momentum_schedule",
    "Checkpointer",
    "CheckpointMismatchError",
    "PretrainTrainer",
]
