"""The typed client: ``Client(base_url, api_key)`` with one resource per API tag.

Every method that calls a route is marked with :func:`operation`, naming its method and path;
tests/client/test_sdk_contract.py checks that every operation of the OpenAPI document has one.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import json
import mimetypes
import os
import queue
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, Protocol, TypeVar

import httpx

from dama_client._transport import Transport
from dama_client.errors import APIError, ChecksumError, DamaError
from dama_client.models import (
    ApiKey,
    ApiKeyCreated,
    ChatChunk,
    ChatCompletion,
    ChatModelList,
    Checkpoint,
    Dataset,
    DatasetRows,
    Estimate,
    Evaluation,
    Event,
    Export,
    Hardness,
    Health,
    Job,
    Judgement,
    Loop,
    Metrics,
    Model,
    ModelCatalog,
    Page,
    PairGeneration,
    Ready,
    Tracked,
    Usage,
    Webhook,
    WebhookCreated,
    WebhookDelivery,
)
from dama_client.sse import parse

DEFAULT_URL = "http://127.0.0.1:8000"
F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=Model)
RunT = TypeVar("RunT", bound=Tracked)
Progress = Callable[[int, int | None], None]  # (bytes so far, total bytes or None)


def operation(method: str, path: str) -> Callable[[F], F]:
    """Mark an SDK method as the one for ``method path`` of the API."""

    def mark(function: F) -> F:
        function.__dama_operation__ = (method.upper(), path)  # type: ignore[attr-defined]
        return function

    return mark


def new_idempotency_key() -> str:
    return f"dama-client-{uuid.uuid4()}"


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


class _Ending(Protocol):
    status: str

    @property
    def ended(self) -> bool: ...


EndingT = TypeVar("EndingT", bound=_Ending)


def _poll(fetch: Callable[[], EndingT], what: str, timeout: float | None, interval: float) -> EndingT:
    """``fetch()`` every ``interval`` seconds until what it returns has ended; DamaError after ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not (current := fetch()).ended:
        if deadline is not None and time.monotonic() > deadline:
            raise DamaError(f"{what} still {current.status} after {timeout} s")
        time.sleep(interval)
    return current


class _Resource:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def _get(self, model: type[M], path: str, **params: Any) -> M:
        return model.model_validate(self._t.request("GET", path, params=_drop_none(params)).json())

    def _post(self, model: type[M], path: str, *, json: Any = None, idempotency_key: str | None = None) -> M:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return model.model_validate(self._t.request("POST", path, json=json, headers=headers).json())

    def _pages(self, model: type[M], path: str, **params: Any) -> Iterator[M]:
        """Every item of a cursor-paged list, fetching the next page when the previous one is used up."""
        after: str | None = params.pop("after", None)
        while True:
            body = self._t.request("GET", path, params=_drop_none({**params, "after": after})).json()
            page = Page[model].model_validate(body)  # type: ignore[valid-type]
            yield from page.data
            if not page.has_more or not page.next_cursor:
                return
            after = page.next_cursor

    def _download(self, path: str, dest: Path, progress: Progress | None) -> tuple[Path, str]:
        """Stream ``path`` into the file ``dest``; check it against the X-Content-SHA256 header; return its sha256."""
        digest = hashlib.sha256()
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._t.stream("GET", path) as response:
            announced = response.headers.get("X-Content-SHA256")
            if response.is_redirect and "Location" in response.headers:
                # DAMA_DOWNLOAD_MODE=redirect: the file comes from a presigned link to the object store, which
                # needs (and must not get) the API key; the checksum rides on the redirect.
                with httpx.stream("GET", response.headers["Location"], timeout=self._t.http.timeout) as stored:
                    stored.raise_for_status()
                    _write(stored, dest, digest, progress)
            else:
                _write(response, dest, digest, progress)
        sha256 = digest.hexdigest()
        if announced is not None and announced.lower() != sha256:
            dest.unlink(missing_ok=True)
            raise ChecksumError(f"{path}: sha256 {sha256} of the download is not the announced {announced}")
        return dest, sha256


def _write(response: httpx.Response, dest: Path, digest: Any, progress: Progress | None) -> None:
    """Stream a response's body into ``dest``, hashing it and reporting progress."""
    total = int(response.headers["Content-Length"]) if "Content-Length" in response.headers else None
    done = 0
    with dest.open("wb") as out:
        for chunk in response.iter_bytes(1 << 20):
            out.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)


