"""Evaluating a tuned model against its base: the config (:mod:`.config`), running it (:mod:`.run`), the
preference metrics by hardness bucket (:mod:`.metrics`), POPE's questions and metrics (:mod:`.pope`), the judge
client (:mod:`.judge`) and the report (:mod:`.report`). CHAIR's matcher is the torch-free
:mod:`dama_engine.data.matcher`. Evaluation never imports training.
"""

from dama_engine.evaluation.config import EvaluationConfig, load_evaluation_config, parse_evaluation_config
from dama_engine.evaluation.judge import JUDGE_FAILURES, JudgeConfig, JudgeError, chat_completion
from dama_engine.evaluation.metrics import logprob_stats
from dama_engine.evaluation.report import comparison_table, plot_evaluation
from dama_engine.evaluation.run import EvaluationResult, evaluate_after_training, resolve_device, run_evaluation

__all__ = [
    "JUDGE_FAILURES",
    "EvaluationConfig",
    "EvaluationResult",
    "JudgeConfig",
    "JudgeError",
    "chat_completion",
    "comparison_table",
    "evaluate_after_training",
    "load_evaluation_config",
    "logprob_stats",
    "parse_evaluation_config",
    "plot_evaluation",
    "resolve_device",
    "run_evaluation",
]
