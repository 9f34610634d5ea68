"""Package boundaries: the engine never pulls in the service stack, the API never pulls in the engine, and the
settings both share (``dama_settings``) pull in neither.

Each check imports a package and every module under it (pkgutil.walk_packages, none skipped) in a fresh
interpreter, then looks at the top-level names of everything in ``sys.modules``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from tests import import_graph

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
    from dama_engine.proving.shapes import make_demo_dataset

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
        assert "dama_engine.evaluation" not in result[when] and "dama_engine.training.recipe" not in result[when]


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


# ---------------------------------------------------------------------------------------------------------------
# The import graph, read from source: every import statement counts, at top level, inside functions and under
# TYPE_CHECKING. The allowed direction is written here once.

# Which project packages each package may import (nothing else; none imports itself through another).
ALLOWED_PACKAGES: dict[str, set[str]] = {
    "dama_settings": set(),
    "dama_client": set(),
    "dama_engine": {"dama_settings"},
    "jobstore": {"dama_settings"},
    "api": {"dama_settings", "dama_client", "jobstore"},
    "worker": {"dama_settings", "dama_engine", "jobstore"},
    "migrations": {"dama_settings", "jobstore"},
}

# The engine's layers, lowest first: a module may import its own layer's units and those of lower layers, never a
# higher one. The root's small shared modules form the lowest layer; each subpackage is one unit.
ENGINE_LAYERS: list[set[str]] = [
    {"errors", "threads", "model_files", "callbacks", "events", "availability"},
    {"data"},
    {"objective"},
    {"config"},
    {"models"},
    {"forward"},
    {"serving"},
    {"evaluation"},
    {"pairs"},
    {"training"},
    {"proving"},
    {"cli"},
]
ENGINE_SUBPACKAGES = {
    "data",
    "objective",
    "models",
    "forward",
    "serving",
    "evaluation",
    "pairs",
    "training",
    "proving",
    "cli",
}
MAX_ENGINE_FILE_LINES = 800


def _engine_unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _engine_layer(unit: str) -> int:
    for layer, units in enumerate(ENGINE_LAYERS):
        if unit in units:
            return layer
    raise AssertionError(f"dama_engine.{unit} is in no layer of ENGINE_LAYERS: add it there")


def _graph() -> tuple[dict[str, Path], list[import_graph.Import]]:
    modules = import_graph.project_modules()
    return modules, list(import_graph.imports(modules))


def test_no_import_circle_anywhere() -> None:
    modules = import_graph.project_modules((*import_graph.PACKAGES, "tests", "benchmarks"))
    graph: dict[str, set[str]] = {}
    for edge in import_graph.imports(modules):
        graph.setdefault(edge.importer, set()).add(edge.target)
    assert len(modules) > 200 and sum(map(len, graph.values())) > 400  # the walk did read the project
    assert import_graph.cycles(graph) == []


def test_packages_import_only_what_they_may() -> None:
    assert set(ALLOWED_PACKAGES) == set(import_graph.PACKAGES)
    _, edges = _graph()
    wrong = [
        f"{e.importer}:{e.line} imports {e.target}"
        for e in edges
        if e.target.split(".")[0] != e.importer.split(".")[0]
        and e.target.split(".")[0] not in ALLOWED_PACKAGES[e.importer.split(".")[0]]
    ]
    assert wrong == []


def test_the_engine_imports_downward_only() -> None:
    _, edges = _graph()
    wrong = []
    for edge in edges:
        if not (edge.importer.startswith("dama_engine.") and edge.target.startswith("dama_engine.")):
            continue
        have, want = _engine_unit(edge.importer), _engine_unit(edge.target)
        if _engine_layer(want) > _engine_layer(have):
            wrong.append(f"{edge.importer}:{edge.line} imports {edge.target} (upward)")
    assert wrong == []


def test_engine_subpackages_are_reached_through_their_public_names() -> None:
    """Across subpackages (and from the worker) the engine is imported through ``dama_engine.<package>``'s
    ``__all__``, never a module inside another subpackage; no leading-underscore name crosses modules."""
    modules, edges = _graph()
    public = {
        unit: set(ast.literal_eval(_assigned(modules[f"dama_engine.{unit}"], "__all__"))) for unit in ENGINE_SUBPACKAGES
    }
    wrong = []
    for edge in edges:
        if edge.importer.split(".")[0] in {"dama_engine", "worker"}:
            wrong += [
                f"{edge.importer}:{edge.line} imports {name} from {edge.via}" for name in edge.names if name[0] == "_"
            ]
        if not edge.target.startswith("dama_engine.") or edge.importer.split(".")[0] not in {"dama_engine", "worker"}:
            continue
        unit = _engine_unit(edge.target)
        if unit not in ENGINE_SUBPACKAGES or (
            edge.importer.startswith("dama_engine.") and _engine_unit(edge.importer) == unit
        ):
            continue
        if edge.target != f"dama_engine.{unit}":
            wrong.append(f"{edge.importer}:{edge.line} imports {edge.target}, inside dama_engine.{unit}")
        wrong += [
            f"{edge.importer}:{edge.line} imports {name}, not in dama_engine.{unit}.__all__"
            for name in edge.names
            if name not in public[unit]
        ]
    assert wrong == []


def _assigned(path: Path, name: str) -> str:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.unparse(node.value)
    raise AssertionError(f"{path} assigns no {name}")


def test_engine_files_stay_readable() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in (ROOT / "dama_engine").rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_ENGINE_FILE_LINES
    }
    assert long == {}


def test_the_graph_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The reader counts imports inside functions and under TYPE_CHECKING, and finds a circle they close."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import x\n")
    (package / "b.py").write_text("def f():\n    from pkg import c\n    return c\nx = 1\n")
    (package / "c.py").write_text("from .a import y\n")
    modules = {
        "pkg": package / "__init__.py",
        "pkg.a": package / "a.py",
        "pkg.b": package / "b.py",
        "pkg.c": package / "c.py",
    }
    original = import_graph.ROOT
    import_graph.ROOT = tmp_path
    try:
        edges = {(e.importer, e.target) for e in import_graph.imports(modules)}
    finally:
        import_graph.ROOT = original
    assert edges == {("pkg.a", "pkg.b"), ("pkg.b", "pkg.c"), ("pkg.c", "pkg.a")}
    graph: dict[str, set[str]] = {}
    for importer, target in edges:
        graph.setdefault(importer, set()).add(target)
    assert import_graph.cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_pair_generation_reaches_no_proving_ground_code() -> None:
    """Pair generation is generic (issue 22): nothing ``dama_engine.pairs`` imports, directly or through the modules
    it imports (at top level, in functions or under TYPE_CHECKING), is ``dama_engine.proving`` (the shapes world,
    the seeing base and its own on-policy pairs)."""
    modules, edges = _graph()
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, set()).add(edge.target)
    start = [module for module in modules if module == "dama_engine.pairs" or module.startswith("dama_engine.pairs.")]
    assert "dama_engine.pairs.run" in start
    reached: set[str] = set()
    while start:
        module = start.pop()
        if module not in reached:
            reached.add(module)
            start += graph.get(module, ())
    assert "dama_engine.data.matcher" in reached and "dama_engine.forward.generation" in reached  # the walk went deep
    assert sorted(module for module in reached if module.startswith("dama_engine.proving")) == []