def _unpack(archive: Path, dest: Path) -> Path:
    """Unpack a tar archive into ``dest`` (the "data" filter refuses links out and absolute paths); return the
    folder holding the adapter (its adapter_config.json) or the model."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as bundle:
        bundle.extractall(dest, filter="data")
    for marker in ("adapter_config.json", "config.json"):
        found = sorted(dest.rglob(marker), key=lambda p: len(p.parts))
        if found:
            return found[0].parent
    return dest


class _ProgressFile:
    """A file whose reads report progress (httpx streams multipart file fields with ``read``)."""

    def __init__(self, handle: IO[bytes], total: int, progress: Progress) -> None:
        self._handle, self._total, self._progress, self._done = handle, total, progress, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._handle.read(size)
        self._done += len(chunk)
        self._progress(self._done, self._total)
        return chunk

    def fileno(self) -> int:  # lets httpx send a Content-Length instead of chunks
        return self._handle.fileno()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()


class Datasets(_Resource):
    @operation("POST", "/datasets")
    def upload(
        self,
        file: str | os.PathLike[str],
        *,
        name: str | None = None,
        format: str | None = None,
        progress: Progress | None = None,
        idempotency_key: str | None = None,
    ) -> Dataset:
        """Upload a data file or archive; retries resend it under the same Idempotency-Key."""
        path = Path(file)
        total = path.stat().st_size
        key = idempotency_key or new_idempotency_key()
        with path.open("rb") as handle:

            def fresh() -> dict[str, Any]:
                handle.seek(0)
                body: Any = _ProgressFile(handle, total, progress) if progress is not None else handle
                return {"files": {"file": (path.name, body, "application/octet-stream")}}

            response = self._t.request(
                "POST",
                "/datasets",
                data=_drop_none({"name": name, "format": format}),
                headers={"Idempotency-Key": key},
                fresh=fresh,
            )
        return Dataset.model_validate(response.json())

    @operation("GET", "/datasets")
    def list(self, *, limit: int = 100) -> Iterator[Dataset]:
        return self._pages(Dataset, "/datasets", limit=limit)

    @operation("GET", "/datasets/{dataset_id}")
    def get(self, dataset_id: str) -> Dataset:
        return self._get(Dataset, f"/datasets/{dataset_id}")

    @operation("DELETE", "/datasets/{dataset_id}")
    def delete(self, dataset_id: str) -> None:
        self._t.request("DELETE", f"/datasets/{dataset_id}")

    @operation("GET", "/datasets/{dataset_id}/rows")
    def rows(self, dataset_id: str, *, offset: int = 0, limit: int = 10) -> DatasetRows:
        return self._get(DatasetRows, f"/datasets/{dataset_id}/rows", offset=offset, limit=limit)

    @operation("GET", "/datasets/{dataset_id}/rows/{row}/images/{index}")
    def row_image(self, dataset_id: str, row: int, index: int = 0) -> bytes:
        """A preview row's image (rows count from 1, images from 0), as PNG bytes."""
        return self._t.request("GET", f"/datasets/{dataset_id}/rows/{row}/images/{index}").content

    @operation("GET", "/datasets/{dataset_id}/hardness")
    def hardness(self, dataset_id: str, *, bins: int | None = None) -> Hardness:
        return self._get(Hardness, f"/datasets/{dataset_id}/hardness", bins=bins)


@dataclass
class FollowUpdate(Generic[RunT]):
    """One step of ``follow``: the run (a job, an evaluation, a pair generation) as it is now and the events that
    arrived since the last step."""

    job: RunT
    events: list[Event] = field(default_factory=list)


