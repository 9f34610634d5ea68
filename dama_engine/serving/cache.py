"""The models a server keeps loaded: whole models within a byte budget, LoRA adapters inside their base.

* **Models** (:class:`ModelSource`: a built-in model's folder, a hub name, a full fine-tune's folder) are loaded
  once, on first use, and kept while the sum of their parameter and buffer bytes stays within ``max_bytes``; a new
  model makes room by evicting the least recently used ones first. A model in use is never evicted: every
  request holds a :class:`Lease` from the moment it is accepted until its answer is delivered, and a running batch
  holds the model's ``busy`` lock. When the models in use alone are above the budget, the new one is loaded
  anyway and the cache goes back under it as they are released.
* **Adapters** (:class:`AdapterSource`) are loaded into a peft model around their base
  (``PeftModel.from_pretrained``, then ``load_adapter`` for the next ones): one copy of the base weights serves the
  base and all its adapters. At most ``max_adapters`` stay loaded per base, the least recently used unheld one
  deleted first (``delete_adapter``). A batch runs with its adapter set (``set_adapter``), or for base rows
  inside ``disable_adapter()`` (:meth:`Lease.generating`).

Loading happens in the requests' threads, one load per model at a time (a slow hub download holds up only the
requests for that model); changing a model's adapters waits for its running batch. Models load as the engine loads
them (:func:`dama_engine.models.load_model` / ``load_processor``), in the precision their source names.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from dama_engine.config import ModelSection
from dama_engine.models import load_model, load_processor, resolve_dtype
from dama_engine.serving.protocol import ChatError, model_not_found

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16"]
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class ModelSource:
    """A model to load: ``path`` is what ``from_pretrained`` gets (a folder or a hub name), ``name`` what clients
    call it (never a server path)."""

    name: str
    path: str
    precision: Precision = "auto"  # auto: bf16 on a GPU that has it, else float32
    trust_remote_code: bool = False


@dataclass(frozen=True)
class AdapterSource:
    """A PEFT LoRA adapter folder (``adapter_config.json``) to load onto its base."""

    name: str
    path: str


@dataclass(frozen=True)
class ModelRef:
    """What a request names: a model, or an adapter on its base."""

    base: ModelSource
    adapter: AdapterSource | None = None

    @property
    def name(self) -> str:
        return self.adapter.name if self.adapter is not None else self.base.name


@dataclass(eq=False)
class LoadedAdapter:
    source: AdapterSource
    peft_name: str  # its name inside the peft model (adapter names must be plain module names)
    pins: int = 0
    created: int = field(default_factory=lambda: int(time.time()))


class LoadedModel:
    """A model in memory with its processor, its adapters and who holds it."""

    def __init__(self, source: ModelSource, model: Any, processor: Any, device: torch.device, dtype: torch.dtype):
        self.source = source
        self.model = model  # the transformers model; a peft model around it once an adapter is loaded
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.peft = False
        self.nbytes = model_bytes(model)
        self.pins = 0
        self.adapters: OrderedDict[AdapterSource, LoadedAdapter] = OrderedDict()  # least recently used first
        self.busy = threading.Lock()  # held while a batch generates or the adapters change
        self.created = int(time.time())
        self._adapter_count = 0

    def next_adapter_name(self) -> str:
        self._adapter_count += 1
        return f"adapter_{self._adapter_count}"


@dataclass(eq=False)
class Lease:
    """A request's hold on a loaded model (and adapter): neither is evicted until it is released."""

    loaded: LoadedModel
    adapter: LoadedAdapter | None = None
    released: bool = False

    @property
    def batch_key(self) -> tuple[int, str | None]:
        """Requests with the same key can share a generate call."""
        return id(self.loaded), self.adapter.peft_name if self.adapter is not None else None

    @contextlib.contextmanager
    def generating(self) -> Iterator[Any]:
        """The model to generate with, its adapter set (or switched off for the base), held for the block."""
        with self.loaded.busy:
            model = self.loaded.model
            if self.adapter is not None:
                model.set_adapter(self.adapter.peft_name, inference_mode=True)
                yield model
            elif self.loaded.peft:
                with model.disable_adapter():
                    yield model
            else:
                yield model


