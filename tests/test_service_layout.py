"""The service layer's shape: thin routes, routers that never import routers, one page envelope, one idempotency
helper, one definition of each shared error, queries only in ``jobstore``, sessions typed as sessions.

Read from the source with ``ast`` (no import, no server): each check names the file and line at fault.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUTERS = sorted((ROOT / "api" / "routers").glob("*.py"))
MAX_ROUTE_LINES = 30


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _python_files(*packages: str) -> list[Path]:
    return sorted(path for package in packages for path in (ROOT / package).rglob("*.py"))


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"


def _is_route(node: ast.AST) -> bool:
    """A function decorated with ``@router.<method>(...)``."""
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return False
    return any(
        isinstance(decorator, ast.Call)
        and isinstance(decorator.func, ast.Attribute)
        and isinstance(decorator.func.value, ast.Name)
        and decorator.func.value.id == "router"
        for decorator in node.decorator_list
    )


def _imported_modules(tree: ast.Module) -> list[tuple[ast.AST, str]]:
    found: list[tuple[ast.AST, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found += [(node, node.module)] + [(node, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node, alias.name) for alias in node.names]
    return found


def test_the_walk_finds_the_routes() -> None:
    """The checks below are not vacuous: the routers and their routes are found."""
    routes = [node for path in ROUTERS for node in ast.walk(_tree(path)) if _is_route(node)]
    assert len(ROUTERS) >= 10 and len(routes) >= 30, (len(ROUTERS), len(routes))


def test_no_route_function_is_over_30_lines() -> None:
    too_long = [
        f"{_where(path, node)} {node.name}: {length} lines"
        for path in ROUTERS
        for node in ast.walk(_tree(path))
        if _is_route(node) and (length := node.end_lineno - node.lineno + 1) > MAX_ROUTE_LINES  # type: ignore[union-attr,operator,attr-defined]
    ]
    assert not too_long, f"routes over {MAX_ROUTE_LINES} lines (signature included): {too_long}"


def test_routers_never_import_routers() -> None:
    offending = [
        f"{_where(path, node)} imports {module}"
        for path in ROUTERS
        if path.name != "__init__.py"
        for node, module in _imported_modules(_tree(path))
        if module.startswith("api.routers")
    ]
    assert not offending, offending


def test_routers_read_and_write_through_services() -> None:
    """A route parses, calls a service (api.services) and shapes the answer: it calls no job-store function and
    commits nothing (the job store's types and the spec it validates may be imported)."""
    allowed = {"jobstore.spec", "jobstore.states", "jobstore.models"}
    offending = []
    for path in ROUTERS:
        tree = _tree(path)
        offending += [
            f"{_where(path, node)} imports {module}"
            for node, module in _imported_modules(tree)
            if isinstance(node, ast.ImportFrom)
            and module == node.module
            and module.startswith("jobstore")
            and module not in allowed
        ]
        offending += [
            f"{_where(path, node)} calls .commit()"
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "commit"
        ]
    assert not offending, offending


def test_no_subprocess_or_lock_in_a_router() -> None:
    """Child processes and locks are a service's business (api.services.previews), not a route's."""
    forbidden_modules = {"subprocess", "multiprocessing", "threading", "asyncio"}
    forbidden_names = {"Lock", "create_subprocess_exec", "create_subprocess_shell", "Popen"}
    offending = []
    for path in ROUTERS:
        tree = _tree(path)
        offending += [
            f"{_where(path, node)} imports {module}"
            for node, module in _imported_modules(tree)
            if module.split(".")[0] in forbidden_modules
        ]
        offending += [
            f"{_where(path, node)} uses {node.attr if isinstance(node, ast.Attribute) else node.id}"  # type: ignore[union-attr]
            for node in ast.walk(tree)
            if (isinstance(node, ast.Attribute) and node.attr in forbidden_names)
            or (isinstance(node, ast.Name) and node.id in forbidden_names)
        ]
    assert not offending, offending


# Not a list of the tenant's things but a window (?offset=&limit=) into a dataset's fixed 50-row preview sample:
# its has_more says whether the sample goes on, and there is no cursor to follow.
NOT_A_LIST = {"DatasetRowsPublic"}


def test_one_page_envelope() -> None:
    """Only ``api.schemas.Page`` declares ``has_more``/``next_cursor``; every list schema derives from it (one
    may redeclare ``next_cursor`` to describe what its cursor is, as ``EventsPublic`` does)."""
    declaring = []
    for path in _python_files("api"):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ClassDef) and node.name != "Page" and node.name not in NOT_A_LIST:
                fields = {
                    item.target.id
                    for item in node.body
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                }
                if "has_more" in fields or ("next_cursor" in fields and not _derives_from_page(node)):
                    declaring.append(f"{_where(path, node)} {node.name}")
    assert not declaring, f"page envelopes besides Page[T]: {declaring}"
    # ... and the routes build pages one way: Page.of (no hand-written cursor expression).
    cursor_by_hand = [
        _where(path, node)
        for path in _python_files("api")
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.keyword) and node.arg == "next_cursor"
    ]
    assert not cursor_by_hand, f"next_cursor= written by hand (use Page.of): {cursor_by_hand}"


