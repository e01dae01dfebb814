"""datasets carry their filter's shares, exact pure-ε sums and a guarantee mark; entries their
figures before them

Revision ID: 0004
Revises: 0002 (the lead rewires this to 0003 at merge; nothing here depends on 0003)
Create Date: 2026-11-30

Issue 12 makes a dataset's cap a filter of members with shares of δ fixed at
creation (docs/accounting.md §3). Existing datasets keep exactly the filter they
were created with:

- `shares`: uniform on the dataset's own orders (δ/|Λ| each) and no pure-sum member,
  which is `accountant.Filter` bit for bit, so every figure they report is unchanged;
- `pure_posted` / `pure_pending`: NULL (no pure-sum member to feed);
- `outside_guarantee_seq` / `_reason`: the first entry that took the dataset outside the
  filter's guarantee. Before 0004 a void subtracted its charge's cost (a refund of an
  output that was handed out) and a cap could be raised after charges; both are found
  in the ledger and marked here. No figure changes: the mark only says so.

Ledger entries gain `epsilon_spent_before`, `epsilon_reserved_before` and `pure`, NULL
for existing entries (their hashes cover exactly what they covered).
"""

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _legacy_shares(orders_text: str) -> str:
    orders = [float(a) for a in json.loads(orders_text)]
    weights = [f"1/{len(orders)}"] * len(orders)
    shares = {"profile": "uniform", "orders": orders, "weights": weights, "pure_sum": False}
    return json.dumps(shares, separators=(",", ":"))


def _legacy_mark(connection: sa.Connection, dataset_id: str) -> tuple[int, str] | None:
    """The first entry of a dataset that refunded a charge or raised the cap after one."""
    rows = connection.execute(
        sa.text(
            "SELECT seq, kind, units, voids_seq, details FROM ledger_entries "
            "WHERE dataset_id = :id AND kind IN ('charge', 'void', 'cap_change') ORDER BY seq"
        ),
        {"id": dataset_id},
    )
    charged = False
    for seq, kind, units, voids_seq, details in rows:
        if kind == "charge":
            charged = True
        elif kind == "void" and units is not None:
            return seq, f"entry {seq} refunded the cost of charge {voids_seq}"
        elif kind == "cap_change" and charged:
            change = json.loads(details)
            if change["new"] > change["old"]:
                return (
                    seq,
                    f"entry {seq} raised the cap from {change['old']:g} to {change['new']:g}",
                )
    return None


def upgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("shares", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("pure_posted", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("pure_pending", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("outside_guarantee_seq", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("outside_guarantee_reason", sa.Text(), nullable=True))
    connection = op.get_bind()
    datasets = connection.execute(sa.text("SELECT id, orders FROM datasets")).all()
    for dataset_id, orders in datasets:
        mark = _legacy_mark(connection, dataset_id)
        connection.execute(
            sa.text(
                "UPDATE datasets SET shares = :shares, outside_guarantee_seq = :seq, "
                "outside_guarantee_reason = :reason WHERE id = :id"
            ),
            {
                "shares": _legacy_shares(orders),
                "seq": mark[0] if mark else None,
                "reason": mark[1] if mark else None,
                "id": dataset_id,
            },
        )
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.alter_column("shares", existing_type=sa.Text(), nullable=False)
    # Plain ADD COLUMN (nullable, no constraint): SQLite keeps the append-only triggers.
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("epsilon_spent_before", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("epsilon_reserved_before", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("pure", sa.Text(), nullable=True))


def downgrade() -> None:
    # Only a database without entries written since 0004 downgrades faithfully: those
    # entries' hashes cover the dropped columns, and pure-sum datasets lose their member.
    # Plain DROP COLUMN (SQLite ≥ 3.35 too): a batch copy would drop the append-only triggers.
    for column in ("pure", "epsilon_reserved_before", "epsilon_spent_before"):
        op.execute(f"ALTER TABLE ledger_entries DROP COLUMN {column}")
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("outside_guarantee_reason")
        batch_op.drop_column("outside_guarantee_seq")
        batch_op.drop_column("pure_pending")
        batch_op.drop_column("pure_posted")
        batch_op.drop_column("shares")