def model_bytes(model: Any) -> int:
    """The bytes of a model's parameters and buffers (shared tensors once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _weight_file_bytes(path: str) -> int:
    """The size of a local model folder's weight files (0 for a hub name): a guess at what loading it takes."""
    folder = Path(path)
    if not folder.is_dir():
        return 0
    return sum(file.stat().st_size for file in folder.iterdir() if file.name.endswith(WEIGHT_SUFFIXES))


class ModelCache:
    """Models and adapters loaded on demand and kept within ``max_bytes`` / ``max_adapters`` (module docstring)."""

    def __init__(self, *, max_bytes: int, max_adapters: int, device: torch.device) -> None:
        if max_bytes < 1 or max_adapters < 1:
            raise ValueError("max_bytes and max_adapters must be positive")
        self.max_bytes = max_bytes
        self.max_adapters = max_adapters
        self.device = device
        self._models: OrderedDict[ModelSource, LoadedModel] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # the bookkeeping (short holds)
        self._loading: dict[ModelSource, threading.Lock] = {}  # per model: its load and its adapter changes

    # ---- holding ------------------------------------------------------------------------------------------------
    def acquire(self, ref: ModelRef) -> Lease:
        """Hold ``ref``'s model (and adapter), loading what is missing; blocks while loading. Raises
        :class:`ChatError` (404 when the files are not there, 400 when they are no model this server loads)."""
        lease = self._hold(ref)
        if lease is not None:
            return lease
        with self._lock:
            loading = self._loading.setdefault(ref.base, threading.Lock())
        with loading:  # one load per model at a time; other models load meanwhile
            lease = self._hold(ref)
            if lease is not None:
                return lease
            lease = self._hold(ModelRef(ref.base))
            try:
                loaded = lease.loaded if lease is not None else self._load_model(ref)
            except BaseException:
                with self._lock:
                    self._loading.pop(ref.base, None)  # not kept for names that never load
                raise
            if ref.adapter is None:
                return Lease(loaded)
            try:
                return Lease(loaded, self._load_adapter(loaded, ref))
            except BaseException:
                self.release(Lease(loaded))
                raise

    def release(self, lease: Lease) -> None:
        """Give a hold back (again: no effect); trims the cache if it went over its budget while models were held."""
        with self._lock:
            if lease.released:
                return
            lease.released = True
            lease.loaded.pins -= 1
            if lease.adapter is not None:
                lease.adapter.pins -= 1
            over = self._total_bytes() > self.max_bytes
        if over:
            self._evict(0)

    def _hold(self, ref: ModelRef) -> Lease | None:
        with self._lock:
            loaded = self._models.get(ref.base)
            if loaded is None:
                return None
            adapter = None
            if ref.adapter is not None:
                adapter = loaded.adapters.get(ref.adapter)
                if adapter is None:
                    return None
                adapter.pins += 1
                loaded.adapters.move_to_end(ref.adapter)
            loaded.pins += 1
            self._models.move_to_end(ref.base)
            return Lease(loaded, adapter)

    # ---- what is loaded -----------------------------------------------------------------------------------------
    def loaded_models(self) -> list[tuple[str, int]]:
        """The names (and load times) of the loaded models and adapters, models first in each group."""
        with self._lock:
            names = []
            for loaded in self._models.values():
                names.append((loaded.source.name, loaded.created))
                names += [(adapter.source.name, adapter.created) for adapter in loaded.adapters.values()]
            return names

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._total_bytes()

    def _total_bytes(self) -> int:
        return sum(loaded.nbytes for loaded in self._models.values())

    # ---- loading and evicting -----------------------------------------------------------------------------------
    def _load_model(self, ref: ModelRef) -> LoadedModel:
        """Load ``ref.base`` (under its loading lock), held once for the caller."""
        source = ref.base
        # A hub model's size is not known before it loads: make all the room (every model not in use goes).
        self._evict(_weight_file_bytes(source.path) or self.max_bytes)
        dtype = resolve_dtype(source.precision, self.device)
        section = ModelSection(
            name_or_path=source.path, precision=source.precision, trust_remote_code=source.trust_remote_code
        )
        started = time.perf_counter()
        try:
            model = load_model(section, dtype=dtype).to(self.device).eval()
            processor = load_processor(section)
        except OSError as error:  # transformers: no such folder or hub model, or files missing
            log.warning("could not load model %s: %s", source.name, error)
            raise model_not_found(ref.name) from None
        except ValueError as error:  # not an image-text-to-text model transformers knows
            raise ChatError(
                f"The model '{ref.name}' cannot be served here: {error}", code="model_not_servable", param="model"
            ) from None
        except torch.OutOfMemoryError:  # the models in use leave no room: shed the request, keep serving the rest
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise ChatError(
                f"No memory left to load '{ref.name}' next to the models answering now; retry shortly.",
                status=503,
                code="server_overloaded",
                kind="server_error",
                headers={"Retry-After": "10"},
            ) from None
        loaded = LoadedModel(source, model, processor, self.device, dtype)
        loaded.pins = 1
        log.info(
            "loaded model %s (%.1f MB, %s) in %.1f s",
            source.name,
            loaded.nbytes / 1e6,
            dtype,
            time.perf_counter() - started,
        )
        with self._lock:
            self._models[source] = loaded
        self._evict(0, keep=loaded)
        return loaded

    def _load_adapter(self, loaded: LoadedModel, ref: ModelRef) -> LoadedAdapter:
        """Load ``ref.adapter`` into ``loaded`` (under its loading lock), held once for the caller; then delete the
        least recently used unheld adapters above ``max_adapters``."""
        from peft import PeftModel

        assert ref.adapter is not None
        with loaded.busy:
            name = loaded.next_adapter_name()
            try:
                if loaded.peft:
                    loaded.model.load_adapter(ref.adapter.path, adapter_name=name)
                else:
                    loaded.model = PeftModel.from_pretrained(loaded.model, ref.adapter.path, adapter_name=name)
                    loaded.peft = True
            except OSError as error:
                log.warning("could not load adapter %s: %s", ref.adapter.name, error)
                raise model_not_found(ref.name) from None
            except (ValueError, KeyError, RuntimeError) as error:  # an adapter that does not fit its base
                raise ChatError(
                    f"The adapter '{ref.name}' does not load onto its base model: {error}",
                    code="model_not_servable",
                    param="model",
                ) from None
            loaded.model.to(self.device).eval()
            adapter = LoadedAdapter(ref.adapter, name, pins=1)
            with self._lock:
                loaded.adapters[ref.adapter] = adapter
                excess = len(loaded.adapters) - self.max_adapters
                stale = [item for item in loaded.adapters.values() if item.pins == 0 and item is not adapter][:excess]
                for item in stale:
                    del loaded.adapters[item.source]  # no longer found by _hold
            if stale:
                loaded.model.set_adapter(name, inference_mode=True)  # never delete the active one
            for item in stale:
                loaded.model.delete_adapter(item.peft_name)
                log.info("unloaded adapter %s (least recently used)", item.source.name)
            loaded.nbytes = model_bytes(loaded.model)
        log.info("loaded adapter %s onto %s", ref.adapter.name, loaded.source.name)
        self._evict(0, keep=loaded)
        return adapter

    def _evict(self, needed: int, *, keep: LoadedModel | None = None) -> None:
        """Evict unheld models, least recently used first, until ``needed`` more bytes fit in the budget."""
        evicted = []
        with self._lock:
            total = self._total_bytes()
            for source, loaded in list(self._models.items()):
                if total + needed <= self.max_bytes:
                    break
                if loaded is keep or loaded.pins > 0 or loaded.busy.locked():
                    continue
                del self._models[source]
                total -= loaded.nbytes
                evicted.append(loaded)
        for loaded in evicted:
            log.info("evicted model %s (%.1f MB, least recently used)", loaded.source.name, loaded.nbytes / 1e6)
            loaded.model = loaded.processor = None
        if evicted:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def serving_device(memory_fraction: float | None = None) -> torch.device:
    """The device to serve on: the first GPU when there is one (capped at ``memory_fraction`` of its memory, so
    training on the same GPU keeps the rest), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", torch.cuda.current_device())
    if memory_fraction is not None:
        torch.cuda.set_per_process_memory_fraction(memory_fraction, device)
    return device
