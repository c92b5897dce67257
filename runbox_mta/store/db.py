"""Engines, connection settings and schema migrations.

SQLite (the default) gets the settings that make "250 means stored" true and
deletion real; PostgreSQL goes through asyncpg. The schema is owned by the
Alembic revisions in migrations/: `upgrade_schema` applies them, and a store
opened for serving refuses a schema that is not exactly at head.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import orjson
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from runbox_mta.errors import RunboxError, SchemaOutOfDate

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
UPGRADE_HINT = "run `runbox-mta db upgrade`"

# Another process (the CLI while the daemon runs, a second daemon) may hold
# SQLite's write lock; wait this long for it before failing.
SQLITE_BUSY_TIMEOUT_MS = 5000
SQLITE_PRAGMAS = (
    f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}",
    "PRAGMA journal_mode = WAL",  # readers never block the writer, nor it them
    # FULL fsyncs the WAL at every commit; NORMAL may lose the last commits on
    # power loss, which breaks "250 means stored" (SPEC §5).
    "PRAGMA synchronous = FULL",
    "PRAGMA foreign_keys = ON",
    # Deleted content is overwritten with zeros, so an expunge of a No Backup
    # account really removes the bytes (SPEC §7).
    "PRAGMA secure_delete = ON",
)
# Execution option that marks a connection as the writer (see _begin_sqlite).
WRITE_OPTION = "runbox_write"
# Execution option for reads whose statements need not share a snapshot (see _begin_sqlite).
LOOKUP_OPTION = "runbox_lookup"
# Rows named in one IN (...) list: SQLite before 3.32 allowed 999 bound
# parameters, asyncpg allows 32767; 500 stays clear of both.
MAX_IN_LIST = 500
# One PostgreSQL advisory lock key for migrations: two `db upgrade` at once
# would otherwise race to create the same tables.
MIGRATION_LOCK_KEY = 0x72756E626F78  # "runbox"

# Connections kept open. Fifty SMTP sessions looking up recipients at once
# need a dozen or more; a pool of 5 (SQLAlchemy's default) opened and closed
# one (an aiosqlite thread plus its PRAGMAs) per lookup beyond the fifth.
POOL_SIZE = 50
POOL_OVERFLOW = 50
# SQLite reads run in asyncio's default executor, which has at most min(32, CPUs + 4) threads.
READ_THREADS = 8

T = TypeVar("T")


def create_engine(url: str, *, data_dir: Path | None = None) -> AsyncEngine:
    """An async engine for `url` with the settings the store relies on.

    `data_dir` (the daemon's state directory) and the SQLite file's directory
    are created private (0700) if missing, and a new SQLite file 0600: mail
    must not be readable by other local users.
    """
    if data_dir is not None:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        _prepare_sqlite_file(parsed)
    # hide_parameters: an error's text must never carry message bytes or
    # password hashes into a log (SPEC §7: no mail content in logs, ever).
    # Stored JSON (a message's MIME structure, read for every ENVELOPE and BODYSTRUCTURE) is
    # decoded by orjson, several times faster than the json module; it is written by json.
    engine = create_async_engine(parsed, hide_parameters=True, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW,
                                 json_deserializer=orjson.loads)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", _configure_sqlite)
        event.listen(engine.sync_engine, "begin", _begin_sqlite)
    return engine


def load_driver(url: str) -> None:
    """Import the database driver now, while the daemon may still read everything:
    after dropping root, a lazy import could fail on an unreadable Python installation."""
    make_url(url).get_dialect().import_dbapi()


def writer(engine: AsyncEngine) -> AsyncEngine:
    """The same engine (same pool) marked for writing: on SQLite its transactions BEGIN IMMEDIATE."""
    return engine.execution_options(**{WRITE_OPTION: True})


def thread_writer(engine: AsyncEngine) -> Engine | None:
    """For SQLite, a synchronous engine on the same file whose one connection writes from a
    worker thread (the committer's batches, see InThreadConnection); None for other databases.

    aiosqlite sends every statement to its thread and back (cursor, execute, fetch, close:
    four trips, each a futex and a loop wake-up); a batch run in the thread at once makes
    one trip for all its statements and its COMMIT."""
    sync = _thread_engine(engine, pool_size=1)
    return None if sync is None else sync.execution_options(**{WRITE_OPTION: True})


def thread_reads(engine: AsyncEngine) -> Engine | None:
    """For SQLite, a synchronous engine for reads run whole in a worker thread: one trip for
    all the statements of a read (and its BEGIN and COMMIT) instead of four per statement;
    None for other databases. `lookups` of it runs each statement on its own."""
    return _thread_engine(engine, pool_size=READ_THREADS)


def lookups(engine: Engine) -> Engine:
    """`engine` for lookups made of independent statements (a recipient, a sender's aliases):
    no BEGIN, each statement is its own implicit transaction."""
    return engine.execution_options(**{LOOKUP_OPTION: True})


def _thread_engine(engine: AsyncEngine, pool_size: int) -> Engine | None:
    url = engine.url
    if url.get_backend_name() != "sqlite":
        return None
    sync = sa_create_engine(url.set(drivername="sqlite+pysqlite"), hide_parameters=True, pool_size=pool_size,
                            max_overflow=0, connect_args={"check_same_thread": False},
                            json_deserializer=orjson.loads)
    event.listen(sync, "connect", _configure_sqlite)
    event.listen(sync, "begin", _begin_sqlite)
    return sync


class InThreadConnection:
    """A synchronous connection behind the AsyncConnection methods store jobs use, so a job
    (an async function of its connection) runs to completion in a worker thread: its awaits
    of these methods never suspend, and `run_job` drives it with no event loop."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    @property
    def dialect(self) -> Any:
        return self._conn.dialect

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        return self._conn.execute(statement, parameters)

    async def scalar(self, statement: Any, parameters: Any = None) -> Any:
        return self._conn.scalar(statement, parameters)

    async def scalars(self, statement: Any, parameters: Any = None) -> Any:
        return self._conn.scalars(statement, parameters)

    def begin_nested(self) -> _InThreadSavepoint:
        return _InThreadSavepoint(self._conn)


class _InThreadSavepoint:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def __aenter__(self) -> None:
        self._savepoint = self._conn.begin_nested()

    async def __aexit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        (self._savepoint.rollback if kind is not None else self._savepoint.commit)()


def run_job(coroutine: Coroutine[Any, Any, T]) -> T:
    """Drive a store job over an InThreadConnection to its end, in the calling thread."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coroutine.close()
    raise RuntimeError("a store job awaited something other than its connection")


def _prepare_sqlite_file(url: URL) -> None:
    if url.database in (None, "", ":memory:"):
        # Each pooled connection would get its own empty database.
        raise RunboxError("SQLite in-memory databases are not supported: give a file path")
    path = Path(url.database)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # SQLite creates its -wal and -shm files with the main file's permissions.
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError as error:
        raise RunboxError(f"cannot open database {path}: {error.strerror}") from error


def _configure_sqlite(dbapi_connection: Any, connection_record: Any) -> None:
    # The sqlite3 module's own transaction handling emits BEGIN lazily and
    # breaks SAVEPOINT; turn it off and BEGIN in _begin_sqlite instead.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    for pragma in SQLITE_PRAGMAS:
        cursor.execute(pragma)
    cursor.close()


def _begin_sqlite(connection: Connection) -> None:
    # A deferred transaction that reads and then writes fails at once with
    # SQLITE_BUSY (no busy wait) if another connection committed in between;
    # writers therefore take the write lock up front.
    options = connection.get_execution_options()
    if options.get(LOOKUP_OPTION):
        return
    connection.exec_driver_sql(f"BEGIN {'IMMEDIATE' if options.get(WRITE_OPTION) else 'DEFERRED'}")


@asynccontextmanager
async def connect(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A pooled connection; failing to reach the database is an operator-facing error."""
    conn = engine.connect()
    try:
        await conn.start()
    except (OSError, DBAPIError) as error:
        raise RunboxError(f"cannot open database {describe(engine.url)}: {_reason(error)}") from error
    try:
        yield conn
    finally:
        await conn.close()


def describe(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _reason(error: BaseException) -> str:
    cause = error.orig if isinstance(error, DBAPIError) else error
    return str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__


def in_chunks(values: Sequence[T], size: int = MAX_IN_LIST) -> Iterator[Sequence[T]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]


# --- migrations ------------------------------------------------------------------------


def _alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_alembic_config())


def head_revision() -> str:
    head = _scripts().get_current_head()
    assert head is not None, "migrations/versions holds no revision"
    return head


async def upgrade_schema(url: str) -> None:
    """Create the schema or migrate it to head, in one transaction; a no-op at head."""
    engine = migration_engine(url)
    try:
        async with connect(writer(engine)) as conn, conn.begin():
            if conn.dialect.name == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            await conn.run_sync(_upgrade)
    finally:
        await engine.dispose()


def migration_engine(url: str) -> AsyncEngine:
    """The engine migrations run on. SQLite does not enforce foreign keys during a migration:
    rebuilding a table (create, copy, drop, rename: SQLite's own procedure for what ALTER TABLE
    cannot do) would otherwise fail at the drop. `check_references` runs before COMMIT instead."""
    engine = create_engine(url)
    if engine.url.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", _foreign_keys_off)
    return engine


def _foreign_keys_off(dbapi_connection: Any, connection_record: Any) -> None:
    dbapi_connection.execute("PRAGMA foreign_keys = OFF")


def check_references(connection: Connection) -> None:
    """On SQLite, refuse (and so roll back) a migration that left a reference dangling."""
    if connection.dialect.name == "sqlite":
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise RunboxError(f"the migration would leave {len(broken)} broken references; nothing was changed")


def _upgrade(connection: Connection) -> None:
    config = _alembic_config()
    config.attributes["connection"] = connection  # env.py runs on this connection
    command.upgrade(config, "head")
    check_references(connection)


async def schema_status(url: str) -> tuple[str | None, str]:
    """(revision the database is at or None if it has no schema, revision this code needs)."""
    engine = create_engine(url)
    try:
        return await current_revision(engine), head_revision()
    finally:
        await engine.dispose()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with connect(engine) as conn:
        return await conn.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())


async def require_current_schema(engine: AsyncEngine) -> None:
    """Raise SchemaOutOfDate unless the database is exactly at head."""
    current, head = await current_revision(engine), head_revision()
    if current == head:
        return
    where = describe(engine.url)
    if current is None:
        raise SchemaOutOfDate(f"database {where} has no runbox-mta schema yet: {UPGRADE_HINT}")
    if _is_known(current):
        raise SchemaOutOfDate(f"database schema is at {current}, this version needs {head}: {UPGRADE_HINT}")
    raise SchemaOutOfDate(
        f"database schema is at {current}, which this version of runbox-mta does not know "
        f"(it needs {head}): was the database upgraded by a newer version?"
    )


def _is_known(revision: str) -> bool:
    return any(script.revision == revision for script in _scripts().walk_revisions())


# --- scrubbing ---------------------------------------------------------------------------


async def scrub_freed_pages(engine: AsyncEngine) -> None:
    """Make deleted content unrecoverable from the database files, as far as the backend allows.

    With secure_delete, SQLite zeroes deleted content in the database pages,
    but the WAL still holds the pages as they were written until a checkpoint
    copies them back and the log is truncated. PostgreSQL keeps dead tuples
    until VACUUM reuses their space; nothing cheap can be done per delete there.
    """
    if engine.url.get_backend_name() == "sqlite":
        await asyncio.to_thread(_checkpoint_sqlite, engine.url.database)


def _checkpoint_sqlite(path: str) -> None:
    # A separate plain connection: a pooled one would be inside a transaction.
    connection = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    try:
        busy, _, _ = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        connection.close()
    if busy:
        log.warning("WAL checkpoint after a secure delete was blocked by a reader; it will happen later")
