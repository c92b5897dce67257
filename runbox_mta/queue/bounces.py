"""Sending the DSNs an attempt calls for: bounces for failed recipients, warnings for delayed ones.

A DSN goes where mail for the envelope sender goes: a local sender's INBOX
(through smtp.delivery, like any received mail, with Return-Path: <>), or
back into the queue with the null sender for a remote one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from runbox_mta.queue.attempt import Outbound
from runbox_mta.queue.scheduler import Result, State, retry_until
from runbox_mta.smtp import dsn, headers
from runbox_mta.smtp.address import NULL_REVERSE_PATH
from runbox_mta.smtp.delivery import STORAGE_ERRORS, deliver, plan
from runbox_mta.store import Store
from runbox_mta.store.queue import ClaimedMessage

log = logging.getLogger(__name__)


async def send_reports(store: Store, outbound: Outbound, batch: Sequence[ClaimedMessage],
                       originals: Mapping[int, bytes], results: Sequence[Result], warned: set[int],
                       now: datetime) -> set[int]:
    """Recipient ids whose DSN is durably on its way, or who need none (null sender)."""
    done: set[int] = set()
    for message in batch:
        mine = [result for result in results if result.recipient in message.recipients]
        failed = [result for result in mine if result.state is State.FAILED]
        delayed = [result for result in mine if result.recipient.id in warned]
        if not message.sender:
            done |= _ids(failed + delayed)  # RFC 5321 §4.5.5: a DSN never answers a DSN
            continue
        for action, group in ((dsn.Action.FAILED, failed), (dsn.Action.DELAYED, delayed)):
            if group and await _send(store, outbound, message, originals.get(message.queue_id, b""),
                                     action, group, now):
                done |= _ids(group)
    return done


async def _send(store: Store, outbound: Outbound, message: ClaimedMessage, original: bytes,
                action: dsn.Action, group: Sequence[Result], now: datetime) -> bool:
    """Deliver one DSN; False if it should be tried again later."""
    report = dsn.Report(
        action, outbound.hostname, message.created_at, now,
        tuple(dsn.RecipientReport(result.recipient.address, result.diagnostic, result.remote_mta)
              for result in group),
        retry_until=retry_until(message.created_at, outbound.config) if action is dsn.Action.DELAYED else None,
    )
    data = dsn.build(report, message.sender, original)
    try:
        resolution = await store.resolve_recipient(message.sender)
    except STORAGE_ERRORS:
        log.warning("queue %d: cannot route the %s DSN now", message.queue_id, action.value, exc_info=True)
        return False
    if not resolution.local and not resolution.remote:
        log.info("queue %d: the sender no longer exists here; %s DSN dropped", message.queue_id, action.value)
        return True
    reply = await deliver(store, plan(NULL_REVERSE_PATH, [resolution], data, headers.new_queue_id()))
    if reply.startswith("5"):
        # e.g. the sender's mailbox is full: retrying would only repeat this.
        log.warning("queue %d: %s DSN refused (%s), dropped", message.queue_id, action.value, reply)
        return True
    log.info("queue %d: %s DSN %s", message.queue_id, action.value, "sent" if reply.startswith("2") else "deferred")
    return reply.startswith("2")


def _ids(results: Iterable[Result]) -> set[int]:
    return {result.recipient.id for result in results}
