"""The engine's commands: ``dama-train`` (:mod:`.train`), ``dama-eval`` (:mod:`.eval`) and ``dama-pairs``
(:mod:`.pairs`).
``python -m dama_engine.cli CONFIG.yaml`` runs ``dama-train`` (what ``torchrun`` launches).
"""

from dama_engine.cli.eval import eval_main
from dama_engine.cli.pairs import pairs_main
from dama_engine.cli.train import ProgressPrinter, train_main

__all__ = [
    "ProgressPrinter",
    "eval_main",
    "pairs_main",
    "train_main",
]
