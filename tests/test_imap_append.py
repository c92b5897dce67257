"""MULTIAPPEND (RFC 3502): several messages in one APPEND are stored all or none,
in one transaction, and APPENDUID names their UIDs as one set (RFC 4315 §3)."""

from __future__ import annotations

import pytest

from tests.test_imap_server import (  # noqa: F401 (fixtures)
    ADDRESS, MESSAGES, Raw, certs, daemon, expect, serve, session, shared_certs, tls_client,
)

pytestmark = pytest.mark.timeout(60)


def literal(data: bytes) -> bytes:
    return b"{%d+}\r\n%s" % (len(data), data)


def message_count(raw: Raw) -> bytes:
    lines = raw.chat(b"STATUS INBOX (MESSAGES)")
    assert lines[-1].startswith(b"a OK")
    return lines[0]


def test_multiappend_is_advertised_and_stores_every_message_with_one_appenduid(daemon, tls_client):
    raw = session(daemon, tls_client)
    expect(raw.chat(b"CAPABILITY"), [r"\* CAPABILITY .* MULTIAPPEND( .*)?", r"a OK CAPABILITY completed\."])
    command = (b"APPEND INBOX (\\Seen) " + literal(MESSAGES[0]) + b' (\\Flagged) "02-Jan-2024 10:00:00 +0100" '
               + literal(MESSAGES[1]))
    expect(raw.chat(command), [r"a OK \[APPENDUID \d+ 4:5\] APPEND completed\."])
    raw.chat(b"SELECT INBOX")
    expect(raw.chat(b"UID FETCH 4:5 (FLAGS INTERNALDATE)"), [
        r'\* 4 FETCH \(UID 4 FLAGS \(\\Seen\) INTERNALDATE ".*"\)',
        r'\* 5 FETCH \(UID 5 FLAGS \(\\Flagged\) INTERNALDATE "02-Jan-2024 10:00:00 \+0100"\)',
        r"a OK FETCH completed\.",
    ])
    raw.close()


def test_when_the_second_message_fails_neither_is_stored(daemon, tls_client):
    raw = session(daemon, tls_client)
    before = message_count(raw)
    expect(raw.chat(b"APPEND INBOX " + literal(MESSAGES[0]) + b" " + literal(b"")),
           [r"a NO Cannot store an empty message\."])
    used = sum(map(len, MESSAGES))
    daemon.call(daemon.store.update_account(ADDRESS, quota_bytes=used + len(MESSAGES[0]) + 1))
    # The first message fits the quota on its own; with the second the APPEND does not.
    expect(raw.chat(b"APPEND INBOX " + literal(MESSAGES[0]) + b" " + literal(MESSAGES[1])),
           [r"a NO \[OVERQUOTA\] Quota exceeded\."])
    assert message_count(raw) == before
    expect(raw.chat(b"APPEND INBOX " + literal(MESSAGES[0])), [r"a OK \[APPENDUID \d+ 4\] APPEND completed\."])
    raw.close()
