"""Serving (dama_engine.serving): chat requests -> engine requests, batched generation with per-row limits, stop
strings, seeds and streams, the batching scheduler, and the model cache's eviction of models and adapters."""

from __future__ import annotations

import base64
import json
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from dama_engine.data.rows import ImageSource
from dama_engine.forward.generation import GenerationRequest, GenerationSettings, encode_requests, generate_token_ids
from dama_engine.models.families import family_for
from dama_engine.serving import (
    AdapterSource,
    BatchRow,
    ChatError,
    ChatLimits,
    Event,
    Failed,
    Finished,
    ModelCache,
    ModelRef,
    ModelSource,
    RowSettings,
    RowText,
    Scheduler,
    TextDelta,
    Ticket,
    model_bytes,
    parse_chat_request,
    public_message,
    run_batch,
)
from tests.engine.conftest import png_bytes

CPU = torch.device("cpu")


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def make_lora_adapter(model_dir: Path, folder: Path, *, base_name: str, seed: int = 0) -> Path:
    """A LoRA adapter on a tiny model with random (non-zero) B weights, so its answers differ from the base's,
    saved as training saves one (``base_model_name_or_path``: the public model name)."""
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    lora = LoraConfig(r=8, lora_alpha=64, target_modules=family_for(model).lora_target_regex, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(str(folder))
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base_name
    config_file.write_text(json.dumps(config))
    return folder


class Recorder:
    """A row's sink: the events it got, in order."""

    def __init__(self, on_event: Callable[[Event], None] | None = None) -> None:
        self.events: list[Event] = []
        self.on_event = on_event

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    @property
    def deltas(self) -> list[str]:
        return [event.text for event in self.events if isinstance(event, TextDelta)]

    @property
    def finished(self) -> Finished:
        ends = [event for event in self.events if not isinstance(event, TextDelta)]
        assert len(ends) == 1 and isinstance(ends[0], Finished), self.events
        return ends[0]


@pytest.fixture(scope="module")
def llava(tiny_models: dict[str, Path]) -> tuple[Any, Any]:
    path = tiny_models["llava"]
    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def _requests() -> list[GenerationRequest]:
    """Prompts of different lengths, images of different sizes, one without an image (left padding exercised)."""
    return [
        GenerationRequest.from_prompt("Describe the image.", [Image.new("RGB", (40, 30), (220, 30, 30))]),
        GenerationRequest.from_prompt("What is in this picture? Answer briefly, please.", []),
        GenerationRequest.from_prompt("Shapes?", [Image.new("RGB", (32, 64), (30, 70, 220))]),
    ]


def _alone(model: Any, processor: Any, request: GenerationRequest, max_tokens: int) -> tuple[str, int, str]:
    """The engine's own answer to ``request`` alone: text, tokens generated (EOS included) and finish reason."""
    ids = generate_token_ids(model, processor, [request], GenerationSettings(max_new_tokens=max_tokens))[0]
    text = processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
    return text, min(len(ids) + 1, max_tokens), "length" if len(ids) == max_tokens else "stop"


# ---- rows in one generate call ---------------------------------------------------------------------------------
def test_a_batch_answers_each_row_as_generate_does_alone(llava: tuple[Any, Any]) -> None:
    model, processor = llava
    requests, limits = _requests(), [6, 3, 5]
    recorders = [Recorder() for _ in requests]
    rows = [
        BatchRow(request, RowSettings(max_tokens=limit, temperature=0), recorder, stream=index != 1)
        for index, (request, limit, recorder) in enumerate(zip(requests, limits, recorders, strict=True))
    ]
    calls = []
    original = model.generate

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["max_new_tokens"])
        return original(*args, **kwargs)

    model.generate = counting
    try:
        run_batch(model, processor, rows, device=CPU, dtype=torch.float32)
    finally:
        del model.generate
    assert calls == [6]  # one generate call for the three rows, to the longest limit
    assert len({recorder.finished.answer.prompt_tokens for recorder in recorders}) > 1  # so some rows were padded
    for request, limit, recorder, row in zip(requests, limits, recorders, rows, strict=True):
        text, tokens, reason = _alone(model, processor, request, limit)
        answer = recorder.finished.answer
        assert (answer.text, answer.completion_tokens, answer.finish_reason) == (text, tokens, reason)
        # the prompt tokens are its own, with no padding
        assert answer.prompt_tokens == encode_requests(processor, [request])["input_ids"].shape[1]
        if row.stream:
            assert "".join(recorder.deltas) == text and len(recorder.deltas) > 1
        else:
            assert recorder.deltas == []


