#!/bin/sh
# Container entrypoint: `migrate` runs the migrations and exits; `serve` (the
# default) starts the API on an already-migrated database; anything else is
# passed to `privacy-ledger` as is.
set -eu

command="${1:-serve}"
[ "$#" -gt 0 ] && shift

case "$command" in
  migrate)
    exec privacy-ledger db upgrade "$@"
    ;;
  serve)
    if [ "${LEDGER_MIGRATE_ON_START:-0}" = "1" ]; then
      privacy-ledger db upgrade
    fi
    exec privacy-ledger serve --no-migrate \
      --host "${LEDGER_HOST:-0.0.0.0}" \
      --port "${LEDGER_PORT:-8000}" \
      --workers "${LEDGER_WORKERS:-2}" "$@"
    ;;
  *)
    exec privacy-ledger "$command" "$@"
    ;;
esac
