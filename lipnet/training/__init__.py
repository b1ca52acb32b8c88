"""Certified training: margin losses, the shared training loop, DDP, and the final report."""

from lipnet.training.config import TrainConfig, parse_number
from lipnet.training.distributed import Distributed, init_distributed, resolve_device, shutdown_distributed
from lipnet.training.losses import (
    CertifiedMarginLoss,
    margin_for,
    multi_margin_hinge,
    offset_cross_entropy,
    pairwise_lipschitz,
    pairwise_margin_cross_entropy,
)
from lipnet.training.schedule import lr_factor, make_scheduler, plan_epochs
from lipnet.training.trainer import RunResult, build_run_model, logit_margins, nominal_lipschitz, train

__all__ = [
    "CertifiedMarginLoss",
    "Distributed",
    "RunResult",
    "TrainConfig",
    "build_run_model",
    "init_distributed",
    "logit_margins",
    "lr_factor",
    "make_scheduler",
    "margin_for",
    "multi_margin_hinge",
    "nominal_lipschitz",
    "offset_cross_entropy",
    "pairwise_lipschitz",
    "pairwise_margin_cross_entropy",
    "parse_number",
    "plan_epochs",
    "resolve_device",
    "shutdown_distributed",
    "train",
]
