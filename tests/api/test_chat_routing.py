"""Where a chat request goes: `dama infer`, or vLLM with `dama infer` as the fallback for what vLLM cannot load.

In-process on SQLite (the API's own service functions): no server is needed to decide a route.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy.orm import Session

from api.app import make_services
from api.deps import Services
from api.errors import ApiError
from api.services.chat import Target, resolve
from jobstore import repository
from jobstore.db import session_scope
from jobstore.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
VLLM, FALLBACK = "http://vllm:8000/v1", "http://infer:8001/v1"
HUB_BASE = "llava-hf/llava-1.5-7b-hf"


def _services(tmp_path: Path, **settings: object) -> Services:
    tmp_path.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{tmp_path / 'dama.db'}"
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["url"] = url
    command.upgrade(config, "head")
    return make_services(
        Settings(home=tmp_path, database_url=url, artifacts_dir=tmp_path / "artifacts", **settings)  # type: ignore[arg-type]
    )


def _job(session: Session, tenant_id: str, *, model: str, lora: dict[str, object]) -> str:
    spec = {"model": model, "dataset_id": "ds_x", "lora": lora}
    job = repository.create_job(session, tenant_id=tenant_id, spec=spec, dataset_id=None, queue="gpu")
    job.status = "succeeded"
    return job.id


@pytest.fixture
def vllm(tmp_path: Path) -> Iterator[tuple[Services, Session, str]]:
    services = _services(
        tmp_path,
        inference_url=VLLM,
        inference_kind="vllm",
        inference_fallback_url=FALLBACK,
        chat_base_models=HUB_BASE,
    )
    with session_scope(services.session_factory) as session:
        tenant = repository.get_or_create_tenant(session, name="routing").id
        yield services, session, tenant
    services.engine.dispose()


def test_vllm_gets_lora_adapters_by_their_folder_and_the_rest_goes_to_the_fallback(
    vllm: tuple[Services, Session, str],
) -> None:
    services, session, tenant = vllm
    lora = _job(session, tenant, model=HUB_BASE, lora={})
    projector = _job(session, tenant, model=HUB_BASE, lora={"train_projector": True})
    full = _job(session, tenant, model=HUB_BASE, lora={"enabled": False})
    tiny = _job(session, tenant, model="dama/tiny-llava", lora={})
    route = {name: resolve(session, services, tenant_id=tenant, name=name) for name in (HUB_BASE, "dama/tiny-llava")}
    assert route[HUB_BASE] == Target(HUB_BASE, VLLM, HUB_BASE)
    assert route["dama/tiny-llava"] == Target("dama/tiny-llava", FALLBACK, "dama/tiny-llava")  # vLLM has no dama/...
    # vLLM's filesystem resolver loads <its LoRA folder>/<name>: the adapter's folder under the artifacts root.
    assert resolve(session, services, tenant_id=tenant, name=lora) == Target(lora, VLLM, f"jobs/{lora}/run/adapter")
    for job in (projector, full, tiny):
        assert resolve(session, services, tenant_id=tenant, name=job) == Target(job, FALLBACK, job)


def test_without_a_fallback_what_vllm_cannot_load_is_refused(tmp_path: Path) -> None:
    services = _services(tmp_path, inference_url=VLLM, inference_kind="vllm", chat_base_models=HUB_BASE)
    with session_scope(services.session_factory) as session:
        tenant = repository.get_or_create_tenant(session, name="routing").id
        projector = _job(session, tenant, model=HUB_BASE, lora={"train_projector": True})
        with pytest.raises(ApiError) as refused:
            resolve(session, services, tenant_id=tenant, name=projector)
        assert refused.value.status_code == 400 and refused.value.code == "model_not_servable"
        assert refused.value.param == "model"
    services.engine.dispose()


def test_dama_infer_serves_everything_and_no_backend_is_503(tmp_path: Path) -> None:
    services = _services(tmp_path, inference_url=FALLBACK)
    with session_scope(services.session_factory) as session:
        tenant = repository.get_or_create_tenant(session, name="routing").id
        projector = _job(session, tenant, model="dama/tiny-llava", lora={"train_projector": True})
        assert resolve(session, services, tenant_id=tenant, name=projector) == Target(projector, FALLBACK, projector)
        with pytest.raises(ApiError) as hub:  # a hub model the operator did not allow
            resolve(session, services, tenant_id=tenant, name=HUB_BASE)
        assert hub.value.status_code == 404
    services.engine.dispose()
    unconfigured = _services(tmp_path / "none")
    with session_scope(unconfigured.session_factory) as session:
        with pytest.raises(ApiError) as down:
            resolve(session, unconfigured, tenant_id="ten_x", name="dama/tiny-llava")
        assert down.value.status_code == 503 and down.value.code == "inference_unavailable"
    unconfigured.engine.dispose()


def test_a_merged_export_goes_to_the_fallback_by_its_runs_ids(vllm: tuple[Services, Session, str]) -> None:
    """vLLM serves one base: a merged export (a model of its own) goes to `dama infer`, asked for by ids that lead to
    its archive in the store's layout (no path); another tenant's, a failed or an unknown export is 404."""
    from jobstore import exports

    services, session, tenant = vllm
    job = _job(session, tenant, model=HUB_BASE, lora={})
    export = exports.create_export(session, tenant_id=tenant, job_id=job, format="merged")
    with pytest.raises(ApiError) as queued:
        resolve(session, services, tenant_id=tenant, name=export.id)
    assert queued.value.status_code == 409 and queued.value.code == "model_not_ready"
    claimed = exports.claim_export(session, export_id=export.id, worker="w")
    assert claimed is not None
    archive = services.artifacts.export_archive(job, export.id, claimed.attempts)
    exports.finish_export(session, export=claimed, path=services.artifacts.recorded_path(archive), sha256="0" * 64)
    assert resolve(session, services, tenant_id=tenant, name=export.id) == Target(
        export.id, FALLBACK, f"{export.id}@{job}/attempt-1"
    )
    other = repository.get_or_create_tenant(session, name="routing-other").id
    failed = exports.create_export(session, tenant_id=tenant, job_id=job, format="merged")
    failed.status = "failed"
    elsewhere = exports.create_export(session, tenant_id=tenant, job_id=job, format="merged")
    elsewhere.status, elsewhere.path = "succeeded", str(services.artifacts.root / "attempt-1" / "model.tar")
    names = ((other, export.id), (tenant, failed.id), (tenant, elsewhere.id), (tenant, "exp_unknown0"))
    for tenant_id, name in names:
        with pytest.raises(ApiError) as missing:
            resolve(session, services, tenant_id=tenant_id, name=name)
        assert missing.value.status_code == 404 and missing.value.code == "model_not_found"
