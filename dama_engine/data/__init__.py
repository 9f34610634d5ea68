"""Datasets in, canonical rows out; torch-free (nothing here imports torch, transformers or peft).

Rows and lines (:mod:`.rows`, :mod:`.lines`), validation (:mod:`.validation`), the formats split by job (archives,
readers, images, converters: :mod:`.archives`, :mod:`.readers`, :mod:`.images`, :mod:`.formats`), the generative
eval set (:mod:`.generative`), the CHAIR matcher and counts (:mod:`.chair`), and the upload check and preview the
service runs in a child process (``python -m dama_engine.data.check`` / ``.preview``).
"""

from dama_engine.data.formats import load_and_validate, load_dataset
from dama_engine.data.generative import (
    GenerativeEvalError,
    GenerativeEvalSet,
    GenerativeSample,
    find_generative_files,
    load_generative_eval,
)
from dama_engine.data.images import PixelBudget
from dama_engine.data.lines import DataFormatError, DataLimitError
from dama_engine.data.matcher import (
    ChairSample,
    Vocabulary,
    VocabularyError,
    VocabularyLike,
    as_vocabulary,
    chair,
    chair_samples,
    grounded,
    judge_response,
    mark_response,
    normalize_name,
    plural_forms,
    summarize_chair,
)
from dama_engine.data.rows import ImagePart, ImageSource, Message, PreferenceRow, TextPart, answer_only
from dama_engine.data.validation import DataError, DataLimits, ValidationReport

__all__ = [
    "ChairSample",
    "DataError",
    "DataFormatError",
    "DataLimitError",
    "DataLimits",
    "GenerativeEvalError",
    "GenerativeEvalSet",
    "GenerativeSample",
    "ImagePart",
    "ImageSource",
    "Message",
    "PixelBudget",
    "PreferenceRow",
    "TextPart",
    "ValidationReport",
    "Vocabulary",
    "VocabularyError",
    "VocabularyLike",
    "answer_only",
    "as_vocabulary",
    "chair",
    "chair_samples",
    "find_generative_files",
    "grounded",
    "judge_response",
    "load_and_validate",
    "load_dataset",
    "load_generative_eval",
    "mark_response",
    "normalize_name",
    "plural_forms",
    "summarize_chair",
]
