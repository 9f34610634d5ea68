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
    assert set(services) == {"postgres", "redis", "minio", "createbucket", "migrate", "api", "worker", "infer"}
    for name, command in COMPOSE_COMMANDS.items():
        assert services[name]["command"] == command, name


def test_start_order_health_checks_and_volumes() -> None:
    compose = _compose()
    services = compose["services"]
    for name in ("postgres", "redis", "minio", "api", "worker"):
        assert "test" in services[name]["healthcheck"], name
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["createbucket"]["condition"] == "service_completed_successfully"
    # No shared artifacts folder: the API has no volume, the worker only its own scratch and model cache.
    assert "volumes" not in services["api"]
    assert services["worker"]["volumes"] == ["scratch:/scratch", "models:/models"]
    assert services["worker"]["environment"]["DAMA_SCRATCH_DIR"] == "/scratch"
    assert {"pgdata", "miniodata", "scratch", "models"} <= set(compose["volumes"])
    assert services["api"]["ports"] == ["8000:8000"]


def test_worker_reserves_a_gpu_and_builds_the_cuda_torch() -> None:
    worker = _compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert "cu" in worker["build"]["args"]["TORCH_INDEX_URL"]
    # A hung run ends the worker (status 75) and the restart policy brings a fresh one.
    assert worker["environment"]["DAMA_STALL_TIMEOUT_S"] == "${DAMA_STALL_TIMEOUT_S:-3600}"
    assert worker["restart"] == "unless-stopped"


def test_inference_backend_is_internal_with_its_own_gpu_and_a_required_secret() -> None:
    compose = _compose()
    infer, env = compose["services"]["infer"], compose["x-dama-env"]
    assert "ports" not in infer, "the inference backend is never published: only the API reaches it"
    assert infer["expose"] == ["8001"] and infer["environment"]["DAMA_INFER_PORT"] == "8001"
    assert env["DAMA_INFERENCE_URL"] == "http://infer:8001/v1"
    assert ":?" in env["DAMA_INFERENCE_SECRET"], "the shared secret must be required, never defaulted"
    devices = infer["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert "8001/health" in " ".join(infer["healthcheck"]["test"])
    assert "DAMA_INFER_GPU_MEMORY_FRACTION" in infer["environment"]
    assert infer["image"] == compose["services"]["worker"]["image"], "the CUDA image: torch, transformers, peft"


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


def test_minio_is_pinned_its_bucket_made_at_start_and_used() -> None:
    compose = _compose()
    services, env = compose["services"], compose["x-dama-env"]
    minio, createbucket = services["minio"], services["createbucket"]
    for service in (minio, createbucket):
        image, tag = service["image"].split(":")
        assert image in ("minio/minio", "minio/mc") and tag.startswith("RELEASE."), "images are pinned"
        assert ":?" in service["environment"]["MINIO_ROOT_PASSWORD"], "no default secret"
    assert createbucket["depends_on"]["minio"]["condition"] == "service_healthy"
    assert createbucket["restart"] == "no"
    bucket = env["DAMA_ARTIFACTS_URL"].removeprefix("s3://").split("/")[0]
    assert f"mb --ignore-existing dama/{bucket}" in createbucket["command"][0]
    assert env["DAMA_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "localhost:9000" in env["DAMA_S3_PUBLIC_ENDPOINT_URL"] and "9000:9000" in minio["ports"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio["environment"]["MINIO_ROOT_PASSWORD"]
    from jobstore.settings import Settings

    settings = Settings(artifacts_url=env["DAMA_ARTIFACTS_URL"], s3_endpoint_url=env["DAMA_S3_ENDPOINT_URL"])
    assert settings.artifacts_url == "s3://dama-artifacts/dama"


def test_the_filesystem_override_shares_one_artifacts_volume_instead(tmp_path: Path) -> None:
    override = yaml.safe_load((ROOT / "docker-compose.filesystem.yml").read_text())
    for name in ("api", "worker"):
        service = override["services"][name]
        assert service["environment"]["DAMA_ARTIFACTS_URL"] == ""
        assert service["environment"]["DAMA_ARTIFACTS_DIR"] == "/data/artifacts"
        assert service["volumes"] == ["artifacts:/data/artifacts"]
    from jobstore.artifacts import FilesystemStore, open_store
    from jobstore.settings import Settings

    assert "artifacts" in override["volumes"]
    # An empty DAMA_ARTIFACTS_URL (the override's) selects the filesystem backend at DAMA_ARTIFACTS_DIR.
    store = open_store(Settings(artifacts_url="", artifacts_dir=tmp_path / "artifacts"))
    assert isinstance(store, FilesystemStore) and store.root == (tmp_path / "artifacts").resolve()


def test_dockerfile_builds_cpu_torch_by_default_with_a_cuda_switch() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "gcc" in text  # Triton builds its launcher with it when a GPU worker compiles (optim.compile)
    assert 'ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"' in text
    assert 'pip install ".[engine,service,tracking]"' in text
    assert 'CMD ["dama", "api"]' in text


def test_dockerfile_copies_every_package_the_project_installs() -> None:
    """``pip install .`` in the image installs the packages pyproject finds: each must be copied in first (the
    image once lacked dama_settings and dama_client, which the API and the ``dama`` command import)."""
    import tomllib

    text = (ROOT / "Dockerfile").read_text()
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pattern in found["include"]:
        package = pattern.rstrip("*")
        assert f"COPY {package} ./{package}" in text, package
