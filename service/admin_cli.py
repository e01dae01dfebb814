"""Admin commands of `privacy-ledger`, spoken over the HTTP API through `trainer_client`.

They go through the API (not the database) so that every change is
authenticated, lands in the ledger with the admin's key id as the actor, and
works the same against SQLite or PostgreSQL, local or remote. They use the
same client trainers use (`trainer_client.LedgerClient`), so every POST
carries an Idempotency-Key reused across its retries, and a lost connection or
a 5xx is retried with backoff instead of failing (or, worse, creating twice).
Tables for people by default, `--json` for scripts. Exit codes: 0 success,
1 the API refused (its problem is printed), 2 bad usage, 3 the API is unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from trainer_client import LedgerClient, LedgerError, TransportError

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


class CommandError(Exception):
    """A failure to report on stderr with an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain text table."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


DATASET_COLUMNS = (
    "id",
    "epsilon_cap",
    "delta",
    "epsilon_spent",
    "epsilon_reserved",
    "frozen",
    "ledger_seq",
)
KEY_COLUMNS = ("id", "role", "datasets", "name", "created_at", "revoked_at")


def _emit(args: argparse.Namespace, data: Any, columns: Sequence[str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(table(data if isinstance(data, list) else [data], columns))


def _datasets(args: argparse.Namespace, client: LedgerClient) -> None:
    action = args.datasets_action
    if action == "list":
        _emit(args, [dict(d.raw) for d in client.datasets(page_size=1000)], DATASET_COLUMNS)
        return
    if action == "create":
        dataset = client.create_dataset(
            args.id, epsilon_cap=args.epsilon_cap, delta=args.delta, description=args.description
        )
    elif action == "show":
        dataset = client.dataset(args.id)
    elif action == "set-cap":
        dataset = client.update_dataset(args.id, epsilon_cap=args.epsilon_cap, reason=args.reason)
    else:  # freeze / unfreeze
        dataset = client.update_dataset(args.id, frozen=action == "freeze", reason=args.reason)
    _emit(args, dict(dataset.raw), DATASET_COLUMNS)


def _keys(args: argparse.Namespace, client: LedgerClient) -> None:
    action = args.keys_action
    if action == "list":
        _emit(args, [dict(k.raw) for k in client.keys(page_size=1000)], KEY_COLUMNS)
    elif action == "create":
        # argparse makes --dataset and --all-datasets exclusive and one of them required for
        # scoped roles (see _scope); None is "every dataset", sent as no scope at all.
        key = client.create_key(args.role, datasets=_scope(args), name=args.name)
        data = dict(key.raw)
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            print(table([data], KEY_COLUMNS))
            print(f"\nkey (shown once, store it now): {key.key}")
    else:
        _emit(args, dict(client.revoke_key(args.id).raw), KEY_COLUMNS)


def _scope(args: argparse.Namespace) -> list[str] | None:
    """The key's dataset scope: a list, or None for every dataset (explicitly asked for)."""
    if args.role == "admin":
        if args.dataset:
            raise CommandError("admin keys cannot be scoped: drop --dataset", EXIT_USAGE)
        return None
    if args.all_datasets:
        return None
    if not args.dataset:
        # An unscoped trainer or auditor key reaches every dataset, including those created
        # later: that must be a decision, never the result of a forgotten option.
        raise CommandError(
            f"a {args.role} key needs --dataset ID (repeatable) or an explicit --all-datasets",
            EXIT_USAGE,
        )
    return list(args.dataset)


def _ledger(args: argparse.Namespace, client: LedgerClient) -> None:
    if args.ledger_action == "verify":
        result = client.verify(args.id)
        if args.json:
            print(json.dumps(dict(result.raw), indent=2))
        else:
            state = "OK" if result.ok else "FAILED"
            print(f"{args.id}: {state} ({result.entries} entries, head {result.last_hash})")
            for problem in result.problems:
                print(f"  - {problem}")
        if not result.ok:
            raise CommandError(f"ledger of {args.id!r} does not verify", EXIT_REFUSED)
        return
    # Fetched whole before anything is written, so a refusal leaves no half-written file.
    if args.format == "csv":
        text = client.ledger_csv(args.id)
    else:
        text = json.dumps(client.ledger_export(args.id), indent=2) + "\n"
    if args.output:
        with open(args.output, "w", encoding="utf-8") as output:
            output.write(text)
    else:
        sys.stdout.write(text)


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `datasets`, `keys` and `ledger` on the top-level parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("LEDGER_URL", "http://127.0.0.1:8000"),
        help="the ledger's base URL (default: $LEDGER_URL or %(default)s)",
    )
    common.add_argument(
        "--api-key",
        default=None,
        help="an admin key, or an auditor key for `ledger` (default: $LEDGER_API_KEY)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")

    def action(parent: Any, name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = parent.add_parser(
            name, parents=[common], help=help_text, description=help_text
        )
        return parser

    def dataset_id(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("id", help="the dataset's id")

    datasets = commands.add_parser(
        "datasets",
        help="create, list, show, cap and freeze datasets",
        description="Create, list, show, cap and freeze datasets (admin).",
    )
    actions = datasets.add_subparsers(dest="datasets_action", required=True, metavar="ACTION")
    action(actions, "list", "list every dataset with its budget")
    create = action(actions, "create", "create a dataset with its budget (ε cap and δ)")
    dataset_id(create)
    create.add_argument("--epsilon-cap", type=float, required=True, help="the ε cap")
    create.add_argument(
        "--delta", type=float, required=True, help="the dataset's δ (fixed for good)"
    )
    create.add_argument("--description", help="free text shown to auditors")
    dataset_id(action(actions, "show", "show one dataset's budget"))
    set_cap = action(actions, "set-cap", "raise or lower a dataset's ε cap (a ledger entry)")
    dataset_id(set_cap)
    set_cap.add_argument("epsilon_cap", type=float, help="the new ε cap")
    set_cap.add_argument("--reason", help="why, recorded in the ledger entry")
    for name, what in (
        ("freeze", "freeze a dataset: nothing is charged until it is unfrozen"),
        ("unfreeze", "unfreeze a frozen dataset"),
    ):
        frozen = action(actions, name, what)
        dataset_id(frozen)
        frozen.add_argument("--reason", help="why, recorded in the ledger entry")
    datasets.set_defaults(handler=_datasets)

    keys = commands.add_parser(
        "keys",
        help="issue, list and revoke API keys",
        description="Issue, list and revoke API keys (admin).",
    )
    key_actions = keys.add_subparsers(dest="keys_action", required=True, metavar="ACTION")
    action(key_actions, "list", "list every key (never its secret)")
    key_create = action(key_actions, "create", "issue a key; its secret is printed once")
    key_create.add_argument(
        "--role", choices=("admin", "trainer", "auditor"), required=True, help="the key's role"
    )
    scope = key_create.add_mutually_exclusive_group()
    scope.add_argument(
        "--dataset",
        action="append",
        metavar="ID",
        help="scope a trainer or auditor key to this existing dataset (repeatable)",
    )
    scope.add_argument(
        "--all-datasets",
        action="store_true",
        help="give a trainer or auditor key every dataset, including ones created later",
    )
    key_create.add_argument("--name", help="a name people recognise the key by")
    key_revoke = action(key_actions, "revoke", "revoke a key: refused from its next request on")
    key_revoke.add_argument("id", help="the key's id (not its secret)")
    keys.set_defaults(handler=_keys)

    ledger = commands.add_parser(
        "ledger",
        help="export or verify a dataset's ledger",
        description="Export or verify a dataset's ledger (admin or auditor).",
    )
    ledger_actions = ledger.add_subparsers(dest="ledger_action", required=True, metavar="ACTION")
    export = action(ledger_actions, "export", "write every entry of a dataset's ledger")
    dataset_id(export)
    export.add_argument(
        "--format", choices=("csv", "json"), default="csv", help="output format (default: csv)"
    )
    export.add_argument("--output", "-o", help="file to write (default: standard output)")
    dataset_id(
        action(ledger_actions, "verify", "recheck the hash chain and replay (exit 1 if broken)")
    )
    ledger.set_defaults(handler=_ledger)


def run(args: argparse.Namespace) -> int:
    """Run an admin command; report failures on stderr with their exit code."""
    try:
        key = args.api_key or os.environ.get("LEDGER_API_KEY")
        if not key:
            raise CommandError("no API key: pass --api-key or set LEDGER_API_KEY", EXIT_USAGE)
        with LedgerClient(args.url, key, timeout=30.0) as client:
            try:
                args.handler(args, client)
            except TransportError as exc:
                raise CommandError(f"cannot reach {args.url}: {exc}", EXIT_UNREACHABLE) from None
            except LedgerError as exc:
                # The client's typed errors carry the problem's code and detail in their text.
                raise CommandError(str(exc), EXIT_REFUSED) from None
    except CommandError as exc:
        print(f"privacy-ledger: {exc}", file=sys.stderr)
        return exc.code
    return 0