def _derives_from_page(node: ast.ClassDef) -> bool:
    return any(
        isinstance(base, ast.Subscript) and isinstance(base.value, ast.Name) and base.value.id == "Page"
        for base in node.bases
    )


def test_one_idempotency_helper() -> None:
    """Replay and the commit race are written once (api.services.idempotency); creates call it."""
    helper = ROOT / "api" / "services" / "idempotency.py"
    users = [
        _where(path, node)
        for path in _python_files("api")
        if path != helper
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.Attribute)
        and node.attr in {"find_idempotency_key", "remember_idempotency_key", "forget_idempotency_key"}
    ]
    assert not users, f"idempotency keys handled outside {helper.relative_to(ROOT)}: {users}"
    catches = [
        _where(path, node)
        for path in _python_files("api")
        if path != helper
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.Name) and node.id == "IntegrityError"
    ]
    assert not catches, f"a commit race handled outside the helper: {catches}"


def _shared_errors() -> dict[str, str]:
    """``NAME -> description`` of every shared error response (``NAME = error("...")`` in ``api/responses.py``)."""
    shared: dict[str, str] = {}
    for node in _tree(ROOT / "api" / "responses.py").body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)
            and node.value.func.id == "error"
            and isinstance(node.value.args[0], ast.Constant)
        ):
            shared[ast.unparse(node.targets[0])] = str(node.value.args[0].value)
    return shared


def _inline_error_descriptions(path: Path) -> list[tuple[ast.AST, str]]:
    """Error responses written out in place: ``{"model": ErrorResponse, "description": "..."}``."""
    found: list[tuple[ast.AST, str]] = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Dict):
            entries = {
                key.value: value
                for key, value in zip(node.keys, node.values, strict=True)
                if isinstance(key, ast.Constant)
            }
            model, description = entries.get("model"), entries.get("description")
            if isinstance(model, ast.Name) and model.id == "ErrorResponse" and isinstance(description, ast.Constant):
                found.append((node, str(description.value)))
    return found


def test_each_shared_error_is_defined_once() -> None:
    """Every shared error response (``api/responses.py``) is written once: its description appears nowhere else in
    api/, and an error response written out in place is not shared by two routes (it belongs in responses.py)."""
    shared = _shared_errors()
    assert {"UNAUTHORIZED", "JOB_NOT_FOUND", "STORAGE_FULL", "TOO_MANY_ACTIVE"} <= set(shared), shared
    places: dict[str, list[str]] = {description: [] for description in shared.values()}
    inline: dict[str, list[str]] = {}
    for path in _python_files("api"):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Constant) and node.value in places:
                places[node.value].append(_where(path, node))
        for node, description in _inline_error_descriptions(path):
            inline.setdefault(description, []).append(_where(path, node))
    copied = {description: where for description, where in places.items() if len(where) != 1}
    assert not copied, f"shared error descriptions written more than once: {copied}"
    repeated = {description: where for description, where in inline.items() if len(where) > 1}
    assert not repeated, f"error responses written out in several places (share them in api/responses.py): {repeated}"


