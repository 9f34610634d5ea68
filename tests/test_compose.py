"""docker-compose.yml and the Dockerfile, checked at the YAML level (no Docker engine runs here)."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.e2e.commands import COMPOSE_COMMANDS

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_and_their_commands_are_the_tested_ones() -> None:
    services = _compose()["services"]
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker"}
    for name, command in COMPOSE_COMMANDS.items():
        assert services[name]["command"] == command, name


def test_start_order_health_checks_and_volumes() -> None:
    compose = _compose()
    services = compose["services"]
    for name in ("postgres", "redis", "api", "worker"):
        assert "test" in services[name]["healthcheck"], name
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
        assert "artifacts:/data/artifacts" in services[name]["volumes"]
    assert "models:/models" in services["worker"]["volumes"]
    assert {"pgdata", "artifacts", "models"} <= set(compose["volumes"])
    assert services["api"]["ports"] == ["8000:8000"]


def test_worker_reserves_a_gpu_and_builds_the_cuda_torch() -> None:
    worker = _compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert "cu" in worker["build"]["args"]["TORCH_INDEX_URL"]
    # A hung run ends the worker (status 75) and the restart policy brings a fresh one.
    assert worker["environment"]["DAMA_STALL_TIMEOUT_S"] == "${DAMA_STALL_TIMEOUT_S:-3600}"
    assert worker["restart"] == "unless-stopped"


def test_production_settings_and_no_default_secret() -> None:
    env = _compose()["x-dama-env"]
    assert env["DAMA_ENVIRONMENT"] == "production"
    assert env["DAMA_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["DAMA_BROKER_URL"].startswith("redis://")
    assert ":?" in env["DAMA_API_KEY_PEPPER"], "the pepper must be required, never defaulted"
    # API replicas share their rate-limit counters in Redis, apart from the broker's database.
    storage, broker = env["DAMA_RATE_LIMIT_STORAGE"], env["DAMA_BROKER_URL"]
    assert storage.startswith("redis://redis:6379/") and storage != broker
    from jobstore.settings import Settings

    defaults = Settings.model_fields["rate_limit"].default
    assert env["DAMA_RATE_LIMIT"] == f"${{DAMA_RATE_LIMIT:-{defaults}}}"


def test_dockerfile_builds_cpu_torch_by_default_with_a_cuda_switch() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "gcc" in text  # Triton builds its launcher with it when a GPU worker compiles (optim.compile)
    assert 'ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"' in text
    assert 'pip install ".[engine,service]"' in text
    assert 'CMD ["dama", "api"]' in text
