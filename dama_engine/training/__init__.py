"""Training: the recipe (:func:`train`, :mod:`.recipe`), the step (:mod:`.step`), checkpoints, the reference
cache, the metrics log, export, charts and host-sync counting. Training may import evaluation (to evaluate after
training); evaluation never imports training.
"""

from dama_engine.training.checkpoint import ADAPTER_DIR, checkpoint_dir, checkpoint_step, latest_checkpoint
from dama_engine.training.estimate import estimate_training
from dama_engine.training.export import export_merged
from dama_engine.training.metrics_log import truncate_metrics
from dama_engine.training.recipe import TrainResult, check_filter_group, train

__all__ = [
    "ADAPTER_DIR",
    "TrainResult",
    "check_filter_group",
    "checkpoint_dir",
    "checkpoint_step",
    "estimate_training",
    "export_merged",
    "latest_checkpoint",
    "train",
    "truncate_metrics",
]
