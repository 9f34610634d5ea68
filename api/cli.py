"""``dama``: the service's command line (the console script of pyproject's ``[project.scripts]``).

    dama admin create-key --tenant NAME   create the tenant if needed and print a new API key (shown once)
    dama admin list-keys --tenant NAME    list a tenant's keys (id, prefix, created, revoked)
    dama admin revoke-key KEY_ID          revoke a key: requests with it answer 401 from then on
    dama migrate                          upgrade the job store's database to the newest schema
    dama api [--host H] [--port P]        run the HTTP API (uvicorn with api.app:create_app)
    dama worker                           run a Celery worker on DAMA_WORKER_QUEUES (python -m worker)
    dama serve [--host H] [--port P] [--demo]   API + worker + inference on one machine, no external servers
    dama infer [--host H] [--port P]      run the inference backend of /v1/chat/completions (worker.infer)
    dama models build NAME --output DIR   build a built-in model (dama/tiny-llava, ...) here (worker.build_model)

and the client commands of :mod:`dama_client.cli`
(``dama datasets|jobs|evaluations|pairs|keys|webhooks|models|health``), which talk to a running service over HTTP.
Server imports are lazy: with only the ``client`` extra installed, the client commands work.

Settings come from the ``DAMA_`` environment, read here at the entry point.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from jobstore.settings import Settings

ALEMBIC_INI = Path(__file__).resolve().parent.parent / "alembic.ini"

Command = Callable[[argparse.Namespace, "Settings"], int]


def _create_key(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from jobstore import repository
    from jobstore.db import make_engine, make_session_factory, session_scope

    try:
        repository.check_tenant_name(args.tenant)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if settings.database_url is None:
        settings.home.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            tenant = repository.get_or_create_tenant(session, name=args.tenant)
            row, plaintext = repository.create_api_key(
                session, tenant_id=tenant.id, pepper=settings.resolved_api_key_pepper
            )
            tenant_id, key_id = tenant.id, row.id
    except SQLAlchemyError as error:
        print(f"error: could not create the key ({type(error).__name__}); has `dama migrate` run?", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    # The key alone on stdout (scripts capture it); everything else on stderr.
    print(plaintext)
    print(f"created key {key_id} for tenant {args.tenant!r} ({tenant_id}); it is not shown again", file=sys.stderr)
    return 0


@contextmanager
def _store_session(settings: Settings) -> Iterator[Session]:
    """A job-store session committed on success, its engine disposed after; a database error is reported as a
    :class:`StoreUnavailable` naming the likely cause."""
    from sqlalchemy.exc import SQLAlchemyError

    from jobstore.db import make_engine, make_session_factory, session_scope

    if settings.database_url is None:
        settings.home.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            yield session
    except SQLAlchemyError as error:
        raise StoreUnavailable(f"the job store failed ({type(error).__name__}); has `dama migrate` run?") from error
    finally:
        engine.dispose()


class StoreUnavailable(Exception):
    """The job store could not do what an admin command asked."""


def _list_keys(args: argparse.Namespace, settings: Settings) -> int:
    from jobstore import repository

    with _store_session(settings) as session:
        tenant = repository.tenant_by_name(session, name=args.tenant)
        if tenant is None:
            print(f"error: no tenant named {args.tenant!r}", file=sys.stderr)
            return 1
        for row in repository.all_api_keys(session, tenant_id=tenant.id):
            print(
                f"{row.id}  {row.prefix}  created {row.created_at:%Y-%m-%dT%H:%M:%S}  "
                f"{'revoked ' + format(row.revoked_at, '%Y-%m-%dT%H:%M:%S') if row.revoked_at else 'active'}"
            )
    return 0


def _revoke_key(args: argparse.Namespace, settings: Settings) -> int:
    from jobstore import repository

    with _store_session(settings) as session:
        if repository.revoke_any_api_key(session, key_id=args.key_id) is None:
            print(f"error: no API key with id {args.key_id!r}", file=sys.stderr)
            return 1
    print(f"revoked key {args.key_id}; requests with it now answer 401", file=sys.stderr)
    return 0


def _migrate(_args: argparse.Namespace, settings: Settings) -> int:
    from alembic import command
    from alembic.config import Config

    if settings.database_url is None:
        settings.home.mkdir(parents=True, exist_ok=True)
    config = Config(str(ALEMBIC_INI))
    config.attributes["url"] = settings.resolved_database_url
    command.upgrade(config, "head")
    print("database at the newest schema", file=sys.stderr)
    return 0


def _api(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    # The factory reads the settings itself in the server process.
    host = args.host or settings.api_host
    port = args.port or settings.api_port
    uvicorn.run("api.app:create_app", factory=True, host=host, port=port, log_level=args.log_level)
    return 0


def _exec_module(module: str, argv: list[str]) -> int:
    """Replace this process with ``python -m module ...``: the API package never imports the worker or engine."""
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])
    return 0  # not reached


def _worker(args: argparse.Namespace, _settings: Settings) -> int:
    return _exec_module("worker", list(args.extra))


def _serve(args: argparse.Namespace, _settings: Settings) -> int:
    return _exec_module("worker.serve", list(args.extra))


def _infer(args: argparse.Namespace, _settings: Settings) -> int:
    return _exec_module("worker.infer", list(args.extra))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dama", description="DAMA alignment service.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    admin = commands.add_parser("admin", help="administration: API keys")
    admin_commands = admin.add_subparsers(dest="admin_command", required=True, metavar="ADMIN_COMMAND")
    create_key = admin_commands.add_parser("create-key", help="create a tenant's API key and print it once")
    create_key.add_argument(
        "--tenant",
        required=True,
        help="tenant name, created if it does not exist: 1-64 characters of a-z, 0-9, '-', '_', '.', starting "
        "with a letter or digit",
    )
    create_key.set_defaults(handler=_create_key)
    list_keys = admin_commands.add_parser("list-keys", help="list a tenant's keys: id, prefix, created, revoked")
    list_keys.add_argument("--tenant", required=True)
    list_keys.set_defaults(handler=_list_keys)
    revoke_key = admin_commands.add_parser("revoke-key", help="revoke a key by id (any tenant's)")
    revoke_key.add_argument("key_id")
    revoke_key.set_defaults(handler=_revoke_key)

    migrate = commands.add_parser("migrate", help="upgrade the database to the newest schema (alembic head)")
    migrate.set_defaults(handler=_migrate)

    api = commands.add_parser("api", help="run the HTTP API")
    api.add_argument("--host", default=None, help="address to listen on (default DAMA_API_HOST, 127.0.0.1)")
    api.add_argument("--port", type=int, default=None, help="port (default DAMA_API_PORT, 8000)")
    api.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    api.set_defaults(handler=_api)

    worker = commands.add_parser("worker", help="run a worker on DAMA_WORKER_QUEUES (python -m worker)")
    worker.set_defaults(handler=_worker, passthrough=True)

    serve = commands.add_parser(
        "serve", help="API + worker on this machine, no external servers (--host, --port, --demo)"
    )
    serve.set_defaults(handler=_serve, passthrough=True)  # options: see `dama serve --help`

    infer = commands.add_parser(
        "infer", help="run the inference backend the /v1 chat routes forward to (--host, --port; internal only)"
    )
    infer.set_defaults(handler=_infer, passthrough=True)  # options: see `dama infer --help`

    from dama_client.cli import add_commands  # httpx and pydantic only: no server import

    add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # `dama serve` and `dama worker` hand their options to the program they start.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    if hasattr(args, "local_module"):  # `dama models build`: the worker package builds a built-in model here
        return _exec_module(args.local_module, [args.name, "--output", args.output])
    if hasattr(args, "client_handler"):  # a client command: no server settings, no server imports
        from dama_client.cli import run

        return run(args)
    from jobstore.settings import Settings

    try:
        settings = Settings()
    except ValueError as error:  # pydantic's ValidationError: refused settings (e.g. no pepper in production)
        print(f"error: invalid settings: {error}", file=sys.stderr)
        return 2
    handler: Command = args.handler
    try:
        return handler(args, settings)
    except StoreUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
