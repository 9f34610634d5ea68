"""Judge targets: models behind OpenAI-compatible chat endpoints that list the objects of images without labels,
defined by the operator and picked by name in a pair generation's spec (torch-free: the API checks names, the
worker calls).

The operator lists targets in ``DAMA_JUDGE_TARGETS`` (JSON: name -> target). A target's key is never in a spec or in
this setting: ``api_key_env`` names the variable of the workers' environment that holds it. Naming a target in a
spec is the tenant's consent to send its images there. Where a judge may be: the webhooks' address policy
(:mod:`jobstore.webhooks`): a host that is or resolves to a private, loopback, link-local or reserved address is
refused unless it is on ``DAMA_JUDGE_ALLOWED_HOSTS``; the worker resolves the host once per run, checks every
address and connects to the one it checked.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobstore.tracking import TargetName

JudgeName = TargetName


class JudgeTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="Base URL of the OpenAI-compatible API (…/chat/completions is called under it).")
    model: str = Field(min_length=1, description="The judge model's name at that endpoint.")
    api_key_env: str | None = Field(
        default=None, description="The workers' environment variable holding the bearer key (None: no key)."
    )
    prompt: str | None = Field(
        default=None, min_length=1, description="The text sent with each image (None: the engine's listing prompt)."
    )
    max_tokens: int = Field(default=128, gt=0, le=4096)
    timeout_s: float = Field(default=60.0, gt=0, le=600, description="Per request: connection, then whole reply.")
    max_response_bytes: int = Field(default=1_000_000, gt=0)
    concurrency: int = Field(default=4, gt=0, le=64, description="Requests in flight at once per run.")

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry credentials (user:password@): use api_key_env")
        return url

    def engine_values(self, name: str) -> dict[str, Any]:
        """The engine's judge config (``dama_engine.pairs.labels.ObjectJudgeConfig``) for this target, the key read
        from the worker's environment."""
        values: dict[str, Any] = {
            "url": self.url,
            "model": self.model,
            "name": name,
            "max_tokens": self.max_tokens,
            "timeout_s": self.timeout_s,
            "max_response_bytes": self.max_response_bytes,
            "concurrency": self.concurrency,
        }
        if self.prompt is not None:
            values["prompt"] = self.prompt
        if self.api_key_env:
            values["api_key"] = (os.environ.get(self.api_key_env) or "").strip() or None  # a file's newline dropped
        return values
