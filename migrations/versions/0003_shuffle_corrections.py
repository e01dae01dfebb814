"""shuffle runs charged under the old charge are flagged for a correction entry

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

A `sampling: "shuffle"` epoch used to be charged as one Gaussian step of σ;
with fixed-size shuffled batches adding a record is a substitution in one
batch (sensitivity 2C), so an epoch costs Gaussian(σ/2): four times the RDP
(docs/accounting.md §1). Posted figures are never rewritten. Instead:

- `datasets.corrections_due` (false by default) is set for every dataset with
  a shuffle run; the service's next write transaction on such a dataset
  appends a `correction` entry (the difference for the epochs charged) and,
  for an active run, a `hold_top_up` entry (the difference for the epochs it
  still holds), then clears the flag (`service/domain/holds.py::correct`);
- the ledger's kind constraint admits those two kinds.

No ledger row is changed. On SQLite a CHECK constraint can only change by
copying the table (batch mode): the rows are copied as they are, and the
append-only triggers, which SQLite drops with the old table, are recreated.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD_KINDS = (
    "dataset_created",
    "hold",
    "charge",
    "release_hold",
    "void",
    "cap_change",
    "freeze",
    "unfreeze",
    "description_change",
)
_NEW_KINDS = ("correction", "hold_top_up")


def _kinds(kinds: Sequence[str]) -> str:
    return f"kind IN ({', '.join(repr(kind) for kind in kinds)})"


def _kind_constraint(kinds: Sequence[str]) -> None:
    """Replace the ledger's kind constraint; on SQLite keep its append-only triggers."""
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        for action in _SQLITE_TRIGGER_ACTIONS:
            op.execute(f"DROP TRIGGER IF EXISTS ledger_entries_no_{action.lower()}")
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_constraint("ck_ledger_kind", type_="check")
        batch_op.create_check_constraint("ck_ledger_kind", _kinds(kinds))
    if sqlite:
        for action in _SQLITE_TRIGGER_ACTIONS:
            # The same triggers as migration 0001's.
            op.execute(
                f"CREATE TRIGGER ledger_entries_no_{action.lower()} BEFORE {action} "
                "ON ledger_entries BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END"
            )


_SQLITE_TRIGGER_ACTIONS = ("UPDATE", "DELETE")


def upgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("corrections_due", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    _kind_constraint(_OLD_KINDS + _NEW_KINDS)
    datasets = sa.table("datasets", sa.column("id"), sa.column("corrections_due", sa.Boolean))
    runs = sa.table("runs", sa.column("dataset_id"), sa.column("sampling"))
    shuffled = (
        sa.select(runs.c.dataset_id)
        .where(runs.c.dataset_id == datasets.c.id, runs.c.sampling == "shuffle")
        .exists()
    )
    op.execute(sa.update(datasets).where(shuffled).values(corrections_due=True))


def downgrade() -> None:
    # Correction entries cannot be kept under the old constraint, nor dropped (append-only).
    entries = sa.table("ledger_entries", sa.column("kind"))
    count = sa.select(sa.func.count()).where(entries.c.kind.in_(_NEW_KINDS))
    written = op.get_bind().execute(count).scalar_one()
    if written:
        raise RuntimeError(
            f"cannot downgrade below 0003: {written} correction/hold_top_up ledger entries exist "
            "and the ledger is append-only"
        )
    _kind_constraint(_OLD_KINDS)
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("corrections_due")
