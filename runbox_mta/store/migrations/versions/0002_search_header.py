"""Blobs keep the header in the form SEARCH matches (imap.search_text), so a
SEARCH by header field no longer parses every message. Existing blobs keep
NULL and are searched from their bytes, as before.

On SQLite the blobs table is also rebuilt with the message bytes as its last
column: SQLite reads a row's columns in order, and a column stored after a
4 KB message is reached only through its overflow pages, so every ENVELOPE
(blobs.parsed) and every header SEARCH read the whole message from disk.
The rebuild copies every blob once (it needs that much free space); the
references to blobs stay valid, which db.check_references confirms before
COMMIT (migrations run with SQLite's foreign keys off). PostgreSQL keeps large values out of line anyway: there the column
is only added.

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

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.add_column("blobs", sa.Column("search_header", sa.Text))
        return
    op.create_table(
        "blobs_rebuilt",
        sa.Column("id", Id),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("parsed", sa.JSON),
        sa.Column("search_header", sa.Text),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_blobs"),
    )
    op.execute("INSERT INTO blobs_rebuilt (id, size, parsed, data) SELECT id, size, parsed, data FROM blobs")
    op.drop_table("blobs")
    op.rename_table("blobs_rebuilt", "blobs")


def downgrade() -> None:
    op.drop_column("blobs", "search_header")
