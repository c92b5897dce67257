"""Who receives mail addressed to an address, and whether their quota has room.

Resolution order for an address at a hosted domain, as Postfix applies
virtual alias maps before mailbox lookup (with `recipient_delimiter = +`):

1. the address itself, then (for ``user+tag@domain``) ``user@domain``:
   aliases of that address win; otherwise an account (a disabled account
   receives nothing, and its address stays reserved: no catch-all for it);
2. the catch-all ``@domain``.

Alias targets resolve the same way, recursively, with loop protection; a
target naming the alias source itself means "this account keeps a copy". A
target at a domain not hosted here is a remote recipient (forwarding). An
address at a domain not hosted here resolves to itself, remote.

Quota is a soft limit checked against the sum of an account's message sizes,
both when a recipient is named (RCPT) and inside the delivery transaction.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import BigInteger, Row, and_, bindparam, cast, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from runbox_mta.errors import RunboxError
from runbox_mta.store import models as m
from runbox_mta.store.names import INBOX, domain_of, normalise_address

log = logging.getLogger(__name__)

RECIPIENT_DELIMITER = "+"
JUNK = "\\Junk"  # RFC 6154 special use: where DMARC p=quarantine mail goes
# Alias chains deeper than this are a misconfiguration (or a loop the visited
# set already breaks); Postfix stops virtual alias expansion at 100 levels,
# sensible chains are 2 or 3 long.
MAX_ALIAS_DEPTH = 20


class QuotaExceeded(RunboxError):
    """Delivering would take these accounts over their quota; nothing was stored."""

    def __init__(self, addresses: Iterable[str]) -> None:
        self.addresses = tuple(sorted(addresses))
        super().__init__(f"over quota: {', '.join(self.addresses)}")


@dataclass(frozen=True)
class LocalRecipient:
    """An account that gets its own copy, and where it goes."""

    account_id: int
    address: str
    inbox_id: int
    junk_id: int | None  # the account's \\Junk mailbox (RFC 6154), if it has one
    quota_bytes: int | None  # None: unlimited
    used_bytes: int  # counted only when there is a quota (0 otherwise)

    def has_room_for(self, size: int) -> bool:
        return self.quota_bytes is None or self.used_bytes + size <= self.quota_bytes


@dataclass(frozen=True)
class Resolution:
    """Where mail for `address` goes: local accounts and remote (forwarding) addresses."""

    address: str  # normalised
    hosted: bool  # the address's domain is hosted here
    local: tuple[LocalRecipient, ...] = ()
    remote: tuple[str, ...] = ()

    @property
    def unknown(self) -> bool:
        """Hosted here, but nobody receives it (RFC 5321 §3.3: reject at RCPT with 550)."""
        return self.hosted and not self.local and not self.remote


def repeatable(resolution: Resolution) -> bool:
    """Whether a resolution may be answered again from memory for a few seconds (store/recent.py):
    it is not "unknown" (so a new account is never refused from memory) and no receiver has a
    quota (its usage changes with every delivery). Addresses elsewhere are repeatable: a
    domain newly hosted is seen within the few seconds."""
    return not resolution.unknown and all(local.quota_bytes is None for local in resolution.local)


def without_tag(address: str) -> str:
    """``user+tag@domain`` -> ``user@domain``; other addresses unchanged."""
    local, _, domain = address.rpartition("@")
    user, delimiter, _ = local.partition(RECIPIENT_DELIMITER)
    return f"{user}@{domain}" if delimiter and user else address


async def resolve(conn: AsyncConnection, address: str) -> Resolution:
    """Resolve one recipient address; RunboxError if it is not an address."""
    address = normalise_address(address)
    walk = _Walk(conn)
    if await walk.facts(address) is None:
        return Resolution(address, hosted=False, remote=(address,))
    await walk.expand(address, depth=0)
    return Resolution(address, hosted=True, local=tuple(walk.local.values()), remote=tuple(walk.remote))


# Everything resolution needs to know about one address, in one round trip
# (RCPT runs it for every recipient; three separate queries cost three times
# the CPU): no row when its domain is not hosted, else one row per (alias
# target x delivery mailbox), NULLs where there is no alias or no account.
# Built once: building a statement costs more CPU than SQLite takes to run it.
_ADDRESS_FACTS = (
    select(m.Alias.target, m.Account.id.label("account_id"), m.Account.disabled, m.Account.quota_bytes,
           m.Mailbox.id.label("mailbox_id"), m.Mailbox.name, m.Mailbox.special_use)
    .select_from(m.Domain)
    .outerjoin(m.Alias, and_(m.Alias.domain_id == m.Domain.id, m.Alias.source == bindparam("address")))
    .outerjoin(m.Account, and_(m.Account.domain_id == m.Domain.id, m.Account.address == bindparam("address")))
    .outerjoin(m.Mailbox, and_(m.Mailbox.account_id == m.Account.id,
                               or_(m.Mailbox.name == INBOX, m.Mailbox.special_use == JUNK)))
    .where(m.Domain.name == bindparam("domain"))
)


@dataclass(frozen=True)
class _Facts:
    """One address at a hosted domain: its alias targets (sorted) and its account's rows, if any."""

    targets: tuple[str, ...]
    account_rows: tuple[Row[Any], ...]


