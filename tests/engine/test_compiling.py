"""Regional torch.compile of the decoder layers (dama_engine.forward.compiling) against the eager layers.

Float32 on the CPU (inductor's C++ backend): the same log-probs, loss and LoRA gradients through the packed and
two-row layouts, with gradient checkpointing off and on, the adapter off (the reference pass), and generation.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from dama_engine.config import LoraSection
from dama_engine.data.rows import PreferenceRow
from dama_engine.forward.batching import PairEncoder, collate_pairs
from dama_engine.forward.compiling import compile_decoder_layers, decoder_layers, eager, is_compiled, resolve_compile
from dama_engine.forward.generation import GenerationRequest, GenerationSettings, generate_token_ids
from dama_engine.forward.logprobs import pair_log_probs
from dama_engine.models.loading import make_trainable

from .test_packing import _lora_model, _loss_and_grads, uneven_rows  # noqa: F401  (uneven_rows: a fixture)


def test_resolve_compile() -> None:
    assert resolve_compile("auto", torch.device("cuda")) is True
    assert resolve_compile("auto", torch.device("cpu")) is False
    assert resolve_compile("layers", torch.device("cpu")) is True
    assert resolve_compile("off", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="compile 'fast' is unknown"):
        resolve_compile("fast", torch.device("cpu"))


def test_a_model_without_decoder_layers_is_not_compiled(tiny_models) -> None:
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["llava"])
    model.model.language_model.layers = torch.nn.ModuleList()  # a layout with no decoder layers to find
    # auto trains eagerly (with a warning); layers refuses, naming what to use instead.
    assert compile_decoder_layers(model, "auto", torch.device("cuda")) == 0
    with pytest.raises(ValueError, match=r"compile 'layers' is not possible: .*no `layers` module list"):
        compile_decoder_layers(model, "layers", torch.device("cpu"))


def test_decoder_layers_of_every_family(tiny_models) -> None:
    for family in ("llava", "qwen2_vl", "idefics3"):
        model = make_trainable(AutoModelForImageTextToText.from_pretrained(tiny_models[family]), LoraSection(r=4))
        layers = decoder_layers(model)
        assert len(layers) == 2 and all(type(layer).__name__.endswith("DecoderLayer") for layer in layers)
        # Off, or auto on a CPU: nothing is compiled.
        assert compile_decoder_layers(model, "auto", torch.device("cpu")) == 0
        assert not any(is_compiled(layer) for layer in layers)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_compiled_layers_equal_eager_layers(tiny_models, uneven_rows: list[PreferenceRow], family: str) -> None:  # noqa: F811
    torch._dynamo.reset()
    processor = AutoProcessor.from_pretrained(tiny_models[family])
    model = _lora_model(tiny_models[family])
    pairs = [PairEncoder(processor, max_length=512).encode(row, i) for i, row in enumerate(uneven_rows)]
    batch = collate_pairs(pairs, processor.tokenizer.pad_token_id)

    cases = [("packed", False), ("packed", True), ("two_rows", False)]
    eager_results = {}
    for forward, checkpointing in cases:
        _set_checkpointing(model, checkpointing)
        eager_results[forward, checkpointing] = _loss_and_grads(model, batch, forward)
    with torch.no_grad(), model.disable_adapter():
        eager_reference = torch.stack(pair_log_probs(model, batch, forward="packed"))

    assert compile_decoder_layers(model, "layers", torch.device("cpu")) == 2
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert all(is_compiled(layer) for layer in decoder_layers(model))
    # The state dict (what the adapter export saves) keeps its names: compiling is in place.
    assert not any("_orig_mod" in name for name in model.state_dict())
    for forward, checkpointing in cases:
        _set_checkpointing(model, checkpointing)
        logps, loss, grads = _loss_and_grads(model, batch, forward)
        want_logps, want_loss, want_grads = eager_results[forward, checkpointing]
        case = f"{forward}, checkpointing {checkpointing}"
        torch.testing.assert_close(logps, want_logps, rtol=0, atol=1e-4, msg=f"{case}: log-probs")
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6, msg=f"{case}: loss")
        assert grads.keys() == want_grads.keys() and len(grads) == 2 * 7 * 2
        for name, grad in want_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=f"{case}: {name}")
    # The layers really ran compiled (a silent fall-back to eager would pass the comparisons above too).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_before
    _set_checkpointing(model, False)
    with torch.no_grad(), model.disable_adapter():
        reference = torch.stack(pair_log_probs(model, batch, forward="packed"))
    torch.testing.assert_close(reference, eager_reference, rtol=0, atol=1e-4)

    # Optimizer steps taken through the compiled layers: compiled and eager layers still agree at the new weights
    # (on an H100 in bf16 they drifted apart until inductor was told to round as eager does).
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    for _ in range(2):
        _loss_and_grads(model, batch, "packed")
        optimizer.step()
    with torch.no_grad():
        compiled_logps = torch.stack(pair_log_probs(model, batch, forward="packed"))
        with eager():
            eager_logps = torch.stack(pair_log_probs(model, batch, forward="packed"))
    assert (compiled_logps - eager_results["packed", False][0]).abs().max() > 0.1  # the steps moved the model
    torch.testing.assert_close(compiled_logps, eager_logps, rtol=0, atol=1e-4)
    assert torch._inductor.config.emulate_precision_casts


def test_generation_with_compiled_layers_runs_eagerly(tiny_models, uneven_rows: list[PreferenceRow]) -> None:  # noqa: F811
    processor = AutoProcessor.from_pretrained(tiny_models["llava"])
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["llava"]).eval()
    requests = [GenerationRequest.from_prompt("Describe the image.", row.images) for row in uneven_rows[:2]]
    settings = GenerationSettings(max_new_tokens=6)
    before = generate_token_ids(model, processor, requests, settings)
    compile_decoder_layers(model, "layers", torch.device("cpu"))
    counters_before = dict(torch._dynamo.utils.counters["stats"])
    after = generate_token_ids(model, processor, requests, settings)
    assert after == before
    # Nothing was traced: generation ran the layers eagerly.
    assert dict(torch._dynamo.utils.counters["stats"]) == counters_before


def _set_checkpointing(model: Any, enabled: bool) -> None:
    if enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def test_benchmark_plans_compiled_layers_first() -> None:
    """`bench_train.py --llava7b` times the compiled configurations (and their reference pass) before the eager
    ones, so a budget that runs short cuts the eager tail; `--tiny` (CPU) compiles nothing unless asked."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train_plan", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up there
    spec.loader.exec_module(bench)

    engine = bench.plan(bench.parse_args(["--llava7b"]), True, True)[1]
    compiled = [name for name in engine if name.endswith("/compiled")]
    assert engine.index("engine/packed/dama/gc_off/b8/compiled") < engine.index("engine/packed/dama/gc_off/b4")
    assert engine.index("reference/packed/compiled") < engine.index("engine/packed/dama/gc_off/b4")
    assert "engine/packed/dama/gc_on/b12/compiled" in compiled and "engine/packed/dama/gc_on/b8" in engine
    tiny = bench.plan(bench.parse_args(["--tiny"]), True, False)[1]
    assert not any(name.endswith("/compiled") for name in tiny)
    tiny_compiled = bench.plan(bench.parse_args(["--tiny", "--compile", "on"]), True, False)[1]
    assert (
        "engine/packed/dama/gc_off/b4/compiled" in tiny_compiled and "engine/packed/dama/gc_off/b4" not in tiny_compiled
    )
