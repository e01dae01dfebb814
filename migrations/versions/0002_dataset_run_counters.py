"""datasets carry their active-run count and a bound on their earliest lease expiry

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

Every admission answers with the dataset's active-run count and first expires
lapsed holds. Both used to be a query over `runs` inside the admission's
transaction; the dataset row, which the admission locks and rewrites anyway,
now carries them:

- `active_runs`: how many of its runs are active (kept exact);
- `lapse_check_at`: no active run's lease ends before this moment (a lower
  bound, NULL when there is no active run). An admission before it knows no
  hold has lapsed without asking `runs`.

Existing rows are filled from `runs`.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("active_runs", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("lapse_check_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_check_constraint("ck_datasets_active_runs", "active_runs >= 0")
    op.execute(
        "UPDATE datasets SET "
        "active_runs = (SELECT count(*) FROM runs "
        "WHERE runs.dataset_id = datasets.id AND runs.status = 'active'), "
        "lapse_check_at = (SELECT min(runs.expires_at) FROM runs "
        "WHERE runs.dataset_id = datasets.id AND runs.status = 'active')"
    )


def downgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_constraint("ck_datasets_active_runs", type_="check")
        batch_op.drop_column("lapse_check_at")
        batch_op.drop_column("active_runs")