class RunResource(_Resource, Generic[RunT]):
    """What every kind of run has: paged and live events, following and waiting."""

    _prefix = ""
    _model: type[RunT]

    def _event_pages(self, resource_id: str, after: int, limit: int) -> Iterator[Event]:
        while True:
            params = {"after": after, "limit": limit}
            body = self._t.request("GET", f"{self._prefix}/{resource_id}/events", params=params).json()
            page = Page[Event].model_validate(body)
            yield from page.data
            if not page.has_more or not page.data:
                return
            after = page.data[-1].seq

    def stream_events(self, resource_id: str, *, after: int = 0) -> Iterator[Event]:
        """The live event stream (Server-Sent Events) until the job ends; a dropped connection is resumed after
        the last event received (Last-Event-ID), so none is missed or repeated."""
        last = after
        while True:
            headers = {"Accept": "text/event-stream", "Last-Event-ID": str(last)}
            try:
                with self._t.stream("GET", f"{self._prefix}/{resource_id}/events", headers=headers) as response:
                    for message in parse(response.iter_lines()):
                        event = Event.model_validate_json(message.data)
                        last = event.seq
                        yield event
                return  # the server ends the stream once the job has ended and every event was sent
            except httpx.TransportError:
                time.sleep(1.0)

    def follow(self, job_id: str, *, interval: float = 1.0) -> Iterator[FollowUpdate[RunT]]:
        """Follow a run to its end: the live event stream is read in the background while the run's progress
        (step, stage, ETA) is refreshed every ``interval`` seconds; the last update has the ended run."""
        arrived: queue.Queue[Event | BaseException | None] = queue.Queue()

        def read() -> None:
            try:
                for event in self.stream_events(job_id):
                    arrived.put(event)
            except BaseException as error:  # handed to the caller's thread
                arrived.put(error)
            arrived.put(None)

        threading.Thread(target=read, name=f"dama-follow-{job_id}", daemon=True).start()
        stream_open = True
        while True:
            events: list[Event] = []
            deadline = time.monotonic() + interval
            while stream_open and (left := deadline - time.monotonic()) > 0:
                try:
                    item = arrived.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:
                    stream_open = False
                elif isinstance(item, BaseException):
                    raise item
                else:
                    events.append(item)
            if not stream_open and not events:
                time.sleep(max(0.0, deadline - time.monotonic()))
            job = self._get(self._model, f"{self._prefix}/{job_id}")
            yield FollowUpdate(job=job, events=events)
            if job.ended and not stream_open:
                return

    def wait(self, job_id: str, *, timeout: float | None = None, interval: float = 1.0) -> RunT:
        """Block until the run ends (polling); return it."""
        return _poll(lambda: self._get(self._model, f"{self._prefix}/{job_id}"), job_id, timeout, interval)


