"""Every knob shared by the engine config, the job spec and the objective, written once.

Each table maps a field name to its :class:`~dama_settings.setting.Setting`; the engine config's sections
(``dama_engine.config``) use the names as they are, the job spec (``jobstore.spec``) under the groups noted.
"""

from __future__ import annotations

from dama_settings.names import (
    AGGREGATIONS,
    COMPILE_MODES,
    DATA_FORMATS,
    EMA_SOURCES,
    FILTER_SCOPES,
    FILTER_STDS,
    HARDNESS_RESCALES,
    METHODS,
    PAIR_FORWARDS,
    PRECISIONS,
    SCHEDULERS,
    STRATEGIES,
)
from dama_settings.setting import Setting, by_name

DEFAULT_SCORER = "openai/clip-vit-large-patch14-336"

# ---- objective (shared/DAMA.md sections 2-4): config `objective.*`, spec `method` + `hyperparameters.*` ----
OBJECTIVE = by_name(
    Setting(
        "method",
        "dama",
        "dpo, beta_dpo, dama_data, dama_model or dama (DAMA.md section 4), or sft: mean per-token NLL of the "
        "preferred answer, no reference pass (DAMA.md section 4b).",
        choices=METHODS,
    ),
    Setting("beta", 0.1, "Base DPO temperature (DAMA.md section 3).", gt=0),
    Setting("keep_ratio", 0.8, "Share of each filtering group kept by the model-aware filter.", gt=0, le=1),
    Setting("gamma", 0.9, "Momentum of the running reward-gap mean (DAMA.md section 2).", ge=0, lt=1),
    Setting("beta_min", 1e-3, "Clamp floor of every per-pair beta (DAMA.md section 3).", gt=0),
    Setting(
        "beta_max", 1e6, "Clamp ceiling of every per-pair beta [decision]: keeps beta * R finite; far above use.", gt=0
    ),
    Setting(
        "filter_std",
        "fixed",
        "Gaussian width of the filter: fixed = filter_sigma (released code); running = the gap's running std.",
        choices=FILTER_STDS,
    ),
    Setting("filter_sigma", 1.0, "Fixed width s of the Gaussian filter weights (DAMA.md section 2.2).", gt=0),
    Setting(
        "ema_source",
        "all",
        "Pairs the running gap mean is updated from: all (released code) or kept (the paper's text).",
        choices=EMA_SOURCES,
    ),
    Setting("beta_dpo_a", 0.6, "beta-DPO's scaling a in beta * (1 + a * (mean_kept R - R_bar))."),
    Setting(
        "filter_scope",
        "micro_batch",
        "The group the model-aware filter and alpha_M see (DAMA.md 2.5): micro_batch = each micro-batch across "
        "GPUs; step = every pair of the optimizer step (a no-grad scoring pass first, about a third more step time).",
        choices=FILTER_SCOPES,
    ),
)

# ---- data hardness (DAMA.md section 1): config `hardness.*`, spec `hardness_scorer`, `hardness_rescale` ----
HARDNESS = by_name(
    Setting(
        "scorer",
        DEFAULT_SCORER,
        "CLIP model for data hardness; unused when every row carries scores.",
        min_length=1,
        max_length=300,
    ),
    Setting(
        "aggregation",
        "joint_softmax",
        "How per-sub-sentence CLIP scores become delta: joint_softmax (delta in [-1, 1]) or mean_cosine.",
        choices=AGGREGATIONS,
    ),
    Setting("splitter", "rule", "Sub-sentence splitter (DAMA.md section 1.1)."),
    Setting("batch_size", 32, "Pairs per CLIP forward.", gt=0),
    Setting(
        "rescale",
        "none",
        "User-supplied scores: none = used as given; minmax = mapped linearly onto [-1, 1], the range joint_softmax "
        "gives, so alpha_D spans the same range as with CLIP. Unused for CLIP-scored data.",
        choices=HARDNESS_RESCALES,
    ),
)

# ---- optimisation: config `optim.*`, spec `hyperparameters.*` ------------------------------------------------
OPTIM = by_name(
    # LoRA needs a far larger step than the paper's full fine-tune (5e-7); 2e-5 is the usual LoRA-DPO choice.
    Setting("learning_rate", 2e-5, "AdamW learning rate (LoRA default 2e-5).", gt=0),
    Setting("weight_decay", 0.0, "AdamW weight decay.", ge=0),
    Setting("warmup_ratio", 0.1, "Share of the steps spent warming the learning rate up.", ge=0, lt=1),
    Setting("scheduler", "cosine", "Learning-rate schedule after warmup.", choices=SCHEDULERS),
    Setting("max_grad_norm", 1.0, "Gradient clipping norm (None: no clipping).", gt=0),
    Setting("epochs", 1, "Passes over the training pairs.", gt=0, service_le=100),
    Setting("max_steps", None, "Optimizer steps; overrides epochs when set.", gt=0, service_le=10**9),
    Setting("batch_size", 4, "Pairs per device per micro-batch.", gt=0, service_le=1024),
    Setting("grad_accumulation", 1, "Micro-batches per optimizer step.", gt=0, service_le=1024),
    Setting(
        "gradient_checkpointing",
        False,
        "Recompute activations in the backward pass: less memory, about 30% slower.",
    ),
    Setting(
        "pair_forward",
        "auto",
        "How pairs go through the model (dama_engine.forward.packing): packed = one row per pair [prompt, chosen, "
        "rejected] and the lm_head on answer positions only; two_rows = a row per answer, same head; "
        "model_logits = a row per answer and the model's own logits; auto = packed where the model family "
        "and attention take it, else two_rows, else model_logits.",
        choices=PAIR_FORWARDS,
    ),
    Setting(
        "compile",
        "auto",
        "Regional torch.compile of the language model's decoder layers (dama_engine.forward.compiling): layers = "
        "always; auto = on CUDA only, falling back to eager with a warning if compiling fails; off = never.",
        choices=COMPILE_MODES,
    ),
    Setting("seed", 0, "Seed of the batch order, the filtering draws and the LoRA initialisation.", ge=0, le=2**32 - 1),
)