def test_stop_strings_end_the_answer_and_are_never_streamed(llava: tuple[Any, Any]) -> None:
    model, processor = llava
    request = _requests()[0]
    full, _, _ = _alone(model, processor, request, 12)
    stop = full.split()[1]  # the second word: the answer goes on after it
    recorder = Recorder()
    row = BatchRow(request, RowSettings(max_tokens=12, temperature=0, stop=("never there", stop)), recorder, True)
    run_batch(model, processor, [row], device=CPU, dtype=torch.float32)
    answer = recorder.finished.answer
    assert answer.text == full[: full.index(stop)].strip() and answer.finish_reason == "stop"
    assert answer.completion_tokens < 12  # the row ended at the stop string, not at its limit
    assert "".join(recorder.deltas) == answer.text and not any(stop in delta for delta in recorder.deltas)


def test_seeded_rows_sample_as_the_engine_whatever_their_batch(llava: tuple[Any, Any]) -> None:
    model, processor = llava
    requests = _requests()
    sampled = RowSettings(max_tokens=6, temperature=0.9, top_p=0.9, seed=5)
    engine = GenerationSettings(max_new_tokens=6, temperature=0.9, top_p=0.9)
    expected = generate_token_ids(model, processor, [requests[2]], engine, row_seeds=[5])[0]
    recorders = [Recorder() for _ in range(3)]
    rows = [
        BatchRow(requests[0], RowSettings(max_tokens=4, temperature=0), recorders[0]),
        BatchRow(requests[1], RowSettings(max_tokens=6, temperature=1.0, seed=99), recorders[1]),
        BatchRow(requests[2], sampled, recorders[2]),
    ]
    run_batch(model, processor, rows, device=CPU, dtype=torch.float32)
    assert recorders[2].finished.answer.text == processor.tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert recorders[0].finished.answer.text == _alone(model, processor, requests[0], 4)[0]  # greedy beside it
    greedy = _alone(model, processor, requests[2], 6)[0]
    assert recorders[2].finished.answer.text != greedy


def test_a_cancelled_row_stops_at_once_and_its_batch_goes_on(llava: tuple[Any, Any]) -> None:
    model, processor = llava
    requests = _requests()
    cancelled = threading.Event()
    gone = Recorder(on_event=lambda event: cancelled.set())  # the client leaves at its first text
    other = Recorder()
    rows = [
        BatchRow(requests[0], RowSettings(max_tokens=10, temperature=0), gone, stream=True, cancelled=cancelled),
        BatchRow(requests[2], RowSettings(max_tokens=10, temperature=0), other, stream=True),
    ]
    run_batch(model, processor, rows, device=CPU, dtype=torch.float32)
    assert len(gone.events) == 1 and isinstance(gone.events[0], TextDelta)  # nothing after it left
    assert other.finished.answer.text == _alone(model, processor, requests[2], 10)[0]


def test_a_request_the_processor_refuses_fails_alone(llava: tuple[Any, Any]) -> None:
    model, processor = llava
    good, bad = Recorder(), Recorder()
    broken = GenerationRequest.from_prompt("Two images, one placeholder.", [Image.new("RGB", (8, 8))])
    broken = GenerationRequest(messages=broken.messages, images=(*broken.images, Image.new("RGB", (8, 8))))
    rows = [
        BatchRow(_requests()[0], RowSettings(max_tokens=3, temperature=0), good),
        BatchRow(broken, RowSettings(max_tokens=3, temperature=0), bad),
    ]
    run_batch(model, processor, rows, device=CPU, dtype=torch.float32)
    assert good.finished.answer.text == _alone(model, processor, _requests()[0], 3)[0]
    [failure] = bad.events
    assert isinstance(failure, Failed) and failure.error.status == 400


