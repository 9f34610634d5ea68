"""dama_engine: DAMA (Data- and Model-aware DPO) preference tuning of vision-language models.

The ML library behind the service, usable on its own: dataset formats -> canonical rows -> batches
(:mod:`dama_engine.data`, :mod:`dama_engine.batching`), data hardness (:mod:`dama_engine.hardness`), the objective
(:mod:`dama_engine.objective`), model loading with LoRA (:mod:`dama_engine.models`), the training recipe
(:mod:`dama_engine.trainer`), adapter export and the ``dama-train`` CLI. It imports nothing of the service,
reads no environment variables and sets no global state at import time.
"""

__version__ = "0.1.0"
