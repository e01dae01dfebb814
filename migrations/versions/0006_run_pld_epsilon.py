"""runs keep their PLD ε (this run alone, shown beside the RDP ε, never a filter figure)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10

`runs` gains `epsilon_pld` and `epsilon_pld_note` (both nullable). The service computes a
run's PLD ε outside the dataset's lock and stores it once, so a figure once shown never
changes and a read never pays its cost twice (service/domain/run_pld.py). Both NULL means
"not computed yet": every run that exists keeps NULL here and gets its figure on its next
read. No existing column, row or ledger entry changes; the ledger's hashes never covered
runs, so every chain verifies as before.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("epsilon_pld", sa.Float(), nullable=True))
    op.add_column("runs", sa.Column("epsilon_pld_note", sa.Text(), nullable=True))


def downgrade() -> None:
    # Only derived figures are lost: the plan's shape, from which they are computed, stays.
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("epsilon_pld_note")
        batch_op.drop_column("epsilon_pld")