class Jobs(RunResource[Job]):
    _prefix, _model = "/jobs", Job

    @operation("POST", "/jobs")
    def create(
        self,
        *,
        model: str,
        dataset_id: str,
        method: str | None = None,
        hyperparameters: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        **spec: Any,
    ) -> Job:
        """Create a training job (the body is a JobSpec: ``lora``, ``evaluation``, ``queue``... as keywords)."""
        body = _drop_none({"model": model, "dataset_id": dataset_id, "method": method, **spec})
        if hyperparameters:
            body["hyperparameters"] = hyperparameters
        return self._post(Job, "/jobs", json=body, idempotency_key=idempotency_key or new_idempotency_key())

    @operation("POST", "/jobs/estimate")
    def estimate(self, *, model: str, dataset_id: str, wait: float | None = None, **spec: Any) -> Estimate:
        """What the job ``create(model=..., dataset_id=..., **spec)`` would make takes (rows, steps, tokens, memory per
        GPU, time, whether it fits), without creating it. The service waits up to ``wait`` seconds (at most its
        DAMA_ESTIMATE_WAIT_S) for a worker; an estimate not ended then comes back queued or running:
        :meth:`wait_estimate` polls it."""
        body = _drop_none({"model": model, "dataset_id": dataset_id, **spec})
        response = self._t.request("POST", "/jobs/estimate", json=body, params=_drop_none({"wait": wait}))
        return Estimate.model_validate(response.json())

    @operation("GET", "/jobs/estimates/{estimate_id}")
    def get_estimate(self, estimate_id: str) -> Estimate:
        return self._get(Estimate, f"/jobs/estimates/{estimate_id}")

    def wait_estimate(self, estimate_id: str, *, timeout: float | None = None, interval: float = 1.0) -> Estimate:
        """Poll the estimate until it ended (the service fails one no worker finished in time); return it."""
        return _poll(lambda: self.get_estimate(estimate_id), estimate_id, timeout, interval)

    @operation("GET", "/jobs")
    def list(self, *, status: str | None = None, limit: int = 100) -> Iterator[Job]:
        return self._pages(Job, "/jobs", status=status, limit=limit)

    @operation("GET", "/jobs/{job_id}")
    def get(self, job_id: str) -> Job:
        return self._get(Job, f"/jobs/{job_id}")

    @operation("POST", "/jobs/{job_id}/cancel")
    def cancel(self, job_id: str) -> Job:
        return self._post(Job, f"/jobs/{job_id}/cancel")

    @operation("GET", "/jobs/{job_id}/events")
    def events(self, job_id: str, *, after: int = 0, limit: int = 100) -> Iterator[Event]:
        """Every event after ``after``, page by page (``stream_events`` follows a running job live)."""
        return self._event_pages(job_id, after, limit)

    @operation("GET", "/jobs/{job_id}/metrics")
    def metrics(self, job_id: str, *, keys: builtins.list[str] | None = None) -> Metrics:
        return self._get(Metrics, f"/jobs/{job_id}/metrics", keys=",".join(keys) if keys else None)

    @operation("GET", "/jobs/{job_id}/checkpoints")
    def checkpoints(self, job_id: str) -> builtins.list[Checkpoint]:
        # One page holds every kept checkpoint (the route takes no cursor).
        return self._get(Page[Checkpoint], f"/jobs/{job_id}/checkpoints").data

    @operation("GET", "/jobs/{job_id}/adapter")
    def download(
        self, job_id: str, dest: str | os.PathLike[str] = ".", *, progress: Progress | None = None, unpack: bool = True
    ) -> Path:
        """Download the adapter, check its sha256, and unpack it under ``dest`` (returns the adapter's folder);
        with ``unpack=False`` keep the archive ``dest/<job_id>-adapter.tar.gz`` (returns its path)."""
        return self._fetch(f"/jobs/{job_id}/adapter", Path(dest), f"{job_id}-adapter", progress, unpack)

    @operation("GET", "/jobs/{job_id}/checkpoints/{step}/adapter")
    def download_checkpoint(
        self,
        job_id: str,
        step: int,
        dest: str | os.PathLike[str] = ".",
        *,
        progress: Progress | None = None,
        unpack: bool = True,
    ) -> Path:
        path = f"/jobs/{job_id}/checkpoints/{step}/adapter"
        return self._fetch(path, Path(dest), f"{job_id}-step{step}", progress, unpack)

    @operation("POST", "/jobs/{job_id}/exports")
    def create_export(self, job_id: str, *, format: str = "merged") -> Export:
        return self._post(Export, f"/jobs/{job_id}/exports", json={"format": format})

    @operation("GET", "/jobs/{job_id}/exports")
    def list_exports(self, job_id: str) -> builtins.list[Export]:
        return self._get(Page[Export], f"/jobs/{job_id}/exports").data

    @operation("GET", "/jobs/{job_id}/exports/{export_id}")
    def get_export(self, job_id: str, export_id: str) -> Export:
        return self._get(Export, f"/jobs/{job_id}/exports/{export_id}")

    @operation("GET", "/jobs/{job_id}/exports/{export_id}/download")
    def download_export(
        self,
        job_id: str,
        export_id: str,
        dest: str | os.PathLike[str] = ".",
        *,
        progress: Progress | None = None,
        unpack: bool = True,
    ) -> Path:
        path = f"/jobs/{job_id}/exports/{export_id}/download"
        return self._fetch(path, Path(dest), f"{job_id}-{export_id}", progress, unpack)

    def _fetch(self, path: str, dest: Path, stem: str, progress: Progress | None, unpack: bool) -> Path:
        if not unpack:
            return self._download(path, dest / f"{stem}.tar.gz", progress)[0]
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest) as scratch:
            archive, _ = self._download(path, Path(scratch) / "download.tar", progress)
            return _unpack(archive, dest / stem)


