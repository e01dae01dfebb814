"""Admin commands of `privacy-ledger`, spoken over the HTTP API.

They go through the API (not the database) so that every change is
authenticated, lands in the ledger with the admin's key id as the actor, and
works the same against SQLite or PostgreSQL, local or remote. Tables for
people by default, `--json` for scripts. Exit codes: 0 success, 1 the API
refused (its problem is printed), 2 bad usage, 3 the API is unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


class CommandError(Exception):
    """A failure to report on stderr with an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Api:
    """The few calls the admin commands make."""

    def __init__(self, url: str, key: str | None, timeout: float = 30.0) -> None:
        if not key:
            raise CommandError("no API key: pass --api-key or set LEDGER_API_KEY", EXIT_USAGE)
        self.http = httpx.Client(
            base_url=url.rstrip("/"), timeout=timeout, headers={"Authorization": f"Bearer {key}"}
        )

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise CommandError(
                f"cannot reach {self.http.base_url}: {exc}", EXIT_UNREACHABLE
            ) from None
        if response.status_code >= 400:
            try:
                problem = response.json()
                message = (
                    f"{problem.get('code', response.status_code)}: {problem.get('detail', '')}"
                )
            except ValueError:
                message = f"HTTP {response.status_code}: {response.text[:200]}"
            raise CommandError(message, EXIT_REFUSED)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.call(method, path, **kwargs).json()

    def pages(self, path: str, cursor: str, **params: Any) -> Iterator[dict[str, Any]]:
        after: Any = None
        while True:
            query = {**params, "limit": 1000, **({"after": after} if after is not None else {})}
            page = self.json("GET", path, params=query)
            yield from page["data"]
            if not page["has_more"]:
                return
            after = page["data"][-1][cursor]


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


def _datasets(args: argparse.Namespace, api: Api) -> None:
    action = args.datasets_action
    if action == "list":
        _emit(args, list(api.pages("/v1/datasets", "id")), DATASET_COLUMNS)
        return
    path = f"/v1/datasets/{args.id}"
    if action == "create":
        body = {"id": args.id, "epsilon_cap": args.epsilon_cap, "delta": args.delta}
        if args.description:
            body["description"] = args.description
        data = api.json("POST", "/v1/datasets", json=body)
    elif action == "show":
        data = api.json("GET", path)
    elif action == "set-cap":
        data = api.json("PATCH", path, json=_with_reason({"epsilon_cap": args.epsilon_cap}, args))
    else:  # freeze / unfreeze
        data = api.json("PATCH", path, json=_with_reason({"frozen": action == "freeze"}, args))
    _emit(args, data, DATASET_COLUMNS)


def _with_reason(body: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    return {**body, "reason": args.reason} if args.reason else body


def _keys(args: argparse.Namespace, api: Api) -> None:
    action = args.keys_action
    if action == "list":
        _emit(args, list(api.pages("/v1/keys", "id")), KEY_COLUMNS)
    elif action == "create":
        body: dict[str, Any] = {"role": args.role, "name": args.name}
        if args.dataset:
            body["datasets"] = args.dataset
        data = api.json("POST", "/v1/keys", json=body)
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            print(table([data], KEY_COLUMNS))
            print(f"\nkey (shown once, store it now): {data['key']}")
    else:
        _emit(args, api.json("DELETE", f"/v1/keys/{args.id}"), KEY_COLUMNS)


def _ledger(args: argparse.Namespace, api: Api) -> None:
    path = f"/v1/datasets/{args.id}/ledger"
    if args.ledger_action == "verify":
        result = api.json("GET", f"{path}/verify")
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            state = "OK" if result["ok"] else "FAILED"
            print(f"{args.id}: {state} ({result['entries']} entries, head {result['last_hash']})")
            for problem in result["problems"]:
                print(f"  - {problem}")
        if not result["ok"]:
            raise CommandError(f"ledger of {args.id!r} does not verify", EXIT_REFUSED)
        return
    fmt = "csv" if args.format == "csv" else "export"
    output = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        with api.http.stream("GET", path, params={"format": fmt}) as response:
            if response.status_code >= 400:
                response.read()
                api.call("GET", path, params={"format": fmt})  # raises with the problem
            for chunk in response.iter_text():
                output.write(chunk)
    except httpx.TransportError as exc:
        raise CommandError(f"cannot reach {api.http.base_url}: {exc}", EXIT_UNREACHABLE) from None
    finally:
        if output is not sys.stdout:
            output.close()


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `datasets`, `keys` and `ledger` on the top-level parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("LEDGER_URL", "http://127.0.0.1:8000"))
    common.add_argument("--api-key", default=os.environ.get("LEDGER_API_KEY"))
    common.add_argument("--json", action="store_true", help="machine-readable output")

    datasets = commands.add_parser("datasets", help="create, list, show, cap and freeze datasets")
    actions = datasets.add_subparsers(dest="datasets_action", required=True)
    actions.add_parser("list", parents=[common])
    create = actions.add_parser("create", parents=[common])
    create.add_argument("id")
    create.add_argument("--epsilon-cap", type=float, required=True)
    create.add_argument("--delta", type=float, required=True)
    create.add_argument("--description")
    actions.add_parser("show", parents=[common]).add_argument("id")
    set_cap = actions.add_parser("set-cap", parents=[common])
    set_cap.add_argument("id")
    set_cap.add_argument("epsilon_cap", type=float)
    set_cap.add_argument("--reason")
    for name in ("freeze", "unfreeze"):
        action = actions.add_parser(name, parents=[common])
        action.add_argument("id")
        action.add_argument("--reason")
    datasets.set_defaults(handler=_datasets)

    keys = commands.add_parser("keys", help="issue, list and revoke API keys")
    key_actions = keys.add_subparsers(dest="keys_action", required=True)
    key_actions.add_parser("list", parents=[common])
    key_create = key_actions.add_parser("create", parents=[common])
    key_create.add_argument("--role", choices=("admin", "trainer", "auditor"), required=True)
    key_create.add_argument("--dataset", action="append", help="scope to a dataset (repeatable)")
    key_create.add_argument("--name")
    key_actions.add_parser("revoke", parents=[common]).add_argument("id")
    keys.set_defaults(handler=_keys)

    ledger = commands.add_parser("ledger", help="export or verify a dataset's ledger")
    ledger_actions = ledger.add_subparsers(dest="ledger_action", required=True)
    export = ledger_actions.add_parser("export", parents=[common])
    export.add_argument("id")
    export.add_argument("--format", choices=("csv", "json"), default="csv")
    export.add_argument("--output", "-o", help="file to write (default: standard output)")
    ledger_actions.add_parser("verify", parents=[common]).add_argument("id")
    ledger.set_defaults(handler=_ledger)


def run(args: argparse.Namespace) -> int:
    """Run an admin command; report failures on stderr with their exit code."""
    try:
        api = Api(args.url, args.api_key)
        args.handler(args, api)
    except CommandError as exc:
        print(f"privacy-ledger: {exc}", file=sys.stderr)
        return exc.code
    return 0
