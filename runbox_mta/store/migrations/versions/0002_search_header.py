"""Blobs keep the header in the form SEARCH matches (imap.search_text), so a
SEARCH by header field no longer parses every message. Existing blobs keep
NULL and are searched from their bytes, as before.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("blobs") as batch:
        batch.add_column(sa.Column("search_header", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("blobs") as batch:
        batch.drop_column("search_header")