# Calls that query or lock rows: on whatever they are called (a session, a connection, a statement), and, for
# names other objects share (a progress bar's refresh, a dict's get), on a session.
QUERY_METHODS = {"execute", "scalar", "scalars", "query", "with_for_update", "select"}
SESSION_METHODS = {"refresh", "get"}
QUERY_BUILDERS = {"select", "insert", "update", "delete", "text", "func", "and_", "or_"}
# The readiness probe: ``SELECT 1`` (sqlalchemy's ``text``) on a bare connection (GET /readyz), no query of the
# store; allowed in this one function of this one file.
PROBE_FILE, PROBE_FUNCTION = "api/routers/health.py", "_check_database"


def _query_use(tree: ast.Module, where: str) -> list[str]:
    """Where a module builds a statement, queries or locks rows itself (``where``: its path from the root)."""
    exempt: set[int] = set()
    if where == PROBE_FILE:
        exempt = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and node.name == PROBE_FUNCTION
            for inner in ast.walk(node)
        }
    found = []
    for node in ast.walk(tree):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        if id(node) in exempt:
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlalchemy":
            names = {alias.name for alias in node.names} & QUERY_BUILDERS
            if where == PROBE_FILE:
                names -= {"text"}
            found += [f"{line} imports {name}" for name in sorted(names)]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            receiver, method = ast.unparse(node.func.value), node.func.attr
            if method in QUERY_METHODS or (method in SESSION_METHODS and "session" in receiver.lower()):
                found.append(f"{line} {receiver}.{method}()")
        if isinstance(node, ast.keyword) and node.arg == "with_for_update":
            found.append(f"{line} with_for_update=")
    return found


def test_queries_only_in_jobstore() -> None:
    """api/ and worker/ read, write and lock the job store through jobstore's functions, never with a statement,
    a query or a row lock of their own (``session.refresh(row, with_for_update=...)`` included); the API's
    readiness probe, ``SELECT 1`` on a bare connection, is no query of the store."""
    offending = [
        place
        for path in _python_files("api", "worker")
        if path.name != "distributed.py"
        for place in _query_use(_tree(path), str(path.relative_to(ROOT)))
    ]
    assert not offending, offending


def test_the_query_check_sees_row_locks_and_statements() -> None:
    """The check is not blind: what the service layer used to do is caught, wherever it is written."""
    sample = ast.parse(
        "from sqlalchemy import select\n"
        "def lock(session, dataset, delivery, query):\n"
        "    session.refresh(dataset, with_for_update={'read': True})\n"
        "    self.session.refresh(delivery, ['attempts'])\n"
        "    connection.execute(query.with_for_update())\n"
    )
    found = sorted(place.split(" ", 1)[1] for place in _query_use(sample, "api/services/sample.py"))
    assert found == sorted(
        [
            "imports select",
            "session.refresh()",
            "with_for_update=",
            "self.session.refresh()",
            "connection.execute()",
            "query.with_for_update()",
        ]
    ), found
    assert _query_use(ast.parse("bar.refresh()\nsettings.get('x')\n"), "worker/serve.py") == []


def test_sessions_are_typed() -> None:
    untyped = []
    for path in _python_files("api", "worker", "jobstore"):
        tree = _tree(path)
        # A lambda's parameters cannot be annotated; its caller's signature types the session.
        in_lambdas = {id(arg) for node in ast.walk(tree) if isinstance(node, ast.Lambda) for arg in node.args.args}
        for node in ast.walk(tree):
            if isinstance(node, ast.arg) and node.arg == "session" and id(node) not in in_lambdas:
                annotation = ast.unparse(node.annotation) if node.annotation is not None else "none"
                if annotation in {"Any", "object", "none"}:
                    untyped.append(f"{_where(path, node)} session: {annotation}")
    assert not untyped, untyped
