"""job sampler: which sampler a job's nodes had to use (the protocol's since it fixed
one; NULL for jobs created before, which are judged without the exact sampler check)"""

# Revision ID: 0008_job_sampler
# Revises: 0007_job_request
# Create Date: 2026-12-03

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0008_job_sampler"
down_revision: str | None = "0007_job_request"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("sampler", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("sampler")
