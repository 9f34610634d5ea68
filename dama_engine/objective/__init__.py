"""DAMA's objective: the loss of every method (:mod:`.loss`, shared/DAMA.md sections 2-5) and data hardness (the
formulas in :mod:`.hardness`, computing it for a dataset in :mod:`.scoring`, section 1).
"""

from dama_engine.objective.hardness import flat_index, joint_softmax, user_hardness
from dama_engine.objective.loss import (
    ObjectiveConfig,
    ObjectiveOutput,
    ObjectiveState,
    Selection,
    merge_step_states,
    metric_floats,
    preference_loss,
    reward_gap,
    select_pairs,
    sft_loss,
)
from dama_engine.objective.scoring import HardnessConfig, compute_hardness, describe_hardness, hardness_cache_key

__all__ = [
    "HardnessConfig",
    "ObjectiveConfig",
    "ObjectiveOutput",
    "ObjectiveState",
    "Selection",
    "compute_hardness",
    "describe_hardness",
    "flat_index",
    "hardness_cache_key",
    "joint_softmax",
    "merge_step_states",
    "metric_floats",
    "preference_loss",
    "reward_gap",
    "select_pairs",
    "sft_loss",
    "user_hardness",
]
