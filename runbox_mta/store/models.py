"""The schema, as SQLAlchemy declarative models.

Only store/ imports this module. Attribute names equal column names, so Core
rows (which the store reads) and ORM attributes use the same spelling.
Migrations do not import it: each revision spells out its own DDL, and a test
compares the migrated database with these models.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON, BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, LargeBinary, MetaData, String,
    Text, TypeDecorator, UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# 64-bit ids on PostgreSQL; on SQLite only "INTEGER PRIMARY KEY" is the
# auto-incrementing rowid, and SQLite integers are 64-bit anyway.
Id = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on both backends (SQLite would hand back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("datetimes stored must be timezone-aware")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


# Deterministic constraint names, so later migrations can name what they alter
# (SQLite batch migrations need them to rebuild a table).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Domain(Base):
    __tablename__ = "domains"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(253), unique=True)  # lowercase, no trailing dot
    dkim_selector: Mapped[str] = mapped_column(String(63))
    dkim_private_key: Mapped[str] = mapped_column(Text)  # PEM
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    # RESTRICT: a domain is removed only once it has no accounts.
    domain_id: Mapped[int] = mapped_column(Id, ForeignKey("domains.id"), index=True)
    address: Mapped[str] = mapped_column(String(320), unique=True)  # lowercase
    password_hash: Mapped[str] = mapped_column(Text)
    app_passwords_only: Mapped[bool] = mapped_column(Boolean, default=False)
    no_backup: Mapped[bool] = mapped_column(Boolean, default=False)
    quota_bytes: Mapped[int | None] = mapped_column(BigInteger)  # NULL: unlimited
    # Disabled (`user remove` without --purge): no login, no delivery, and the
    # address stays reserved so nobody else receives the former user's mail.
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    # Last UIDVALIDITY handed out to any of this account's mailboxes, so a
    # mailbox deleted and re-created gets a strictly larger one (RFC 9051 §2.3.1.1).
    last_uidvalidity: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Alias(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("source", "target"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    domain_id: Mapped[int] = mapped_column(Id, ForeignKey("domains.id", ondelete="CASCADE"), index=True)
    source: Mapped[str] = mapped_column(String(320))  # "sales@example.com" or "@example.com" (catch-all)
    target: Mapped[str] = mapped_column(String(320), index=True)  # any address, local or remote


class AppPassword(Base):
    __tablename__ = "app_passwords"
    __table_args__ = (UniqueConstraint("account_id", "label"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    account_id: Mapped[int] = mapped_column(Id, ForeignKey("accounts.id", ondelete="CASCADE"))
    label: Mapped[str] = mapped_column(String(100))
    scopes: Mapped[str] = mapped_column(String(100))  # comma separated: "imap,pop3,smtp"
    password_hash: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Mailbox(Base):
    __tablename__ = "mailboxes"
    __table_args__ = (UniqueConstraint("account_id", "name"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    account_id: Mapped[int] = mapped_column(Id, ForeignKey("accounts.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(1000))  # UTF-8, "/" delimiter, "INBOX" canonical
    # UIDs, UIDVALIDITY and MODSEQs are unsigned 32-bit and 63-bit numbers
    # (RFC 9051 §2.3.1.1, RFC 7162 §3.1.1): too large for a signed INTEGER.
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    uidnext: Mapped[int] = mapped_column(BigInteger, default=1)
    highestmodseq: Mapped[int] = mapped_column(BigInteger, default=1)
    special_use: Mapped[str | None] = mapped_column(String(20))  # RFC 6154: \Drafts \Sent ...
    subscribed: Mapped[bool] = mapped_column(Boolean, default=True)


class Blob(Base):
    """Message bytes, shared by every message (and queue entry) of one delivery."""

    __tablename__ = "blobs"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    # Parsed once at delivery: sizes, and the MIME structure behind ENVELOPE and BODYSTRUCTURE.
    parsed: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # imap.search_text's form of the header, for SEARCH; NULL for queue copies and older blobs.
    search_header: Mapped[str | None] = mapped_column(Text)
    # Last: SQLite reads the columns after a large value through its overflow pages.
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("mailbox_id", "uid"),
        Index(None, "mailbox_id", "modseq"),  # CONDSTORE CHANGEDSINCE (RFC 7162 §3.1.4)
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(Id, ForeignKey("mailboxes.id", ondelete="CASCADE"))
    uid: Mapped[int] = mapped_column(BigInteger)
    modseq: Mapped[int] = mapped_column(BigInteger)
    # No cascade: a blob is deleted by the store once nothing refers to it.
    blob_id: Mapped[int] = mapped_column(Id, ForeignKey("blobs.id"), index=True)
    system_flags: Mapped[int] = mapped_column(Integer, default=0)  # bitmask, see flags.SYSTEM_FLAGS
    keywords: Mapped[str] = mapped_column(Text, default="")  # space separated
    internal_date: Mapped[datetime] = mapped_column(UtcDateTime)
    internal_date_offset: Mapped[int] = mapped_column(Integer, default=0)  # minutes east of UTC
    size: Mapped[int] = mapped_column(BigInteger)


class Expunged(Base):
    """Tombstones for QRESYNC VANISHED (RFC 7162 §3.2.10): numbers only, no content."""

    __tablename__ = "expunged"
    __table_args__ = (Index(None, "mailbox_id", "modseq"),)

    mailbox_id: Mapped[int] = mapped_column(
        Id, ForeignKey("mailboxes.id", ondelete="CASCADE"), primary_key=True
    )
    uid: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    modseq: Mapped[int] = mapped_column(BigInteger)


class QueueMessage(Base):
    __tablename__ = "queue_messages"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    blob_id: Mapped[int] = mapped_column(Id, ForeignKey("blobs.id"), index=True)
    sender: Mapped[str] = mapped_column(String(320), index=True)  # "" for bounces
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class QueueRecipient(Base):
    __tablename__ = "queue_recipients"
    __table_args__ = (Index(None, "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    queue_message_id: Mapped[int] = mapped_column(
        Id, ForeignKey("queue_messages.id", ondelete="CASCADE"), index=True
    )
    recipient: Mapped[str] = mapped_column(String(320))
    domain: Mapped[str] = mapped_column(String(253))  # groups deliveries per destination
    status: Mapped[str] = mapped_column(String(20), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    tls_outcome: Mapped[str | None] = mapped_column(String(200))
    # A worker leases a recipient so two daemons never deliver it twice.
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
