"""`privacy-ledger`: serve the API, manage its database, and administer it over HTTP."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from service import admin_cli
from service.settings import get_settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service import secret_key
    from service.domain import keys
    from service.domain.pipeline import Pipeline
    from service.storage import migrate
    from service.storage.database import Database

    settings = get_settings()
    try:
        # Before any worker starts: a bad key file is one clear message, and a new one is
        # created here once, so the workers only read it.
        secret_key.load(settings)
    except secret_key.SecretKeyError as exc:
        print(f"privacy-ledger: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Workers share their counters through files here (set before any worker starts).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="privacy-ledger-metrics-")
    database = Database(settings.database_url)
    try:
        if not args.no_migrate:
            migrate.upgrade(database.write_engine)
        if not settings.admin_key:
            token = keys.bootstrap_admin(Pipeline(database))
            if token is not None:
                print(
                    "privacy-ledger: created the first admin key (shown once, keep it safe):\n"
                    f"  {token}",
                    flush=True,
                )
    finally:
        database.dispose()
    uvicorn.run(
        "service.app:served_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=settings.log_level,
        access_log=False,
    )
    return 0


def _db_upgrade(_: argparse.Namespace) -> int:
    from service.storage import migrate
    from service.storage.database import Database

    database = Database(get_settings().database_url)
    try:
        migrate.upgrade(database.write_engine)
        revision = migrate.current_revision(database.write_engine)
        print(f"privacy-ledger: database at revision {revision}")
    finally:
        database.dispose()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="privacy-ledger", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP API (migrates the database first)")
    serve.add_argument(
        "--host",
        default=os.environ.get("LEDGER_HOST", "127.0.0.1"),
        help="address to listen on (default: $LEDGER_HOST or %(default)s)",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("LEDGER_PORT", "8000")),
        help="port to listen on (default: $LEDGER_PORT or %(default)s)",
    )
    serve.add_argument(
        "--workers", type=int, default=1, help="uvicorn worker processes (default: 1)"
    )
    serve.add_argument("--no-migrate", action="store_true", help="do not run migrations first")
    serve.set_defaults(handler=_serve)

    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser(
        "upgrade", help="run Alembic migrations to the newest revision"
    )
    upgrade.set_defaults(handler=_db_upgrade)

    admin_cli.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `privacy-ledger` command."""
    args = build_parser().parse_args(argv)
    if args.command in ("datasets", "keys", "ledger"):
        return admin_cli.run(args)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