class Evaluations(RunResource[Evaluation]):
    _prefix, _model = "/evaluations", Evaluation

    @operation("POST", "/evaluations")
    def create(self, *, idempotency_key: str | None = None, **spec: Any) -> Evaluation:
        """Create an evaluation (the body is an EvaluationCreate: ``model``, ``dataset_id``, ``job_id``... as
        keywords)."""
        key = idempotency_key or new_idempotency_key()
        return self._post(Evaluation, "/evaluations", json=_drop_none(spec), idempotency_key=key)

    @operation("GET", "/evaluations")
    def list(self, *, status: str | None = None, limit: int = 100) -> Iterator[Evaluation]:
        return self._pages(Evaluation, "/evaluations", status=status, limit=limit)

    @operation("GET", "/evaluations/{evaluation_id}")
    def get(self, evaluation_id: str) -> Evaluation:
        return self._get(Evaluation, f"/evaluations/{evaluation_id}")

    @operation("POST", "/evaluations/{evaluation_id}/cancel")
    def cancel(self, evaluation_id: str) -> Evaluation:
        return self._post(Evaluation, f"/evaluations/{evaluation_id}/cancel")

    @operation("GET", "/evaluations/{evaluation_id}/events")
    def events(self, evaluation_id: str, *, after: int = 0, limit: int = 100) -> Iterator[Event]:
        return self._event_pages(evaluation_id, after, limit)

    @operation("GET", "/evaluations/{evaluation_id}/outputs")
    def outputs(self, evaluation_id: str, *, file: str | None = None) -> bytes:
        """The generated outputs (JSON lines)."""
        params = _drop_none({"file": file})
        return self._t.request("GET", f"/evaluations/{evaluation_id}/outputs", params=params).content

    @operation("GET", "/evaluations/{evaluation_id}/chart")
    def chart(self, evaluation_id: str) -> bytes:
        """The results chart, as PNG bytes."""
        return self._t.request("GET", f"/evaluations/{evaluation_id}/chart").content


class PairGenerations(RunResource[PairGeneration]):
    _prefix, _model = "/pair-generations", PairGeneration

    @operation("POST", "/pair-generations")
    def create(
        self, *, model: str, generative_dataset_id: str, idempotency_key: str | None = None, **spec: Any
    ) -> PairGeneration:
        """Sample pairs from ``model`` (``init_adapter`` for base + a job's adapter) on a generative dataset, or on a
        prompt set with ``judge`` (the body is a PairGenerationCreate: ``samples_per_prompt``, ``temperature``,
        ``max_prompts``, ``judge``... as keywords)."""
        body = _drop_none({"model": model, "generative_dataset_id": generative_dataset_id, **spec})
        key = idempotency_key or new_idempotency_key()
        return self._post(PairGeneration, "/pair-generations", json=body, idempotency_key=key)

    @operation("GET", "/pair-generations")
    def list(self, *, status: str | None = None, limit: int = 100) -> Iterator[PairGeneration]:
        return self._pages(PairGeneration, "/pair-generations", status=status, limit=limit)

    @operation("GET", "/pair-generations/{pair_generation_id}")
    def get(self, pair_generation_id: str) -> PairGeneration:
        return self._get(PairGeneration, f"/pair-generations/{pair_generation_id}")

    @operation("POST", "/pair-generations/{pair_generation_id}/cancel")
    def cancel(self, pair_generation_id: str) -> PairGeneration:
        return self._post(PairGeneration, f"/pair-generations/{pair_generation_id}/cancel")

    @operation("GET", "/pair-generations/{pair_generation_id}/events")
    def events(self, pair_generation_id: str, *, after: int = 0, limit: int = 100) -> Iterator[Event]:
        return self._event_pages(pair_generation_id, after, limit)

    @operation("GET", "/pair-generations/{pair_generation_id}/outputs")
    def outputs(self, pair_generation_id: str, *, file: str | None = None) -> bytes:
        """``samples`` (default: one JSON line per sample, its judgement and pair role), ``report`` (JSON) or
        ``chart`` (PNG), as bytes."""
        params = _drop_none({"file": file})
        return self._t.request("GET", f"/pair-generations/{pair_generation_id}/outputs", params=params).content


