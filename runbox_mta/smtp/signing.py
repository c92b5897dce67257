"""DKIM signing of submitted mail (RFC 6376), with the sending domain's stored key.

Signing hashes the whole body, which for a large message is long enough to
stall every other connection, so it runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging

import dkim

from runbox_mta.smtp import headers

log = logging.getLogger(__name__)

# RFC 6376 §5.4.1: the fields worth signing, signed when present.
SIGNED_FIELDS = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc", "mime-version",
    "content-type", "content-transfer-encoding", "content-id", "content-description",
    "in-reply-to", "references", "list-id", "list-help", "list-unsubscribe", "list-subscribe",
    "list-post", "list-owner", "list-archive",
)
# RFC 6376 §8.15: fields that may appear once (RFC 5322 §3.6) are named once
# more than they occur ("oversigned"), so adding one breaks the signature.
OVERSIGNED_FIELDS = ("from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
                     "in-reply-to", "references")


async def sign(data: bytes, *, domain: str, selector: str, private_key_pem: str) -> bytes:
    """`data` with a DKIM-Signature field on top; unsigned (and logged) if the key is unusable."""
    try:
        signature = await asyncio.to_thread(_signature, data, domain, selector, private_key_pem)
    except dkim.DKIMException as error:
        log.error("cannot DKIM-sign for %s with selector %s: %s", domain, selector, error)
        return data
    return headers.prepend(data, signature)


def _signature(data: bytes, domain: str, selector: str, private_key_pem: str) -> bytes:
    present = {name for name, _, _ in headers.fields(data)}
    include = [name for name in SIGNED_FIELDS if name in present] + list(OVERSIGNED_FIELDS)
    return dkim.sign(data, selector.encode("ascii"), domain.encode("ascii"), private_key_pem.encode("ascii"),
                     canonicalize=(b"relaxed", b"relaxed"), include_headers=[name.encode() for name in include])
