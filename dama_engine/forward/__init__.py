"""Forward passes: batching pairs (:mod:`.batching`), per-token and summed log-probs (:mod:`.logprobs`), the
packed fast paths (:mod:`.packing`), regional compiling (:mod:`.compiling`), generation (:mod:`.generation`), and the
scoring helpers training and evaluation share (:mod:`.scoring`).
"""

from dama_engine.forward.batching import EncodingError, PairBatch, PairEncoder
from dama_engine.forward.compiling import compile_decoder_layers, decoder_layers
from dama_engine.forward.generation import (
    GenerationRequest,
    GenerationSettings,
    encode_requests,
    eos_token_ids,
    generate,
)
from dama_engine.forward.logprobs import pair_log_probs
from dama_engine.forward.packing import resolve_pair_forward, set_pair_forward
from dama_engine.forward.scoring import autocast, check_lengths, encode_batch, pair_log_probs_all

__all__ = [
    "EncodingError",
    "GenerationRequest",
    "GenerationSettings",
    "PairBatch",
    "PairEncoder",
    "autocast",
    "check_lengths",
    "compile_decoder_layers",
    "decoder_layers",
    "encode_batch",
    "encode_requests",
    "eos_token_ids",
    "generate",
    "pair_log_probs",
    "pair_log_probs_all",
    "resolve_pair_forward",
    "set_pair_forward",
]
