"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23

The ledger is append-only: besides the hash chain (which detects any change),
triggers refuse UPDATE and DELETE on ledger_entries in both backends.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("datasets", sa.Text(), nullable=True),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("role IN ('admin', 'trainer', 'auditor')", name="ck_api_keys_role"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "datasets",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("epsilon_cap", sa.Float(), nullable=False),
        sa.Column("delta", sa.Float(), nullable=False),
        sa.Column("frozen", sa.Boolean(), nullable=False),
        sa.Column("orders", sa.Text(), nullable=False),
        sa.Column("posted_units", sa.Text(), nullable=False),
        sa.Column("pending_units", sa.Text(), nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("last_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("delta > 0 AND delta < 1", name="ck_datasets_delta"),
        sa.CheckConstraint("epsilon_cap >= 0", name="ck_datasets_cap"),
        sa.CheckConstraint("last_seq >= 0", name="ck_datasets_seq"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "idempotency_records",
        sa.Column("holder", sa.String(length=40), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("response_body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("holder", "key"),
    )
    op.create_table(
        "ledger_entries",
        sa.Column("dataset_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("run_id", sa.String(length=40), nullable=True),
        sa.Column("release_id", sa.String(length=40), nullable=True),
        sa.Column("voids_seq", sa.Integer(), nullable=True),
        sa.Column("mechanism", sa.Text(), nullable=True),
        sa.Column("units", sa.Text(), nullable=True),
        sa.Column("actor", sa.String(length=40), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("epsilon", sa.Float(), nullable=True),
        sa.Column("epsilon_spent_after", sa.Float(), nullable=False),
        sa.Column("epsilon_reserved_after", sa.Float(), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("created_at", sa.String(length=40), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.CheckConstraint(
            "kind IN ('dataset_created', 'hold', 'charge', 'release_hold', 'void', 'cap_change', 'freeze', 'unfreeze', 'description_change')",
            name="ck_ledger_kind",
        ),
        sa.CheckConstraint("seq >= 1", name="ck_ledger_seq"),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
        ),
        sa.PrimaryKeyConstraint("dataset_id", "seq"),
        sa.UniqueConstraint("dataset_id", "voids_seq", name="uq_ledger_one_void_per_charge"),
    )
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.create_index("ix_ledger_run", ["dataset_id", "run_id"], unique=False)

    op.create_table(
        "releases",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("dataset_id", sa.String(length=64), nullable=False),
        sa.Column("mechanism", sa.String(length=32), nullable=False),
        sa.Column("sensitivity", sa.Float(), nullable=False),
        sa.Column("noise_scale", sa.Float(), nullable=True),
        sa.Column("epsilon", sa.Float(), nullable=False),
        sa.Column("delta", sa.Float(), nullable=True),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("ledger_seq", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("releases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_releases_dataset_id"), ["dataset_id"], unique=False)

    op.create_table(
        "runs",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("dataset_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("sampling", sa.String(length=16), nullable=False),
        sa.Column("sample_rate", sa.Float(), nullable=False),
        sa.Column("steps_per_epoch", sa.Integer(), nullable=False),
        sa.Column("epochs", sa.Integer(), nullable=False),
        sa.Column("epochs_charged", sa.Integer(), nullable=False),
        sa.Column("noise_multiplier", sa.Float(), nullable=False),
        sa.Column("max_grad_norm", sa.Float(), nullable=True),
        sa.Column("target_epsilon", sa.Float(), nullable=True),
        sa.Column("epsilon", sa.Float(), nullable=False),
        sa.Column("epsilon_per_epoch", sa.Float(), nullable=False),
        sa.Column("epoch_units", sa.Text(), nullable=False),
        sa.Column("lease_seconds", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("sampling IN ('poisson', 'shuffle')", name="ck_runs_sampling"),
        sa.CheckConstraint(
            "status IN ('active', 'completed', 'aborted', 'expired')", name="ck_runs_status"
        ),
        sa.CheckConstraint("epochs_charged >= 0", name="ck_runs_charged"),
        sa.CheckConstraint("noise_multiplier > 0", name="ck_runs_sigma"),
        sa.CheckConstraint("sample_rate > 0 AND sample_rate <= 1", name="ck_runs_sample_rate"),
        sa.CheckConstraint("steps_per_epoch >= 1 AND epochs >= 1", name="ck_runs_plan"),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_runs_dataset_status_expiry", ["dataset_id", "status", "expires_at"], unique=False
        )

    _append_only_triggers()


_PG_FUNCTION = """
CREATE FUNCTION ledger_entries_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'ledger entries are append-only';
END;
$$ LANGUAGE plpgsql
"""


def _append_only_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_FUNCTION)
        op.execute(
            "CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries "
            "FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only()"
        )
    else:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER ledger_entries_no_{action.lower()} BEFORE {action} "
                "ON ledger_entries BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS ledger_entries_append_only ON ledger_entries")
        op.execute("DROP FUNCTION IF EXISTS ledger_entries_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS ledger_entries_no_update")
        op.execute("DROP TRIGGER IF EXISTS ledger_entries_no_delete")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index("ix_runs_dataset_status_expiry")

    op.drop_table("runs")
    with op.batch_alter_table("releases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_releases_dataset_id"))

    op.drop_table("releases")
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_index("ix_ledger_run")

    op.drop_table("ledger_entries")
    op.drop_table("idempotency_records")
    op.drop_table("datasets")
    op.drop_table("api_keys")