@dataclass
class _Walk:
    """One resolution's state: what was found, and what was visited (loop protection)."""

    conn: AsyncConnection
    local: dict[int, LocalRecipient] = field(default_factory=dict)
    remote: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    _known: dict[str, _Facts | None] = field(default_factory=dict)

    async def facts(self, address: str) -> _Facts | None:
        """What the store knows of `address` (or of a catch-all "@domain"); None if its domain
        is not hosted here."""
        if address not in self._known:
            rows = (await self.conn.execute(_ADDRESS_FACTS, {"address": address,
                                                             "domain": domain_of(address)})).all()
            self._known[address] = None if not rows else _Facts(
                targets=tuple(sorted({row.target for row in rows if row.target is not None})),
                account_rows=tuple(row for row in rows if row.account_id is not None),
            )
        return self._known[address]

    async def expand(self, address: str, depth: int) -> None:
        if address in self.seen:
            return
        if depth > MAX_ALIAS_DEPTH:
            log.warning("alias chain longer than %d: stopped expanding", MAX_ALIAS_DEPTH)
            return
        self.seen.add(address)
        if await self.facts(address) is None:
            if address not in self.remote:
                self.remote.append(address)
            return
        for candidate in dict.fromkeys((address, without_tag(address))):
            if await self._expand_exact(candidate, depth):
                return
        catch_all = f"@{domain_of(address)}"
        facts = await self.facts(catch_all)
        await self._expand_targets(catch_all, facts.targets if facts else (), depth)

    async def _expand_exact(self, address: str, depth: int) -> bool:
        """Aliases of `address`, else its account; False when neither exists."""
        facts = await self.facts(address)
        if facts is not None and facts.targets:
            await self._expand_targets(address, facts.targets, depth)
            return True
        return await self._add_account(address)

    async def _expand_targets(self, source: str, targets: tuple[str, ...], depth: int) -> None:
        for target in targets:
            if target == source:
                await self._add_account(target)  # "keep a copy": the alias names its own account
            else:
                await self.expand(target, depth + 1)

    async def _add_account(self, address: str) -> bool:
        """Add the account at `address` if it can receive; whether any account, even disabled, has it."""
        facts = await self.facts(address)
        if facts is None or not facts.account_rows:
            return False
        if not facts.account_rows[0].disabled:
            recipient = await _local_recipient(self.conn, address, facts.account_rows)
            if recipient is not None:
                self.local.setdefault(recipient.account_id, recipient)
        return True


async def sender_addresses(conn: AsyncConnection, account_address: str) -> frozenset[str]:
    """The account's address and the exact aliases that deliver to it (not catch-alls)."""
    rows = await conn.execute(_SENDER_ALIASES, {"account": account_address})
    return frozenset({account_address, *(source for (source,) in rows)})


# Built once: submission asks at every MAIL FROM.
_SENDER_ALIASES = select(m.Alias.source).where(m.Alias.target == bindparam("account"),
                                               ~m.Alias.source.startswith("@"))


# The accounts with a quota among the owners of some mailboxes; usually none, in one round trip.
_LIMITED_OWNERS = (
    select(m.Mailbox.id.label("mailbox_id"), m.Account.id, m.Account.address, m.Account.quota_bytes)
    .join(m.Account, m.Account.id == m.Mailbox.account_id)
    .where(m.Mailbox.id.in_(bindparam("mailbox_ids", expanding=True)), m.Account.quota_bytes.is_not(None))
)


async def check_quota(conn: AsyncConnection, mailbox_ids: Iterable[int], size: int) -> None:
    """Raise QuotaExceeded if storing `size` bytes in each mailbox overflows an account's quota."""
    wanted = list(mailbox_ids)
    rows = (await conn.execute(_LIMITED_OWNERS, {"mailbox_ids": sorted(set(wanted))})).all()
    if not rows:
        return
    owner_of = {row.mailbox_id: row for row in rows}
    copies = Counter(owner_of[mailbox_id].id for mailbox_id in wanted if mailbox_id in owner_of)
    limited = {row.id: row for row in rows}
    used = await _used_bytes(conn, list(limited))
    over = [row.address for row in limited.values() if used.get(row.id, 0) + size * copies[row.id] > row.quota_bytes]
    if over:
        raise QuotaExceeded(over)


async def _local_recipient(conn: AsyncConnection, address: str,
                           rows: tuple[Row[Any], ...]) -> LocalRecipient | None:
    """The account's delivery facts from its _ADDRESS_FACTS rows."""
    account = rows[0]
    inbox = next((row.mailbox_id for row in rows if row.name == INBOX), None)
    if inbox is None:
        return None  # INBOX cannot be deleted (RFC 9051 §6.3.4); without one, nothing to deliver to
    junk = next((row.mailbox_id for row in rows if row.special_use == JUNK), None)
    # Summing an account's message sizes costs a scan of its messages: only when a quota needs it.
    quota_bytes = account.quota_bytes
    used = 0 if quota_bytes is None else (await _used_bytes(conn, [account.account_id])).get(account.account_id, 0)
    return LocalRecipient(account.account_id, address, inbox, junk, quota_bytes, used)


async def _used_bytes(conn: AsyncConnection, account_ids: list[int]) -> dict[int, int]:
    if not account_ids:
        return {}
    # SUM of BIGINT is NUMERIC on PostgreSQL: cast back to an integer.
    rows = await conn.execute(
        select(m.Mailbox.account_id, cast(func.sum(m.Message.size), BigInteger))
        .join(m.Message, m.Message.mailbox_id == m.Mailbox.id)
        .where(m.Mailbox.account_id.in_(account_ids)).group_by(m.Mailbox.account_id)
    )
    return {account_id: used or 0 for account_id, used in rows}
