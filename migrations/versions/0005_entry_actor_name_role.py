"""ledger entries record their actor key's name and role at write time

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-08

An auditor reading the ledger should see who spent the budget, not only a key
id: `ledger_entries` gains `actor_name` and `actor_role` (nullable), filled by
the service for every new entry with the key's name and role as they are when
the entry is written (the bootstrap admin key: `LEDGER_ADMIN_KEY`, `admin`;
the service itself: `ledger service`, `system`).

No row is changed: entries written before this revision keep NULL in both and
their hashes, which never covered them; a new entry's hash covers the pair
(`service/domain/ledger.py::_hashed_fields`), so old chains verify and new
entries chain onto them. Adding a column leaves SQLite's append-only triggers
in place.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SQLITE_TRIGGER_ACTIONS = ("UPDATE", "DELETE")


def upgrade() -> None:
    op.add_column("ledger_entries", sa.Column("actor_name", sa.String(length=200), nullable=True))
    op.add_column("ledger_entries", sa.Column("actor_role", sa.String(length=16), nullable=True))


def downgrade() -> None:
    # The pair is inside the hashes of the entries that carry it: dropping it would break them.
    entries = sa.table("ledger_entries", sa.column("actor_role"))
    count = sa.select(sa.func.count()).where(entries.c.actor_role.is_not(None))
    written = op.get_bind().execute(count).scalar_one()
    if written:
        raise RuntimeError(
            f"cannot downgrade below 0005: {written} ledger entries hash their actor's name and "
            "role, and the ledger is append-only"
        )
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        # Dropping a column copies the table on SQLite, which drops its triggers with it.
        for action in _SQLITE_TRIGGER_ACTIONS:
            op.execute(f"DROP TRIGGER IF EXISTS ledger_entries_no_{action.lower()}")
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_column("actor_role")
        batch_op.drop_column("actor_name")
    if sqlite:
        for action in _SQLITE_TRIGGER_ACTIONS:
            # The same triggers as migration 0001's.
            op.execute(
                f"CREATE TRIGGER ledger_entries_no_{action.lower()} BEFORE {action} "
                "ON ledger_entries BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END"
            )
