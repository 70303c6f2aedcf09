"""Training: config handling, losses, metrics, DDP helpers, the trainer and checkpoint evaluation."""
from .config import DEFAULTS, apply_sets, load_config
from .losses import SegLoss
from .metrics import SegMetrics
from .trainer import train

__all__ = ["DEFAULTS", "SegLoss", "SegMetrics", "apply_sets", "load_config", "train"]
