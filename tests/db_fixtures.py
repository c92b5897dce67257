"""Database fixtures: every store-backed test runs on SQLite and on PostgreSQL.

- `database_backend` (session): "sqlite" always; "postgresql" when
  RUNBOX_TEST_DATABASE_URL names a server (any database on it; the user must
  be allowed to CREATE DATABASE), otherwise those params are skipped.
- `database_url`: a fresh, migrated, empty database for one test.
- `blank_database_url`: a fresh database without any schema.
- `store`: an open Store on `database_url`, closed after the test.

Migrating once per session and cloning per test keeps this fast: SQLite
copies a migrated template file, PostgreSQL runs CREATE DATABASE ... TEMPLATE.
Database names carry a random run id, so concurrent CI runs sharing one
server cannot collide.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from runbox_mta.store import Account, Mailbox, Store, open_store, upgrade_schema

DATABASE_URL_ENV = "RUNBOX_TEST_DATABASE_URL"
SQLITE_FILENAME = "runbox.sqlite3"


class Backend(Protocol):
    async def create(self, directory: Path, *, migrated: bool) -> str: ...
    async def drop(self, url: str) -> None: ...


class SqliteBackend:
    def __init__(self, root: Path) -> None:
        self.template = root / SQLITE_FILENAME

    async def prepare(self) -> None:
        # Closing the engine checkpoints and removes the WAL: the file is complete.
        await upgrade_schema(_sqlite_url(self.template))

    async def finish(self) -> None:
        """Nothing to do: pytest removes its temporary directories."""

    async def create(self, directory: Path, *, migrated: bool) -> str:
        path = directory / SQLITE_FILENAME
        if migrated:
            shutil.copyfile(self.template, path)
        return _sqlite_url(path)

    async def drop(self, url: str) -> None:
        """The file lives in the test's tmp_path."""


class PostgresBackend:
    def __init__(self, server_url: str) -> None:
        self.server = make_url(server_url)
        self.run_id = uuid.uuid4().hex[:10]
        self.template = f"runbox_tmpl_{self.run_id}"
        self._numbers = itertools.count(1)

    def url(self, database: str) -> str:
        return self.server.set(database=database).render_as_string(hide_password=False)

    async def _admin(self, sql: str) -> None:
        # CREATE/DROP DATABASE cannot run in a transaction block: plain asyncpg, autocommit.
        dsn = self.server.set(drivername="postgresql").render_as_string(hide_password=False)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def prepare(self) -> None:
        await self._admin(f'CREATE DATABASE "{self.template}"')
        await upgrade_schema(self.url(self.template))

    async def finish(self) -> None:
        await self._admin(f'DROP DATABASE IF EXISTS "{self.template}" WITH (FORCE)')

    async def create(self, directory: Path, *, migrated: bool) -> str:
        name = f"runbox_test_{self.run_id}_{next(self._numbers)}"
        template = self.template if migrated else "template0"
        await self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.url(name)

    async def drop(self, url: str) -> None:
        await self._admin(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')


def _sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def _run_in_thread(coroutine: Coroutine[Any, Any, None]) -> None:
    # Session set-up runs outside the tests' event loops; a private loop in a
    # thread leaves pytest-asyncio's loop handling untouched.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coroutine).result()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_backend(request: pytest.FixtureRequest,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    backend: SqliteBackend | PostgresBackend
    if request.param == "postgresql":
        server_url = os.environ.get(DATABASE_URL_ENV)
        if not server_url:
            pytest.skip(f"PostgreSQL tests need {DATABASE_URL_ENV}, "
                        "e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test")
        backend = PostgresBackend(server_url)
    else:
        backend = SqliteBackend(tmp_path_factory.mktemp("sqlite-template"))
    _run_in_thread(backend.prepare())
    yield backend
    _run_in_thread(backend.finish())


@pytest.fixture
async def database_url(database_backend: Backend, tmp_path: Path) -> AsyncIterator[str]:
    url = await database_backend.create(tmp_path, migrated=True)
    yield url
    await database_backend.drop(url)


@pytest.fixture
async def blank_database_url(database_backend: Backend, tmp_path: Path) -> AsyncIterator[str]:
    url = await database_backend.create(tmp_path, migrated=False)
    yield url
    await database_backend.drop(url)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = await open_store(database_url)
    yield opened
    await opened.close()


@pytest.fixture
async def alice(store: Store) -> Account:
    """example.test hosted, with alice@example.test (a placeholder hash: no login here)."""
    await store.add_domain("example.test", "sel1", "PEM")
    return await store.add_account("alice@example.test", "hash-a")


@pytest.fixture
async def inbox(store: Store, alice: Account) -> Mailbox:
    return await store.get_mailbox(alice.id, "INBOX")
