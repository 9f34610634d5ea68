"""Package boundaries: the engine never pulls in the service stack, and the API never pulls in the engine.

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


def _import_everything(package: str) -> tuple[list[str], set[str]]:
    """Import ``package`` and all its submodules in a fresh interpreter; return them and sys.modules' top names."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-c", f"PACKAGE = {package!r}\n{_PROBE}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
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