# ---- data: config `data.*`, spec `hyperparameters.max_length`, `evaluation.holdout_fraction` -----------------
DATA = by_name(
    Setting("format", "auto", "Data format; auto detects it.", choices=DATA_FORMATS),
    Setting("max_length", 2048, "Tokens per sequence, image tokens included.", gt=0),
    Setting("eval_fraction", 0.0, "Hold out this share of the training pairs for evaluation.", ge=0, lt=1),
    Setting(
        "truncate_answers",
        False,
        "Cut over-long answers to fit max_length instead of rejecting the row. Never cuts the prompt.",
    ),
    Setting("skip_invalid_rows", False, "Drop rows that fail validation instead of stopping."),
    # Pixel budgets: an image is resized to fit them before the processor sees it, never cut in tokens.
    Setting(
        "max_pixels",
        None,
        "Largest image area in pixels (width x height); a larger image is scaled down, aspect kept, before the "
        "processor (Qwen2-VL's processor also takes it: its image token count follows). Null: the processor's own.",
        gt=0,
    ),
    Setting(
        "min_pixels",
        None,
        "Smallest image area in pixels; a smaller image is scaled up, aspect kept (Qwen2-VL's processor also takes "
        "it). Null: the processor's own.",
        gt=0,
    ),
    Setting(
        "max_image_side",
        None,
        "Longest image side in pixels, for any family (for those whose processor has no pixel budget, such as "
        "LLaVA's fixed-size one, it bounds decoding and resizing work); a longer image is scaled down, aspect kept.",
        gt=0,
    ),
)

# ---- model: config `model.*`, spec `trust_remote_code` ---------------------------------------------------------
MODEL = by_name(
    Setting("precision", "auto", "auto: bf16 where the hardware supports it, float32 otherwise.", choices=PRECISIONS),
    Setting("trust_remote_code", False, "Allow the model repo's own code (off by default; the service may refuse it)."),
)

# ---- LoRA: config `lora.*`, spec `lora.*` ----------------------------------------------------------------------
LORA = by_name(
    Setting("enabled", True, "LoRA (default), or false: a full fine-tune of the language model."),
    Setting("r", 16, "LoRA rank.", gt=0, service_le=1024),
    Setting("alpha", 32, "LoRA scaling alpha.", gt=0),
    Setting("dropout", 0.05, "LoRA dropout.", ge=0, lt=1),
    Setting(
        "target_modules",
        None,
        "Module names (at most 64); default: the family's language-model projections.",
        max_length=64,
    ),
    Setting("train_projector", False, "Also train the multimodal projector in full."),
)

# ---- run: config `run.*`, spec `hyperparameters.*` -------------------------------------------------------------
RUN = by_name(
    Setting(
        "checkpoint_every",
        None,
        "Save a resumable checkpoint every N steps.",
        gt=0,
        # A job may be re-queued after a lost worker: checkpoint by default so it resumes.
        service_default=50,
    ),
    Setting(
        "keep_checkpoints",
        None,
        "How many of the newest checkpoints are kept (older ones are pruned); default (null): 2 for LoRA, 1 for a "
        "full fine-tune, whose checkpoints hold the whole model and its optimizer states (about 100 GB for 7B). "
        "Each LoRA checkpoint is downloadable as an adapter.",
        gt=0,
        service_le=100,
    ),
    Setting("eval_every", None, "Evaluate on the held-out split every N steps.", gt=0),
)

# How many checkpoints are kept when keep_checkpoints is left unset (null), by kind of run.
KEEP_CHECKPOINTS_LORA = 2
KEEP_CHECKPOINTS_FULL = 1

# ---- several processes: config `distributed.*`, spec `strategy` ------------------------------------------------
DISTRIBUTED = by_name(
    Setting(
        "strategy",
        "ddp",
        "How several GPUs share one job (with one, both are the same run): ddp = a whole copy of the model and "
        "optimizer on every GPU, gradients averaged; fsdp = parameters, gradients and optimizer states sharded "
        "across the GPUs (PyTorch FSDP2), for full fine-tunes and models whose training state does not fit one GPU.",
        choices=STRATEGIES,
    ),
)

# ---- evaluation after training: config `evaluation.*`, spec `evaluation.*` -------------------------------------
EVALUATION = by_name(
    Setting("max_new_tokens", 64, "Greedy generation length on the generative set.", gt=0, service_le=4096),
    Setting("max_samples", 64, "Generative samples scored: the set's first N (null: all).", gt=0),
    Setting(
        "pope",
        True,
        "Ask POPE's yes/no questions ('Is there a {entry} in the image?': present entries and absent ones under the "
        "random, popular and adversarial splits) about the generative set's images, beside CHAIR.",
    ),
)
