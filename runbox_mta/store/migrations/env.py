"""Alembic environment: runs revisions on the connection db.py hands over.

Migrations run only through `runbox_mta.store.db.upgrade_schema` (behind
`runbox-mta db upgrade`), which opens the async engine, begins a transaction
and calls Alembic inside `AsyncConnection.run_sync`; this file receives that
synchronous connection in `config.attributes["connection"]`. A revision thus
commits as a whole or not at all, on PostgreSQL and SQLite alike.

To write a new revision, compare a database migrated to head with
`models.Base.metadata` (`alembic.autogenerate.compare_metadata`), then spell
the DDL out in `versions/NNNN_name.py` as 0001 does.
"""

from alembic import context

from runbox_mta.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `runbox-mta db upgrade` (runbox_mta.store.db.upgrade_schema)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things in place: later revisions use batch mode.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
