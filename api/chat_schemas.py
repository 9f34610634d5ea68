"""The ``/v1`` routes' request and response bodies: OpenAI's Chat Completions shape, the part this service runs.

What the service does not run is refused, never ignored: a parameter that is not a field here (``tools``,
``response_format``, ``logprobs``, ...) answers 400 ``unsupported_parameter`` naming it, as do ``n`` > 1 and
non-zero penalties.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError


class _Body(BaseModel):
    # Strict, as the job specs: a value is taken as the type the document says, never coerced (false is no 0).
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ImageUrl(_Body):
    url: str = Field(
        min_length=1,
        description="A base64 data URI (`data:image/png;base64,...`), or an http(s) URL where the operator allows "
        "its host (DAMA_CHAT_IMAGE_HOSTS; the API fetches it).",
    )
    detail: Literal["auto", "low", "high"] | None = Field(
        default=None, description="Accepted for compatibility; the model's processor decides the resolution."
    )


class TextPart(_Body):
    type: Literal["text"] = Field(description="A text part.")
    text: str = Field(description="The text.")


class ImagePart(_Body):
    type: Literal["image_url"] = Field(description="An image part.")
    image_url: ImageUrl = Field(description="Where the image is: a data URI (or an allowed http(s) URL).")


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"] = Field(description="Who speaks; images in user turns only.")
    content: str | list[ContentPart] | None = Field(
        description="Text, or a list of text and image_url parts in order; null only in an assistant turn (as "
        "clients replay one)."
    )
    name: str | None = Field(default=None, max_length=64, description="Accepted for compatibility; not used.")

    @model_validator(mode="after")
    def _content_of_assistants_only_may_be_null(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise PydanticCustomError("invalid_value", "content: null only in an assistant message")
        return self


class StreamOptions(_Body):
    include_usage: bool = Field(
        default=False, description="Send a last chunk with `usage` (and empty `choices`) before `[DONE]`."
    )


# An 8x8 red PNG: the documented request's image decodes (the examples are sent as they are by the fuzzing run).
EXAMPLE_IMAGE = "data:image/png;base64," + (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFElEQVR4nGM8oaHBgA0wYRUdtBIA4DgBKJ8lCQoAAAAASUVORK5CYII="
)


class ChatCompletionCreate(_Body):
    """A chat completion request (OpenAI's shape)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {
                    "model": model,
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": EXAMPLE_IMAGE}},
                                {"type": "text", "text": "Describe the image."},
                            ],
                        }
                    ],
                    "max_tokens": 8,
                    "temperature": 0,
                }
                for model in ("dama/tiny-llava", "job_0193c1f0a2b4c5d6e7f8a9b0")
            ]
        },
    )

    model: str = Field(
        min_length=1,
        max_length=300,
        description="A built-in model (`dama/tiny-llava`), a base the operator allows (GET /v1/models), `job_...` "
        "(that training job's adapter on its base, or a full fine-tune's weights) or `job_...:STEP` (a kept "
        "checkpoint).",
    )
    messages: list[ChatMessage] = Field(min_length=1, max_length=256, description="The conversation so far, in order.")
    max_tokens: int | None = Field(
        default=None,
        gt=0,
        description="Most tokens to generate (default and cap: the operator's DAMA_CHAT_MAX_TOKENS).",
    )
    max_completion_tokens: int | None = Field(default=None, gt=0, description="Same as max_tokens (newer name).")
    temperature: float | None = Field(default=None, ge=0, le=2, description="0: greedy; default 1 (OpenAI's).")
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling mass (with temperature > 0).")
    seed: int | None = Field(
        default=None, ge=0, lt=2**63, description="With sampling: the same seed gives the same answer."
    )
    stop: str | list[str] | None = Field(default=None, description="Up to 4 strings; the answer ends before one.")
    stream: bool = Field(default=False, description="Server-sent `chat.completion.chunk` events ending `[DONE]`.")
    stream_options: StreamOptions | None = Field(default=None, description="With stream: what else to send.")
    n: int | None = Field(default=None, description="Only 1.")
    frequency_penalty: float | None = Field(default=None, description="Only 0.")
    presence_penalty: float | None = Field(default=None, description="Only 0.")
    # What common clients send with their default values: accepted as long as they ask for nothing this service
    # does not do (a non-default value is 400 unsupported_parameter).
    user: str | None = Field(default=None, max_length=256, description="An end-user id; accepted, not stored.")
    logprobs: bool | None = Field(default=None, description="Only false.")
    store: bool | None = Field(default=None, description="Only false (nothing is stored for later retrieval).")
    metadata: dict[str, str] | None = Field(default=None, description="Accepted, not stored.", max_length=16)
    parallel_tool_calls: bool | None = Field(default=None, description="Accepted (no tools are run).")
    tool_choice: str | dict[str, Any] | None = Field(default=None, description="Only 'none'.")
    response_format: dict[str, Any] | None = Field(default=None, description='Only {"type": "text"}.')

    @field_validator("logprobs", "store")
    @classmethod
    def _only_false(cls, value: bool | None) -> bool | None:
        if value:
            raise PydanticCustomError("unsupported_parameter", "not supported by this service (only false)")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _no_tools(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if value not in (None, "none"):
            raise PydanticCustomError("unsupported_parameter", "tools are not supported (only 'none')")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value != {"type": "text"}:
            raise PydanticCustomError("unsupported_parameter", 'only {"type": "text"} is supported')
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise PydanticCustomError("unsupported_parameter", "only n=1 (one choice per request) is supported")
        return value

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value not in (None, 0):
            raise PydanticCustomError("unsupported_parameter", "penalties are not supported (only 0)")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not stop or len(stop) > 200 for stop in stops):
            raise PydanticCustomError("invalid_value", "stop: at most 4 non-empty strings of at most 200 characters")
        return value

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatModel(BaseModel):
    """A model this tenant may call (OpenAI's model object, plus where it comes from)."""

    id: str = Field(description="What to send as `model`.")
    object: Literal["model"] = Field(default="model", description="Always 'model'.")
    created: int = Field(description="Unix time: the job's creation, or 0 for a base model.")
    owned_by: str = Field(description="`dama` for base models, the tenant's name for its jobs.")
    base_model: str | None = Field(default=None, description="The base a job's adapter applies to.")
    vllm_loadable: bool | None = Field(
        default=None, description="Whether vLLM's multi-LoRA can load this job's adapter (no trained projector)."
    )


