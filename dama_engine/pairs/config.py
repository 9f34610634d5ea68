"""The pair generation's config (``dama-pairs CONFIG.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dama_engine.config import ModelSection, apply_overrides, read_yaml_mapping, validate_config
from dama_engine.forward import GenerationSettings
from dama_engine.pairs.labels import ObjectJudgeConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PairsDataSection(_Section):
    generative: str = Field(
        description="Generative set JSONL (image, prompt, objects): the prompts to sample. With a judge: a prompt "
        "set (image, prompt; no objects), whose objects the judge lists."
    )
    vocabulary: str = Field(description="Vocabulary JSON (object names and synonyms) the samples are judged with.")
    max_prompts: int | None = Field(default=None, gt=0, description="Use only the first N prompts of the set.")


class PairsSamplingSection(_Section):
    samples_per_prompt: int = Field(default=8, ge=2, description="Answers sampled per prompt (a pair needs two).")
    prompts_per_batch: int = Field(
        default=4, gt=0, description="Prompts per generate call: each call answers prompts_per_batch x samples rows."
    )


class PairsConfig(_Section):
    """One pair generation: the model to sample (``model.init_adapter``: base + that PEFT adapter), the generative
    set, how to decode (``generation``: sampling, each sample seeded from ``generation.seed``), the judge that lists
    the objects of a set without them (``judge``) and where to write."""

    model: ModelSection
    data: PairsDataSection
    generation: GenerationSettings = GenerationSettings(temperature=1.0, max_new_tokens=128)
    sampling: PairsSamplingSection = PairsSamplingSection()
    judge: ObjectJudgeConfig | None = Field(
        default=None,
        description="A model behind an OpenAI-compatible chat endpoint that lists each image's objects, for a "
        "prompt set (no objects of its own); the key may come from DAMA_JUDGE_API_KEY (the dama-pairs CLI).",
    )
    device: str = Field(default="auto", description="auto (CUDA when available), cpu, cuda or cuda:N.")
    output_dir: str = "runs/pairs"

    @model_validator(mode="after")
    def _sampled(self) -> PairsConfig:
        if not self.generation.sampling:
            raise ValueError(
                "generation.temperature must be > 0: pairs need several different answers per prompt "
                "(greedy decoding gives the same one every time); try 1.0"
            )
        return self


def parse_pairs_config(values: dict[str, Any]) -> PairsConfig:
    return validate_config(PairsConfig, values, "pair generation config")


def load_pairs_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PairsConfig:
    """Read a YAML pair generation config, apply ``key=value`` / ``section.key=value`` overrides, validate."""
    values = read_yaml_mapping(path) if path is not None else {}
    return parse_pairs_config(apply_overrides(values, overrides))
