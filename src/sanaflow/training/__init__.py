"""Training: losses that wrap a network, one trainer (accelerate, EMA, exact resume), data, export.

    from sanaflow.config import load_config
    from sanaflow.training import TrainConfig, Trainer, build_task
    cfg = load_config("train/shapes-tiny-dit", TrainConfig, ["train.max_steps=100"])
    Trainer(cfg, build_task(cfg)).fit()
"""

from .config import TrainConfig, validate
from .losses import DCAELoss, FlowMatchingLoss, PatchDiscriminator, frequency_loss, psnr, sample_flow_sigmas
from .optim import CAME, EMA, build_optimizer, build_scheduler, lr_factor
from .tasks import build_task
from .trainer import Task, Trainer, list_checkpoints

__all__ = [
    "CAME",
    "DCAELoss",
    "EMA",
    "FlowMatchingLoss",
    "PatchDiscriminator",
    "Task",
    "TrainConfig",
    "Trainer",
    "build_optimizer",
    "build_scheduler",
    "build_task",
    "frequency_loss",
    "list_checkpoints",
    "lr_factor",
    "psnr",
    "sample_flow_sigmas",
    "validate",
]
