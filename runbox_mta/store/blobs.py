"""Message bytes behind one small interface, and the metadata parsed once at delivery.

Blobs live in the database, written in the same transaction as the message
rows that refer to them: one fsync, atomic, shared by every daemon on
PostgreSQL. All local recipients of one delivery share one blob. Encryption
at rest, deduplication or a file/object-store backend would change only
BlobStore: callers hand it bytes and get bytes back, by id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, exists, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from runbox_mta.errors import NotFound
from runbox_mta.imap.mime import parse_structure
from runbox_mta.imap.search_text import header_end, searchable_header
from runbox_mta.store import models as m
from runbox_mta.store.db import in_chunks

# Key in blobs.parsed: imap.mime.MessageStructure.to_json() of the blob's bytes.
STRUCTURE_KEY = "structure"


@dataclass(frozen=True)
class Metadata:
    """What is stored beside a blob's bytes: `parsed` (blobs.parsed, JSON) and the searchable header."""

    parsed: dict[str, Any]
    search_header: str | None = None


def parse_metadata(data: bytes) -> Metadata:
    """What IMAP needs without reading the message again (RFC 9051 §7.5.2 sizes and line count)."""
    header_size = header_end(data)
    body = data[header_size:]
    body_lines = body.count(b"\n") + (1 if body and not body.endswith(b"\n") else 0)
    # The MIME structure IMAP's ENVELOPE, BODYSTRUCTURE and sections need, parsed once here.
    structure = parse_structure(data).to_json()
    parsed = {"size": len(data), "header_size": header_size, "body_lines": body_lines, STRUCTURE_KEY: structure}
    return Metadata(parsed, searchable_header(data))


# Built once: every delivery runs it.
_INSERT_BLOB = insert(m.Blob).returning(m.Blob.id)


class BlobStore:
    """Blobs stored in the `blobs` table, inside the caller's transaction."""

    async def put(self, conn: AsyncConnection, data: bytes, metadata: Metadata) -> int:
        row = {"size": len(data), "data": data, "parsed": metadata.parsed, "search_header": metadata.search_header}
        return (await conn.execute(_INSERT_BLOB, row)).scalar_one()

    async def get(self, conn: AsyncConnection, blob_id: int) -> bytes:
        data = await conn.scalar(select(m.Blob.data).where(m.Blob.id == blob_id))
        if data is None:
            raise NotFound(f"no such blob: {blob_id}")
        return data

    async def get_many(self, conn: AsyncConnection, blob_ids: Iterable[int]) -> dict[int, bytes]:
        wanted = sorted(set(blob_ids))
        found: dict[int, bytes] = {}
        for chunk in in_chunks(wanted):
            rows = await conn.execute(select(m.Blob.id, m.Blob.data).where(m.Blob.id.in_(chunk)))
            found.update({blob_id: data for blob_id, data in rows})
        missing = set(wanted) - found.keys()
        if missing:
            raise NotFound(f"no such blob: {min(missing)}")
        return found

    async def release(self, conn: AsyncConnection, blob_ids: Iterable[int]) -> None:
        """Delete those of `blob_ids` that no message and no queue entry refers to any more."""
        for chunk in in_chunks(sorted(set(blob_ids))):
            await conn.execute(
                delete(m.Blob).where(
                    m.Blob.id.in_(chunk),
                    ~exists().where(m.Message.blob_id == m.Blob.id),
                    ~exists().where(m.QueueMessage.blob_id == m.Blob.id),
                )
            )
