"""Serving: answering OpenAI-style chat requests with the engine's models, many requests per ``generate`` call.

The server (``worker.infer``, the ``dama infer`` command) is HTTP around these parts, which know nothing of HTTP:

* :mod:`.protocol`: a Chat Completions request checked and turned into a
  :class:`~dama_engine.forward.GenerationRequest` and a row's decoding settings; the answers' bodies; errors in
  OpenAI's shape (:class:`ChatError`);
* :mod:`.cache`: the models kept loaded (a byte budget, least recently used evicted) and the LoRA adapters loaded
  into their base (a bounded number per base);
* :mod:`.scheduler`: admission (a cap on requests held at once) and the batching thread;
* :mod:`.batch`: one ``generate`` call for a batch, each row with its own length, sampling, stop strings and
  stream (:mod:`.text`: a row's text as it is generated).

A greedy answer is the one :func:`dama_engine.forward.generate` gives for the same model and prompt, in any batch:
the same encoding (left padding, the chat template), the same EOS cut, the same text (special tokens dropped,
surrounding whitespace trimmed). A seeded sampled answer is the one its seed gives alone.
"""

from dama_engine.serving.batch import BatchRow, Event, Failed, Finished, TextDelta, run_batch
from dama_engine.serving.cache import (
    AdapterSource,
    Lease,
    LoadedModel,
    ModelCache,
    ModelRef,
    ModelSource,
    model_bytes,
    serving_device,
)
from dama_engine.serving.protocol import (
    ChatAnswer,
    ChatError,
    ChatLimits,
    ChatRequest,
    ChatResponder,
    RowSettings,
    model_not_found,
    parse_chat_request,
    public_message,
    server_error,
)
from dama_engine.serving.scheduler import Admission, Scheduler, Ticket
from dama_engine.serving.text import RowText

__all__ = [
    "AdapterSource",
    "Admission",
    "BatchRow",
    "ChatAnswer",
    "ChatError",
    "ChatLimits",
    "ChatRequest",
    "ChatResponder",
    "Event",
    "Failed",
    "Finished",
    "Lease",
    "LoadedModel",
    "ModelCache",
    "ModelRef",
    "ModelSource",
    "RowSettings",
    "RowText",
    "Scheduler",
    "TextDelta",
    "Ticket",
    "model_bytes",
    "model_not_found",
    "parse_chat_request",
    "public_message",
    "run_batch",
    "server_error",
    "serving_device",
]