# ---- the text of a row -----------------------------------------------------------------------------------------
class PieceTokenizer:
    """Token i decodes to pieces[i] (bytes, joined, then decoded as UTF-8 with replacement, as byte-level BPE)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def _stream(text: RowText, ids: list[int]) -> list[str]:
    deltas = []
    for token in ids:
        stopped = text.add(token)
        deltas.append(text.delta(final=stopped))
        if stopped:
            break
    else:
        deltas.append(text.delta(final=True))
    return deltas


def test_row_text_holds_back_what_may_start_a_stop_string() -> None:
    tokenizer = PieceTokenizer([b" Hel", b"lo E", b"N", b"D more", b"x", b" there "])
    text = RowText(tokenizer, stop=("END",))
    assert _stream(text, [0, 1, 2, 3]) == ["Hel", "lo", "", ""]
    assert text.answer() == "Hello" and text.stopped
    # A false start is released when the next token rules it out; trailing whitespace waits, then is trimmed.
    text = RowText(tokenizer, stop=("END",))
    assert _stream(text, [0, 1, 4, 5]) == ["Hel", "lo", " Ex", " there", ""]
    assert text.answer() == "Hello Ex there" and not text.stopped


def test_row_text_waits_for_a_whole_utf8_character() -> None:
    tokenizer = PieceTokenizer([b"caf", "é".encode()[:1], "é".encode()[1:], b"!"])
    text = RowText(tokenizer)
    assert _stream(text, [0, 1, 2, 3]) == ["caf", "", "é", "!", ""]
    assert text.answer() == "café!"
    text = RowText(tokenizer)  # a character never completed stays a replacement character, as generate() gives it
    assert "".join(_stream(text, [0, 1, 3])) == text.answer() == "caf\ufffd!"


# ---- the protocol ----------------------------------------------------------------------------------------------
LIMITS = ChatLimits(max_tokens=64, max_images=2, max_image_pixels=100 * 100)


def test_a_user_message_of_an_image_and_text_is_the_evaluations_request(llava: tuple[Any, Any]) -> None:
    _, processor = llava
    png = png_bytes((10, 200, 30), (40, 30))
    content = [{"type": "image_url", "image_url": {"url": data_uri(png)}}, {"type": "text", "text": "What is it?"}]
    parsed = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": content}]}, LIMITS)
    evaluation = GenerationRequest.from_prompt("What is it?", [ImageSource(data=png)])
    assert parsed.generation.messages == evaluation.messages
    [image] = parsed.generation.images
    assert image.tobytes() == ImageSource(data=png).load().tobytes()
    render = processor.apply_chat_template
    assert render(list(parsed.generation.messages), add_generation_prompt=True) == render(
        list(evaluation.messages), add_generation_prompt=True
    )
    # Defaults: OpenAI's temperature (1.0), the server's max_tokens, no stream.
    assert parsed.settings == RowSettings(max_tokens=64, temperature=1.0, top_p=1.0, seed=None, stop=())
    assert not parsed.stream and not parsed.include_usage


def test_string_contents_and_every_role() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
            {"role": "user", "content": "Colour?", "name": "ann"},
        ],
        "max_completion_tokens": 7,
        "temperature": 0,
        "top_p": 0.5,
        "seed": 3,
        "stop": "\n",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    parsed = parse_chat_request(body, LIMITS)
    assert [m["content"] for m in parsed.generation.messages] == [
        [{"type": "text", "text": "Be brief."}],
        [{"type": "text", "text": "Hi"}],
        [{"type": "text", "text": "Hello."}],
        [{"type": "text", "text": "Colour?"}],
    ]
    assert parsed.settings == RowSettings(max_tokens=7, temperature=0.0, top_p=0.5, seed=3, stop=("\n",))
    assert parsed.settings.greedy and parsed.stream and parsed.include_usage


def _message(*parts: dict[str, Any], role: str = "user") -> list[dict[str, Any]]:
    return [{"role": role, "content": list(parts)}]


TEXT = {"type": "text", "text": "Hi"}
REFUSED: list[tuple[dict[str, Any], str, str | None]] = [
    ({"n": 2}, "unsupported_parameter", "n"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "unsupported_parameter", "messages[0]"),
    ({"messages": []}, "invalid_value", "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "invalid_value", "messages[0].role"),
    (
        {"messages": _message({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}})},
        "invalid_image_url",
        "messages[0].content[0].image_url",
    ),
    (
        {"messages": _message({"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}})},
        "invalid_image_url",
        "messages[0].content[0].image_url",
    ),
    (
        {"messages": _message({"type": "image_url", "image_url": {"url": data_uri(b"not an image")}})},
        "invalid_image",
        "messages[0].content[0].image_url",
    ),
    (
        {"messages": _message({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}})},
        "invalid_image",
        "messages[0].content[0].image_url",
    ),
    (
        {"messages": _message({"type": "image_url", "image_url": {"url": data_uri(png_bytes((1, 2, 3), (200, 60)))}})},
        "invalid_image",
        "messages[0].content[0].image_url",
    ),
    (
        {
            "messages": _message(
                {"type": "image_url", "image_url": {"url": data_uri(png_bytes((1, 2, 3)))}}, TEXT, role="system"
            )
        },
        "invalid_value",
        "messages[0].content[0]",
    ),
    (
        {"messages": _message(*[{"type": "image_url", "image_url": {"url": data_uri(png_bytes((1, 2, 3)))}}] * 3)},
        "invalid_value",
        "messages",
    ),
    ({"messages": _message({"type": "input_audio"})}, "invalid_value", "messages[0].content[0]"),
    ({"max_tokens": 65}, "invalid_value", "max_tokens"),
    ({"max_tokens": 0}, "invalid_value", "max_tokens"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "invalid_value", "max_completion_tokens"),
    ({"max_tokens": "5"}, "invalid_value", "max_tokens"),
    ({"temperature": 2.5}, "invalid_value", "temperature"),
    ({"top_p": 0}, "invalid_value", "top_p"),
    ({"seed": 1.5}, "invalid_value", "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "invalid_value", "stop"),
    ({"stop": [""]}, "invalid_value", "stop"),
    ({"stream_options": {"include_usage": True}}, "invalid_value", "stream_options"),
    ({"model": ""}, "invalid_value", "model"),
]


@pytest.mark.parametrize(("change", "code", "param"), REFUSED)
def test_bad_requests_are_refused_naming_the_parameter(change: dict[str, Any], code: str, param: str | None) -> None:
    body = {"model": "m", "messages": _message(TEXT), **change}
    with pytest.raises(ChatError) as caught:
        parse_chat_request(body, LIMITS)
    error = caught.value
    assert (error.status, error.code, error.param) == (400, code, param)
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_error_messages_name_no_server_path() -> None:
    error = ChatError("Could not open /srv/dama/models/x/config.json or C: /tmp/y")
    assert error.message == "Could not open <path> or C: <path>"
    assert public_message("between 1 and 64, data:image/png") == "between 1 and 64, data:image/png"


# ---- the scheduler -----------------------------------------------------------------------------------------------
def test_the_scheduler_batches_requests_on_the_same_model_and_adapter(
    tiny_models: dict[str, Path], tmp_path: Path, llava: tuple[Any, Any]
) -> None:
    model, processor = llava
    base = ModelSource("dama/tiny-llava", str(tiny_models["llava"]), precision="fp32")
    adapter = AdapterSource("job_a", str(make_lora_adapter(tiny_models["llava"], tmp_path / "a", base_name=base.name)))
    cache = ModelCache(max_bytes=1 << 30, max_adapters=4, device=CPU)
    scheduler = Scheduler(max_batch=2, window_s=0.5, max_concurrent=8)
    request = _requests()[0]
    events: queue.Queue[tuple[int, Event]] = queue.Queue()
    leases = [cache.acquire(ModelRef(base)) for _ in range(3)] + [cache.acquire(ModelRef(base, adapter))]
    for index, lease in enumerate(leases):  # all queued before the thread starts: batches are decided by key
        sink = (lambda i: lambda event: events.put((i, event)))(index)
        scheduler.submit(Ticket.make(lease, request, RowSettings(max_tokens=4, temperature=0), sink))
    started = time.monotonic()
    scheduler.start()
    try:
        answers = {}
        while len(answers) < 4:
            index, event = events.get(timeout=30)
            assert isinstance(event, Finished)
            answers[index] = event.answer.text
    finally:
        scheduler.stop()
    assert scheduler.batches == 3 and scheduler.rows == 4  # [base, base] at once, [base] after its window, [adapter]
    assert time.monotonic() - started >= 0.4  # the lone base ticket waited for company
    expected = _alone(model, processor, request, 4)[0]
    assert answers[0] == answers[1] == answers[2] == expected
    tuned = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base.path), adapter.path).eval()
    assert answers[3] == _alone(tuned, processor, request, 4)[0] != expected


def test_admission_is_capped_and_a_cancelled_ticket_leaves_the_queue(tiny_models: dict[str, Path]) -> None:
    scheduler = Scheduler(max_batch=4, window_s=0.0, max_concurrent=2)  # not started: tickets stay queued
    first, second = scheduler.admit(), scheduler.admit()
    with pytest.raises(ChatError) as caught:
        scheduler.admit()
    assert (caught.value.status, caught.value.code) == (503, "server_overloaded")
    assert caught.value.headers == {"Retry-After": "1"}
    first.release()
    first.release()  # again: no effect
    assert scheduler.held == 1
    third = scheduler.admit()
    assert scheduler.held == 2
    cache = ModelCache(max_bytes=1 << 30, max_adapters=1, device=CPU)
    lease = cache.acquire(ModelRef(ModelSource("m", str(tiny_models["llava"]), precision="fp32")))
    recorder = Recorder()
    ticket = Ticket.make(lease, _requests()[0], RowSettings(max_tokens=2), recorder)
    scheduler.submit(ticket)
    assert scheduler.queued == 1
    scheduler.cancel(ticket)
    assert scheduler.queued == 0 and ticket.row.cancelled.is_set()
    waiting = Recorder()
    scheduler.submit(Ticket.make(lease, _requests()[0], RowSettings(max_tokens=2), waiting))
    scheduler.stop()  # what is queued is refused, retry later
    assert recorder.events == []
    [refused] = waiting.events
    assert isinstance(refused, Failed) and (refused.error.status, refused.error.code) == (503, "server_shutting_down")
    with pytest.raises(ChatError):
        scheduler.admit()
    for admission in (second, third):
        admission.release()
    assert scheduler.held == 0


# ---- the model cache ----------------------------------------------------------------------------------------------
def test_the_cache_keeps_models_within_its_bytes_least_recently_used_out(tiny_models: dict[str, Path]) -> None:
    sources = {family: ModelSource(family, str(path), precision="fp32") for family, path in tiny_models.items()}
    sizes = {
        family: model_bytes(AutoModelForImageTextToText.from_pretrained(path)) for family, path in tiny_models.items()
    }
    cache = ModelCache(max_bytes=sizes["llava"] + sizes["qwen2_vl"] + 100_000, max_adapters=1, device=CPU)

    def use(family: str) -> None:
        cache.release(cache.acquire(ModelRef(sources[family])))

    def loaded() -> set[str]:
        return {name for name, _ in cache.loaded_models()}

    use("llava")
    use("qwen2_vl")
    use("llava")  # now qwen2_vl is the least recently used
    assert loaded() == {"llava", "qwen2_vl"} and cache.total_bytes == sizes["llava"] + sizes["qwen2_vl"]
    use("idefics3")
    assert loaded() == {"llava", "idefics3"}
    # Models in use are never evicted: over the budget while all are held, back under it once released.
    held = [cache.acquire(ModelRef(sources[family])) for family in ("llava", "idefics3", "qwen2_vl")]
    assert loaded() == {"llava", "idefics3", "qwen2_vl"} and cache.total_bytes > cache.max_bytes
    for lease in held:
        cache.release(lease)
    assert cache.total_bytes <= cache.max_bytes and loaded() == {"idefics3", "qwen2_vl"}
    with pytest.raises(ChatError) as caught:
        cache.acquire(ModelRef(ModelSource("gone", str(tiny_models["llava"].parent / "missing" / "model"))))
    assert (caught.value.status, caught.value.code) == (404, "model_not_found")
    assert str(tiny_models["llava"].parent) not in caught.value.message


def test_the_cache_keeps_few_adapters_per_base(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    base = ModelSource("dama/tiny-llava", str(tiny_models["llava"]), precision="fp32")
    adapters = [
        AdapterSource(
            f"job_{i}", str(make_lora_adapter(Path(base.path), tmp_path / str(i), base_name=base.name, seed=i))
        )
        for i in range(3)
    ]
    cache = ModelCache(max_bytes=1 << 30, max_adapters=1, device=CPU)
    plain = cache.acquire(ModelRef(base))
    first = cache.acquire(ModelRef(base, adapters[0]))
    second = cache.acquire(ModelRef(base, adapters[1]))  # the first is held: both stay
    assert [name for name, _ in cache.loaded_models()] == ["dama/tiny-llava", "job_0", "job_1"]
    cache.release(first)
    cache.release(second)
    third = cache.acquire(ModelRef(base, adapters[2]))  # over the limit: the least recently used unheld ones go
    assert [name for name, _ in cache.loaded_models()] == ["dama/tiny-llava", "job_2"]
    peft_model = third.loaded.model
    assert third.adapter is not None and list(peft_model.peft_config) == [third.adapter.peft_name]
    request = _requests()[0]
    with plain.generating() as model:  # base rows: the adapter switched off
        recorder = Recorder()
        run_batch(
            model,
            plain.loaded.processor,
            [BatchRow(request, RowSettings(max_tokens=4, temperature=0), recorder)],
            device=CPU,
            dtype=torch.float32,
        )
    fresh = AutoModelForImageTextToText.from_pretrained(base.path).eval()
    assert recorder.finished.answer.text == _alone(fresh, plain.loaded.processor, request, 4)[0]
