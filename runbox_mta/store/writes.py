"""The write steps several parts of the store share, each run inside a committer job.

UID/MODSEQ allocation under the mailbox row lock (`next_modseq`), message
and mailbox inserts, the queue insert and parsing at delivery live here so
that api.py and the store mixins (mailstore.py for IMAP, queue.py, ...) call
one implementation instead of reaching into each other's private helpers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, bindparam, case, insert, update
from sqlalchemy.ext.asyncio import AsyncConnection

from runbox_mta.errors import NotFound
from runbox_mta.store import models as m
from runbox_mta.store.blobs import Metadata, parse_metadata
from runbox_mta.store.changes import ChangeEvent, ChangeKind
from runbox_mta.store.flags import encode_flags
from runbox_mta.store.names import domain_of

SPECIAL_USES = ("\\Drafts", "\\Sent", "\\Trash", "\\Junk", "\\Archive")  # RFC 6154 §2
# Messages larger than this are parsed in a thread (see parse_message).
INLINE_PARSE_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Appended:
    mailbox_id: int
    uid: int
    modseq: int
    uidvalidity: int


def no_mailbox(mailbox_id: int) -> str:
    return f"no such mailbox id: {mailbox_id}"


async def parse_message(data: bytes) -> Metadata:
    # Parsing a big message takes long enough to stall other connections.
    if len(data) > INLINE_PARSE_LIMIT:
        return await asyncio.to_thread(parse_metadata, data)
    return parse_metadata(data)



def queued_metadata(data: bytes) -> Metadata:
    """The metadata of a queued copy: it is only ever sent on, never shown to an IMAP
    client, so the MIME structure (a good part of delivery's CPU) is not computed."""
    return Metadata({"size": len(data)})


@dataclass(frozen=True)
class NewCopy:
    """What every mailbox's copy of one stored message gets."""

    size: int
    system_flags: int
    keywords: str
    internal_date: datetime
    offset_minutes: int


def new_copy(data: bytes, flags: Iterable[str], internal_date: datetime | None) -> NewCopy:
    system_flags, keywords = encode_flags(flags)
    when = internal_date or datetime.now(UTC)
    offset = when.utcoffset()
    if offset is None:
        raise ValueError("internal_date must be timezone-aware")
    return NewCopy(len(data), system_flags, keywords, when, int(offset.total_seconds() // 60))



# Built once (as _NEXT_MODSEQ below): every delivery runs them, and building a
# statement costs more CPU than the database takes to run it.
_INSERT_MESSAGE = insert(m.Message)


async def insert_messages(conn: AsyncConnection, events: list[ChangeEvent], blob_id: int,
                           mailbox_ids: Sequence[int], copy: NewCopy) -> list[Appended]:
    """One message row per mailbox, all on `blob_id`; results in the order of `mailbox_ids`."""
    appended: list[Appended | None] = [None] * len(mailbox_ids)
    # Lock mailbox rows in id order, so two deliveries cannot deadlock each other.
    for index in sorted(range(len(mailbox_ids)), key=mailbox_ids.__getitem__):
        mailbox_id = mailbox_ids[index]
        mailbox = await next_modseq(conn, mailbox_id, new_uids=1)
        uid = mailbox.uidnext - 1
        await conn.execute(_INSERT_MESSAGE, {
            "mailbox_id": mailbox_id, "uid": uid, "modseq": mailbox.highestmodseq, "blob_id": blob_id,
            "system_flags": copy.system_flags, "keywords": copy.keywords, "internal_date": copy.internal_date,
            "internal_date_offset": copy.offset_minutes, "size": copy.size,
        })
        events.append(ChangeEvent(mailbox.account_id, mailbox_id, uid, mailbox.highestmodseq,
                                  ChangeKind.APPEND))
        appended[index] = Appended(mailbox_id, uid, mailbox.highestmodseq, mailbox.uidvalidity)
    return [entry for entry in appended if entry is not None]



# Built once: every submitted message runs them (building one costs more than running it).
_INSERT_QUEUE_MESSAGE = insert(m.QueueMessage).returning(m.QueueMessage.id)
_INSERT_QUEUE_RECIPIENT = insert(m.QueueRecipient)


async def insert_queue_entry(conn: AsyncConnection, blob_id: int, sender: str, addresses: Sequence[str]) -> int:
    queue_id = (await conn.execute(_INSERT_QUEUE_MESSAGE, {"blob_id": blob_id, "sender": sender})).scalar_one()
    await conn.execute(_INSERT_QUEUE_RECIPIENT, [
        {"queue_message_id": queue_id, "recipient": address, "domain": domain_of(address)}
        for address in addresses
    ])
    return queue_id


async def insert_mailbox(conn: AsyncConnection, account_id: int, name: str,
                          special_use: str | None) -> Row[Any]:
    # RFC 9051 §2.3.1.1: a mailbox re-created under an old name needs a larger
    # UIDVALIDITY, so it comes from a per-account high-water mark that also
    # moves with the clock.
    now = int(time.time())
    uidvalidity = (await conn.execute(
        update(m.Account).where(m.Account.id == account_id)
        .values(last_uidvalidity=case((m.Account.last_uidvalidity >= now, m.Account.last_uidvalidity + 1),
                                      else_=now))
        .returning(m.Account.last_uidvalidity)
    )).scalar_one_or_none()
    if uidvalidity is None:
        raise NotFound(f"no such account id: {account_id}")
    return (await conn.execute(
        insert(m.Mailbox).values(account_id=account_id, name=name, uidvalidity=uidvalidity,
                                 special_use=special_use).returning(*m.Mailbox.__table__.columns)
    )).one()



_NEXT_MODSEQ = (
    update(m.Mailbox).where(m.Mailbox.id == bindparam("target_mailbox"))
    .values(uidnext=m.Mailbox.uidnext + bindparam("new_uids"), highestmodseq=m.Mailbox.highestmodseq + 1)
    .returning(m.Mailbox.account_id, m.Mailbox.uidvalidity, m.Mailbox.uidnext, m.Mailbox.highestmodseq)
)


async def next_modseq(conn: AsyncConnection, mailbox_id: int, *, new_uids: int) -> Row[Any]:
    """Take the next MODSEQ (and `new_uids` UIDs) of a mailbox in the caller's transaction.

    The UPDATE row-locks the mailbox, which orders concurrent writers (other
    daemons on PostgreSQL too) and makes UIDs and MODSEQs gap-free: a rolled
    back job gives its numbers back. Returns the values after the update.
    """
    row = (await conn.execute(_NEXT_MODSEQ, {"target_mailbox": mailbox_id, "new_uids": new_uids})).one_or_none()
    if row is None:
        raise NotFound(no_mailbox(mailbox_id))
    return row
