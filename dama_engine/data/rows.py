"""The canonical preference row every dataset format is read into.

A row is one preference pair: a prompt conversation (with images referenced by position), the preferred
(``chosen``) and dispreferred (``rejected``) assistant answers, and optional user-supplied scores. Images are
kept as sources (a path or bytes) and decoded only when needed, so a large dataset is not held decoded in memory.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from PIL import Image

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class ImageSource:
    """Where an image's bytes come from: a file path or the encoded bytes themselves (PNG, JPEG, ...)."""

    path: Path | None = None
    data: bytes | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError("ImageSource needs exactly one of path or data")

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()

    def load(self) -> Image.Image:
        """Decode to an RGB PIL image."""
        with Image.open(io.BytesIO(self.read_bytes())) as image:
            return image.convert("RGB")


@dataclass(frozen=True)
class TextPart:
    text: str
    type: Literal["text"] = "text"


@dataclass(frozen=True)
class ImagePart:
    """A placeholder for the next image of the row (images are consumed in order)."""

    type: Literal["image"] = "image"


@dataclass(frozen=True)
class Message:
    role: Role
    content: tuple[TextPart | ImagePart, ...]

    def to_chat(self) -> dict[str, Any]:
        """The message in the transformers chat-template form (``{"role", "content": [{"type": ...}]}``)."""
        parts: list[dict[str, str]] = []
        for part in self.content:
            parts.append({"type": "text", "text": part.text} if isinstance(part, TextPart) else {"type": "image"})
        return {"role": self.role, "content": parts}


@dataclass(frozen=True)
class PreferenceRow:
    """One preference pair in canonical form.

    Attributes:
        row_id: stable identifier (the source's id column, else ``"<row number>"``).
        prompt: the conversation up to the answer; the last message is the user's.
        chosen: the preferred assistant answer (plain text).
        rejected: the dispreferred assistant answer (plain text).
        images: image sources, one per :class:`ImagePart` in ``prompt``, in order.
        chosen_score / rejected_score: optional user-supplied per-answer scores (DAMA.md section 1.5).
        hardness: optional user-supplied ``delta_i`` (takes precedence over the two scores).
        row_number: 1-based position in the source file, for error reports.
        meta: any other columns, kept for provenance.
        answer_only: the row carries one answer (``chosen``; ``rejected`` is empty): TRL's prompt/completion form,
            usable by ``method: sft`` only (shared/DAMA.md section 4b).
    """

    row_id: str
    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    images: tuple[ImageSource, ...] = ()
    chosen_score: float | None = None
    rejected_score: float | None = None
    hardness: float | None = None
    row_number: int = 0
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    answer_only: bool = False

    @property
    def image_placeholder_count(self) -> int:
        return sum(isinstance(part, ImagePart) for message in self.prompt for part in message.content)

    @property
    def prompt_text(self) -> str:
        """The text of the prompt's user turns, joined (used by scorers and reports)."""
        return "\n".join(
            part.text
            for message in self.prompt
            if message.role == "user"
            for part in message.content
            if isinstance(part, TextPart)
        )

    def conversation(self, answer: str) -> list[dict[str, Any]]:
        """The prompt plus ``answer`` as the assistant turn, in chat-template form."""
        answer_message = Message(role="assistant", content=(TextPart(answer),))
        return [message.to_chat() for message in (*self.prompt, answer_message)]

    def prompt_chat(self) -> list[dict[str, Any]]:
        return [message.to_chat() for message in self.prompt]


def answer_only(row: PreferenceRow) -> PreferenceRow:
    """The row with its preferred answer alone (what supervised fine-tuning learns from)."""
    return row if row.answer_only else replace(row, rejected="", rejected_score=None, hardness=None, answer_only=True)