class Loops(RunResource[Loop]):
    _prefix, _model = "/loops", Loop

    @operation("POST", "/loops")
    def create(
        self,
        *,
        model: str,
        generative_dataset_id: str,
        held_out_dataset_id: str,
        rounds: int = 2,
        idempotency_key: str | None = None,
        **spec: Any,
    ) -> Loop:
        """Run ``rounds`` rounds of sample -> train -> evaluate on the server (the body is a LoopCreate:
        ``sampling``, ``training``, ``evaluation``, ``init_adapter``... as keywords)."""
        body = _drop_none(
            {
                "model": model,
                "generative_dataset_id": generative_dataset_id,
                "held_out_dataset_id": held_out_dataset_id,
                "rounds": rounds,
                **spec,
            }
        )
        key = idempotency_key or new_idempotency_key()
        return self._post(Loop, "/loops", json=body, idempotency_key=key)

    @operation("GET", "/loops")
    def list(self, *, status: str | None = None, limit: int = 100) -> Iterator[Loop]:
        return self._pages(Loop, "/loops", status=status, limit=limit)

    @operation("GET", "/loops/{loop_id}")
    def get(self, loop_id: str) -> Loop:
        return self._get(Loop, f"/loops/{loop_id}")

    @operation("POST", "/loops/{loop_id}/cancel")
    def cancel(self, loop_id: str) -> Loop:
        return self._post(Loop, f"/loops/{loop_id}/cancel")

    @operation("GET", "/loops/{loop_id}/events")
    def events(self, loop_id: str, *, after: int = 0, limit: int = 100) -> Iterator[Event]:
        return self._event_pages(loop_id, after, limit)


class Webhooks(_Resource):
    @operation("POST", "/webhooks")
    def create(
        self, *, url: str, event_types: list[str] | None = None, description: str | None = None
    ) -> WebhookCreated:
        body = _drop_none({"url": url, "event_types": event_types, "description": description})
        return self._post(WebhookCreated, "/webhooks", json=body)

    @operation("GET", "/webhooks")
    def list(self, *, limit: int = 100) -> Iterator[Webhook]:
        return self._pages(Webhook, "/webhooks", limit=limit)

    @operation("GET", "/webhooks/{webhook_id}")
    def get(self, webhook_id: str) -> Webhook:
        return self._get(Webhook, f"/webhooks/{webhook_id}")

    @operation("PATCH", "/webhooks/{webhook_id}")
    def update(
        self,
        webhook_id: str,
        *,
        url: str | None = None,
        event_types: builtins.list[str] | None = None,
        description: str | None = None,
        enabled: bool | None = None,
    ) -> Webhook:
        body = _drop_none({"url": url, "event_types": event_types, "description": description, "enabled": enabled})
        return Webhook.model_validate(self._t.request("PATCH", f"/webhooks/{webhook_id}", json=body).json())

    @operation("DELETE", "/webhooks/{webhook_id}")
    def delete(self, webhook_id: str) -> None:
        self._t.request("DELETE", f"/webhooks/{webhook_id}")

    @operation("GET", "/webhooks/{webhook_id}/deliveries")
    def deliveries(self, webhook_id: str, *, limit: int = 100) -> Iterator[WebhookDelivery]:
        return self._pages(WebhookDelivery, f"/webhooks/{webhook_id}/deliveries", limit=limit)

    @operation("POST", "/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver")
    def redeliver(self, webhook_id: str, delivery_id: str) -> WebhookDelivery:
        return self._post(WebhookDelivery, f"/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver")


class Keys(_Resource):
    @operation("POST", "/keys")
    def create(self) -> ApiKeyCreated:
        """A new key of the caller's tenant; its ``secret`` is shown only here."""
        return self._post(ApiKeyCreated, "/keys")

    @operation("GET", "/keys")
    def list(self, *, limit: int = 100) -> Iterator[ApiKey]:
        return self._pages(ApiKey, "/keys", limit=limit)

    @operation("DELETE", "/keys/{key_id}")
    def revoke(self, key_id: str) -> ApiKey:
        return ApiKey.model_validate(self._t.request("DELETE", f"/keys/{key_id}").json())


class Models(_Resource):
    @operation("GET", "/models")
    def list(self) -> ModelCatalog:
        return self._get(ModelCatalog, "/models")


def image_part(image: str | Path | bytes, *, mime: str | None = None) -> dict[str, Any]:
    """A chat message's image part: a file (path) or its bytes as a base64 data URI, or an http(s) URL as is (the
    service fetches it only from hosts its operator allows)."""
    if isinstance(image, str) and image.startswith(("http://", "https://", "data:")):
        return {"type": "image_url", "image_url": {"url": image}}
    if isinstance(image, bytes):
        data, kind = image, mime or "image/png"
    else:
        data, kind = Path(image).read_bytes(), mime or mimetypes.guess_type(str(image))[0] or "image/png"
    return {"type": "image_url", "image_url": {"url": f"data:{kind};base64,{base64.b64encode(data).decode()}"}}


