"""Names both sides of the engine/service boundary must agree on: methods, stages, choices, file suffixes."""

from __future__ import annotations

from typing import Literal, get_args

Method = Literal["dpo", "beta_dpo", "dama_data", "dama_model", "dama", "sft"]
METHODS: tuple[str, ...] = get_args(Method)
# The methods that learn from pairs (shared/DAMA.md section 4); ``sft`` learns from the preferred answer only (4b).
PREFERENCE_METHODS: tuple[str, ...] = tuple(method for method in METHODS if method != "sft")

# The stages of a training run, in order (dama_engine.callbacks; the job's `stage` column).
Stage = Literal["validating", "loading_model", "scoring", "reference", "training", "evaluating", "exporting"]
STAGES: tuple[str, ...] = get_args(Stage)

FilterStd = Literal["fixed", "running"]
EmaSource = Literal["all", "kept"]
FilterScope = Literal["micro_batch", "step"]
Aggregation = Literal["joint_softmax", "mean_cosine"]
HardnessRescale = Literal["none", "minmax"]
CompileMode = Literal["auto", "layers", "off"]
Precision = Literal["auto", "bf16", "fp32"]
DataFormat = Literal["auto", "trl", "rlaif_v", "openai"]
Scheduler = Literal["cosine", "linear", "constant"]
PairForward = Literal["auto", "packed", "two_rows", "model_logits"]
Strategy = Literal["ddp", "fsdp"]

# A dataset's data file (dama_engine.data.formats reads these; api.uploads accepts them).
DATA_FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet")
# Archives with a data file and its images (the engine recognises archives by content; uploads by name).
ARCHIVE_SUFFIXES: tuple[str, ...] = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar", ".zip")

FILTER_STDS: tuple[str, ...] = get_args(FilterStd)
EMA_SOURCES: tuple[str, ...] = get_args(EmaSource)
FILTER_SCOPES: tuple[str, ...] = get_args(FilterScope)
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
HARDNESS_RESCALES: tuple[str, ...] = get_args(HardnessRescale)
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
PRECISIONS: tuple[str, ...] = get_args(Precision)
DATA_FORMATS: tuple[str, ...] = get_args(DataFormat)
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)
PAIR_FORWARDS: tuple[str, ...] = get_args(PairForward)
STRATEGIES: tuple[str, ...] = get_args(Strategy)
