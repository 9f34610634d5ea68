"""Package boundaries: the engine never pulls in the service stack, the API never pulls in the engine, and the
settings both share (``dama_settings``) pull in neither.

Each check imports a package and every module under it (pkgutil.walk_packages, none skipped) in a fresh
interpreter, then looks at the top-level names of everything in ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

_PROBE = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys

    def fail(name):
        raise SystemExit(f"could not import {name}")

    package = importlib.import_module(PACKAGE)
    imported = [PACKAGE]
    for info in pkgutil.walk_packages(package.__path__, PACKAGE + ".", onerror=fail):
        importlib.import_module(info.name)
        imported.append(info.name)
    print(json.dumps({"imported": imported, "modules": sorted(sys.modules)}))
    """
)


def _run_probe(code: str) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter (the repo on its path); return the JSON its last line prints."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _import_everything(package: str) -> tuple[list[str], set[str]]:
    """Import ``package`` and all its submodules in a fresh interpreter; return them and sys.modules' top names."""
    result = _run_probe(f"PACKAGE = {package!r}\n{_PROBE}")
    return result["imported"], {name.split(".")[0] for name in result["modules"]}


def test_engine_does_not_import_the_service_stack() -> None:
    imported, top_level = _import_everything("dama_engine")
    assert "dama_engine.objective" in imported  # the walk did reach the modules
    forbidden = {"fastapi", "sqlalchemy", "celery", "redis", "alembic", "api", "worker", "jobstore"}
    assert not top_level & forbidden, f"importing {imported} pulled in {sorted(top_level & forbidden)}"


def test_api_does_not_import_the_engine_or_ml_stack() -> None:
    imported, top_level = _import_everything("api")
    assert "api" in imported
    forbidden = {"torch", "transformers", "peft", "dama_engine"}
    assert not top_level & forbidden, f"importing {imported} pulled in {sorted(top_level & forbidden)}"


def test_shared_settings_import_neither_side() -> None:
    """``dama_settings`` is imported by the engine and by the service: it may pull in neither, nor torch."""
    imported, top_level = _import_everything("dama_settings")
    assert "dama_settings.knobs" in imported
    forbidden = {"torch", "transformers", "peft", "dama_engine", "api", "worker", "jobstore", "fastapi", "sqlalchemy"}
    assert not top_level & forbidden, f"importing {imported} pulled in {sorted(top_level & forbidden)}"


_CHECK_PROBE = textwrap.dedent(
    """
    import contextlib, io, json, sys
    import dama_engine.data.check
    after_import = sorted(sys.modules)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        status = dama_engine.data.check.main([PATH])
    print(json.dumps({"status": status, "check": json.loads(out.getvalue()), "after_import": after_import,
                      "after_check": sorted(sys.modules)}))
    """
)


def test_upload_check_of_a_generative_set_does_not_import_the_ml_stack(tmp_path: Path) -> None:
    """The API runs ``python -m dama_engine.data.check`` for every upload: importing torch there costs seconds."""
    from dama_engine.data.demo import make_demo_dataset

    demo = make_demo_dataset(tmp_path / "demo", n_train=0, n_eval=0, n_generative=3)
    upload = tmp_path / "upload"
    (upload / "images").mkdir(parents=True)
    for path in (demo.generative_eval, demo.vocabulary):
        (upload / path.name).write_bytes(path.read_bytes())
    for image in demo.images_dir.glob("gen_*"):
        (upload / "images" / image.name).write_bytes(image.read_bytes())

    result = _run_probe(f"PATH = {str(upload)!r}\n{_CHECK_PROBE}")
    assert result["status"] == 0 and result["check"]["format"] == "generative", result["check"]
    assert result["check"]["ok"] and result["check"]["row_count"] == 3, result["check"]
    forbidden = {"torch", "transformers", "peft", "accelerate"}
    for when in ("after_import", "after_check"):
        top_level = {name.split(".")[0] for name in result[when]}
        assert not top_level & forbidden, f"{when}: the upload check pulled in {sorted(top_level & forbidden)}"
        assert "dama_engine.evaluation" not in result[when] and "dama_engine.trainer" not in result[when]


def test_client_imports_neither_the_server_nor_the_ml_stack() -> None:
    """``dama_client`` needs only its extra (httpx, pydantic, tqdm): it must work where nothing else is installed."""
    imported, top_level = _import_everything("dama_client")
    assert "dama_client.cli" in imported
    forbidden = {"torch", "transformers", "peft", "dama_engine", "api", "worker", "jobstore", "fastapi", "sqlalchemy"}
    forbidden |= {"celery", "redis", "alembic", "pydantic_settings", "uvicorn", "starlette"}
    assert not top_level & forbidden, f"importing {imported} pulled in {sorted(top_level & forbidden)}"


_CLIENT_COMMAND_PROBE = textwrap.dedent(
    """
    import contextlib, io, json, sys
    import dama_client._transport
    dama_client._transport.MAX_BACKOFF_S = 0  # retries without waiting: only the imports matter here
    import api.cli
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        status = api.cli.main(["jobs", "list", "--api-url", "http://127.0.0.1:9", "--timeout", "1", "--json"])
    print(json.dumps({"status": status, "modules": sorted(sys.modules)}))
    """
)


def test_dama_client_commands_import_no_server_package() -> None:
    """``dama jobs ...`` runs through ``api.cli`` (the console script) without importing the server: a clean
    virtualenv with only ``pip install -e ".[client]"`` runs it (tried by hand: the install takes about 35 s, too
    long for every CI run, so this checks the same thing through sys.modules)."""
    result = _run_probe(_CLIENT_COMMAND_PROBE)
    assert result["status"] == 1  # nothing listens on port 9: a connection error, reported, not a traceback
    top_level = {name.split(".")[0] for name in result["modules"]}
    forbidden = {"torch", "dama_engine", "worker", "jobstore", "fastapi", "sqlalchemy", "celery", "pydantic_settings"}
    assert not top_level & forbidden, f"`dama jobs list` pulled in {sorted(top_level & forbidden)}"
    assert "api.deps" not in result["modules"] and "dama_client.client" in result["modules"]
