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

from sqlalchemy import BigInteger, cast, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from runbox_mta.errors import RunboxError
from runbox_mta.store import models as m
from runbox_mta.store.names import INBOX, domain_of, normalise_address

log = logging.getLogger(__name__)

RECIPIENT_DELIMITER = "+"
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


def without_tag(address: str) -> str:
    """``user+tag@domain`` -> ``user@domain``; other addresses unchanged."""
    local, _, domain = address.rpartition("@")
    user, delimiter, _ = local.partition(RECIPIENT_DELIMITER)
    return f"{user}@{domain}" if delimiter and user else address


async def resolve(conn: AsyncConnection, address: str) -> Resolution:
    """Resolve one recipient address; RunboxError if it is not an address."""
    address = normalise_address(address)
    if not await _hosted(conn, domain_of(address)):
        return Resolution(address, hosted=False, remote=(address,))
    walk = _Walk(conn)
    await walk.expand(address, depth=0)
    return Resolution(address, hosted=True, local=tuple(walk.local.values()), remote=tuple(walk.remote))


@dataclass
class _Walk:
    """One resolution's state: what was found, and what was visited (loop protection)."""

    conn: AsyncConnection
    local: dict[int, LocalRecipient] = field(default_factory=dict)
    remote: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    async def expand(self, address: str, depth: int) -> None:
        if address in self.seen:
            return
        if depth > MAX_ALIAS_DEPTH:
            log.warning("alias chain longer than %d: stopped expanding", MAX_ALIAS_DEPTH)
            return
        self.seen.add(address)
        domain = domain_of(address)
        if not await _hosted(self.conn, domain):
            if address not in self.remote:
                self.remote.append(address)
            return
        for candidate in dict.fromkeys((address, without_tag(address))):
            if await self._expand_exact(candidate, depth):
                return
        await self._expand_targets(f"@{domain}", await _alias_targets(self.conn, f"@{domain}"), depth)

    async def _expand_exact(self, address: str, depth: int) -> bool:
        """Aliases of `address`, else its account; False when neither exists."""
        targets = await _alias_targets(self.conn, address)
        if targets:
            await self._expand_targets(address, targets, depth)
            return True
        return await self._add_account(address)

    async def _expand_targets(self, source: str, targets: list[str], depth: int) -> None:
        for target in targets:
            if target == source:
                await self._add_account(target)  # "keep a copy": the alias names its own account
            else:
                await self.expand(target, depth + 1)

    async def _add_account(self, address: str) -> bool:
        """Add the account at `address` if it can receive; whether any account, even disabled, has it."""
        account = (await self.conn.execute(
            select(m.Account.id, m.Account.disabled, m.Account.quota_bytes).where(m.Account.address == address)
        )).one_or_none()
        if account is None:
            return False
        if not account.disabled:
            recipient = await _local_recipient(self.conn, account.id, address, account.quota_bytes)
            if recipient is not None:
                self.local.setdefault(recipient.account_id, recipient)
        return True


async def sender_addresses(conn: AsyncConnection, account_address: str) -> frozenset[str]:
    """The account's address and the exact aliases that deliver to it (not catch-alls)."""
    rows = await conn.scalars(
        select(m.Alias.source).where(m.Alias.target == account_address, ~m.Alias.source.startswith("@"))
    )
    return frozenset({account_address, *rows})


async def check_quota(conn: AsyncConnection, mailbox_ids: Iterable[int], size: int) -> None:
    """Raise QuotaExceeded if storing `size` bytes in each mailbox overflows an account's quota."""
    wanted = list(mailbox_ids)
    rows = await conn.execute(select(m.Mailbox.id, m.Mailbox.account_id).where(m.Mailbox.id.in_(set(wanted))))
    owners = {mailbox_id: account_id for mailbox_id, account_id in rows}
    copies = Counter(owners[mailbox_id] for mailbox_id in wanted if mailbox_id in owners)
    limited = (await conn.execute(
        select(m.Account.id, m.Account.address, m.Account.quota_bytes)
        .where(m.Account.id.in_(copies), m.Account.quota_bytes.is_not(None))
    )).all()
    used = await _used_bytes(conn, [row.id for row in limited])
    over = [row.address for row in limited if used.get(row.id, 0) + size * copies[row.id] > row.quota_bytes]
    if over:
        raise QuotaExceeded(over)


async def _hosted(conn: AsyncConnection, domain: str) -> bool:
    return await conn.scalar(select(m.Domain.id).where(m.Domain.name == domain)) is not None


async def _alias_targets(conn: AsyncConnection, source: str) -> list[str]:
    rows = await conn.scalars(select(m.Alias.target).where(m.Alias.source == source).order_by(m.Alias.target))
    return list(rows)


async def _local_recipient(conn: AsyncConnection, account_id: int, address: str,
                           quota_bytes: int | None) -> LocalRecipient | None:
    mailboxes = (await conn.execute(
        select(m.Mailbox.id, m.Mailbox.name, m.Mailbox.special_use).where(m.Mailbox.account_id == account_id)
    )).all()
    inbox = next((row.id for row in mailboxes if row.name == INBOX), None)
    if inbox is None:
        return None  # INBOX cannot be deleted (RFC 9051 §6.3.4); without one, nothing to deliver to
    junk = next((row.id for row in mailboxes if row.special_use == "\\Junk"), None)
    # Summing an account's message sizes costs a scan of its messages: only when a quota needs it.
    used = 0 if quota_bytes is None else (await _used_bytes(conn, [account_id])).get(account_id, 0)
    return LocalRecipient(account_id, address, inbox, junk, quota_bytes, used)


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