def user_message(text: str, *images: str | Path | bytes) -> dict[str, Any]:
    """One user turn: its images first, then the text (the order the service's evaluations use)."""
    return {"role": "user", "content": [*(image_part(image) for image in images), {"type": "text", "text": text}]}


class Chat(_Resource):
    """``/v1``: chat with a base model, a job's tuned model (``job_...``) or a kept checkpoint (``job_...:STEP``).

    The routes speak OpenAI's protocol, so the ``openai`` package works too:
    ``OpenAI(base_url=f"{service}/v1", api_key=key)``. Parameters are OpenAI's (``max_tokens``, ``temperature``,
    ``top_p``, ``seed``, ``stop``)."""

    @operation("POST", "/v1/chat/completions")
    def complete(self, *, model: str, messages: builtins.list[dict[str, Any]], **params: Any) -> ChatCompletion:
        body = {"model": model, "messages": messages, **params, "stream": False}
        return ChatCompletion.model_validate(self._t.request("POST", "/v1/chat/completions", json=body).json())

    def stream(self, *, model: str, messages: builtins.list[dict[str, Any]], **params: Any) -> Iterator[ChatChunk]:
        """The answer as it is generated (``POST /v1/chat/completions`` with ``stream: true``): chunks until
        ``[DONE]``; an error after the stream started raises :class:`APIError` with the service's code."""
        body = {"model": model, "messages": messages, **params, "stream": True}
        with self._t.stream("POST", "/v1/chat/completions", json=body) as response:
            for event in parse(response.iter_lines()):
                if event.data == "[DONE]":
                    return
                chunk = json.loads(event.data)
                if "error" in chunk:  # after the stream started: the status was 200, the error is the event's
                    error = chunk["error"]
                    raise APIError(
                        502,
                        type=str(error.get("type") or "api_error"),
                        code=str(error.get("code") or "inference_error"),
                        message=str(error.get("message") or "the stream ended with an error"),
                        param=error.get("param"),
                    )
                yield ChatChunk.model_validate(chunk)

    @operation("GET", "/v1/models")
    def models(self) -> ChatModelList:
        """The models this tenant may call (``.data``): the bases, then its succeeded training jobs."""
        return self._get(ChatModelList, "/v1/models")

    @operation("POST", "/playground/judge")
    def judge(self, *, dataset_id: str, row: int, answers: builtins.list[str]) -> Judgement:
        """Answers marked against what is in a generative set's row (its preview's row number): each mention's
        span, hallucinated or grounded by the CHAIR matcher, and the objects covered and missed."""
        body = {"dataset_id": dataset_id, "row": row, "answers": answers}
        return Judgement.model_validate(self._t.request("POST", "/playground/judge", json=body).json())


class UsageResource(_Resource):
    @operation("GET", "/usage")
    def get(self, *, start_date: str | None = None, end_date: str | None = None) -> Usage:
        """Chat requests and tokens by UTC day and model (default: the last 30 days)."""
        return self._get(Usage, "/usage", **_drop_none({"start_date": start_date, "end_date": end_date}))


class HealthChecks(_Resource):
    @operation("GET", "/healthz")
    def live(self) -> Health:
        return self._get(Health, "/healthz")

    @operation("GET", "/readyz")
    def ready(self) -> Ready:
        return self._get(Ready, "/readyz")


class Client:
    """``Client()`` reads ``DAMA_API_URL`` (default http://127.0.0.1:8000) and ``DAMA_API_KEY``; arguments win."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
    ) -> None:
        self.base_url = (base_url or os.environ.get("DAMA_API_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("DAMA_API_KEY")
        self._transport = Transport(
            base_url=self.base_url, api_key=key, timeout=timeout, max_retries=max_retries, backoff_s=backoff_s
        )
        self.datasets = Datasets(self._transport)
        self.jobs = Jobs(self._transport)
        self.evaluations = Evaluations(self._transport)
        self.pair_generations = PairGenerations(self._transport)
        self.loops = Loops(self._transport)
        self.webhooks = Webhooks(self._transport)
        self.keys = Keys(self._transport)
        self.models = Models(self._transport)
        self.chat = Chat(self._transport)
        self.usage = UsageResource(self._transport)
        self.health = HealthChecks(self._transport)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