class ChatModelList(BaseModel):
    object: Literal["list"] = Field(default="list", description="Always 'list'.")
    data: list[ChatModel] = Field(description="The bases, then the tenant's jobs, then its merged exports.")


class UsageDay(BaseModel):
    date: str = Field(description="UTC day, YYYY-MM-DD.")
    model: str = Field(description="The model as the requests named it.")
    requests: int = Field(description="Answered requests.")
    prompt_tokens: int = Field(description="Prompt tokens (the backend's count; an estimate for a stream left early).")
    completion_tokens: int = Field(description="Generated tokens.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")


class UsagePublic(BaseModel):
    """Chat usage of this tenant (every API key) between two UTC days."""

    start_date: str = Field(description="First UTC day counted, YYYY-MM-DD.")
    end_date: str = Field(description="Last UTC day counted, YYYY-MM-DD.")
    data: list[UsageDay] = Field(description="Per UTC day and model, in order.")
    total_requests: int = Field(description="Requests in the range.")
    total_prompt_tokens: int = Field(description="Prompt tokens in the range.")
    total_completion_tokens: int = Field(description="Generated tokens in the range.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = Field(default="assistant", description="Always 'assistant'.")
    content: str | None = Field(description="The answer.")


class ChatChoice(BaseModel):
    index: int = Field(description="Always 0 (one choice per request).")
    message: AssistantMessage = Field(description="The model's answer.")
    finish_reason: str | None = Field(description="'stop' (EOS or a stop string) or 'length' (max_tokens).")


class CompletionUsage(BaseModel):
    prompt_tokens: int = Field(description="Tokens of the prompt as the model saw it (images included).")
    completion_tokens: int = Field(description="Tokens generated.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")


class ChatCompletionPublic(BaseModel):
    """A ``chat.completion`` (OpenAI's shape) as the backend answered it, ``model`` being the name you sent."""

    id: str = Field(description="The completion's id (chatcmpl-...).")
    object: Literal["chat.completion"] = Field(default="chat.completion", description="Always 'chat.completion'.")
    created: int = Field(description="Unix time.")
    model: str = Field(description="The model as the request named it.")
    choices: list[ChatChoice] = Field(description="One choice.")
    usage: CompletionUsage = Field(description="Token counts of this request.")


class JudgeCreate(_Body):
    """Answers to mark against what is in a row of a generative set (the playground's side-by-side)."""

    dataset_id: str = Field(min_length=1, max_length=64, description="A generative set of this tenant.")
    row: int = Field(ge=1, description="1-based row number among the dataset's preview rows (GET /datasets/{id}/rows).")
    answers: list[Annotated[str, Field(max_length=20_000)]] = Field(
        min_length=1, max_length=4, description="The answers to mark, e.g. the playground's two."
    )


class MentionPublic(BaseModel):
    start: int = Field(description="Character offset of the mention in the answer.")
    end: int = Field(description="Offset just after it.")
    text: str = Field(description="The words as written.")
    object: str = Field(description="The vocabulary's name for them.")
    hallucinated: bool = Field(description="Not in the image (CHAIR's rule, attributes included).")


class JudgementPublic(BaseModel):
    mentions: list[MentionPublic] = Field(description="Every object mention, left to right.")
    hallucinated: list[str] = Field(description="Objects the answer names that are not in the image.")
    covered: list[str] = Field(description="Objects in the image the answer names.")
    missed: list[str] = Field(description="Objects in the image the answer does not name.")


class JudgePublic(BaseModel):
    dataset_id: str = Field(description="The generative set.")
    row: int = Field(description="Its row (1-based, as asked).")
    objects: list[str] = Field(description="What is in the row's image.")
    judgements: list[JudgementPublic] = Field(description="One per answer, in order.")
