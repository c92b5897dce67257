"""The pure parts of SMTP, table by table: decisions, reply codes, addresses and header fields."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runbox_mta.smtp import codes, headers
from runbox_mta.smtp.address import declared_size, normalised, usable
from runbox_mta.smtp.delivery import plan
from runbox_mta.smtp.policy import (
    DmarcAction, auth_refusal, content_refusal, dmarc_action, postmaster_candidates, recipient_refusal, recipient_syntax_refusal,
    sender_refusal,
)
from runbox_mta.store import LocalRecipient, Resolution

ALICE = LocalRecipient(1, "alice@example.test", inbox_id=10, junk_id=11, quota_bytes=None, used_bytes=0)
FULL = LocalRecipient(2, "full@example.test", inbox_id=20, junk_id=None, quota_bytes=100, used_bytes=100)
NEARLY = LocalRecipient(3, "nearly@example.test", inbox_id=30, junk_id=None, quota_bytes=100, used_bytes=50)
LOCAL = Resolution("alice@example.test", hosted=True, local=(ALICE,))
UNKNOWN = Resolution("nobody@example.test", hosted=True)
FOREIGN = Resolution("x@elsewhere.example", hosted=False, remote=("x@elsewhere.example",))
FORWARD = Resolution("fwd@example.test", hosted=True, remote=("x@elsewhere.example",))


@pytest.mark.parametrize(("facts", "expected"), [
    (dict(offered=False, tls=True, extended=True, authenticated=False, in_transaction=False), codes.AUTH_NOT_ENABLED),
    (dict(offered=True, tls=False, extended=True, authenticated=False, in_transaction=False), codes.TLS_REQUIRED),
    (dict(offered=True, tls=True, extended=False, authenticated=False, in_transaction=False), codes.SEND_EHLO_FIRST),
    (dict(offered=True, tls=True, extended=True, authenticated=True, in_transaction=False), codes.AUTH_ALREADY_DONE),
    (dict(offered=True, tls=True, extended=True, authenticated=False, in_transaction=True),
     codes.AUTH_IN_TRANSACTION),
    (dict(offered=True, tls=True, extended=True, authenticated=False, in_transaction=False), None),
])
def test_auth_refusal(facts: dict[str, bool], expected: str | None) -> None:
    assert auth_refusal(**facts) == expected


OWNED = frozenset({"alice@example.test", "sales@example.test"})


@pytest.mark.parametrize(("address", "smtputf8", "owned", "expected"), [
    ("<>", False, None, None),  # bounces are welcome on the MX
    ("<>", False, OWNED, codes.SENDER_NOT_OWNED),  # but not from a user's client
    ("anyone@example.net", False, None, None),
    ("\"odd local\"@example.net", False, None, None),
    ("no-domain", False, None, codes.BAD_SENDER),
    ("bad\udcff@example.net", True, None, codes.BAD_SENDER),
    ("jøran@example.net", False, None, codes.NON_ASCII_ADDRESS),
    ("jøran@example.net", True, None, None),
    ("Alice@Example.TEST", False, OWNED, None),
    ("alice+lists@example.test", False, OWNED, None),
    ("sales@example.test", False, OWNED, None),
    ("bob@example.test", False, OWNED, codes.SENDER_NOT_OWNED),
    ("alice@example.test.evil.example", False, OWNED, codes.SENDER_NOT_OWNED),
])
def test_sender_refusal(address: str, smtputf8: bool, owned: frozenset[str] | None, expected: str | None) -> None:
    assert sender_refusal(address, smtputf8=smtputf8, owned=owned) == expected


@pytest.mark.parametrize(("address", "smtputf8", "accepted", "expected"), [
    ("alice@example.test", False, 0, None),
    ("alice@example.test", False, 3, codes.TOO_MANY_RECIPIENTS),
    ("not-an-address", False, 0, codes.BAD_RECIPIENT),
    ("nul\x00@example.test", False, 0, codes.BAD_RECIPIENT),
    ("jøran@example.test", False, 0, codes.NON_ASCII_ADDRESS),
    ("jøran@example.test", True, 0, None),
])
def test_recipient_syntax_refusal(address: str, smtputf8: bool, accepted: int, expected: str | None) -> None:
    assert recipient_syntax_refusal(address, smtputf8=smtputf8, accepted=accepted, limit=3) == expected


@pytest.mark.parametrize(("resolution", "may_relay", "size", "expected"), [
    (LOCAL, False, 0, None),
    (UNKNOWN, False, 0, codes.UNKNOWN_USER),
    (UNKNOWN, True, 0, codes.UNKNOWN_USER),
    (FOREIGN, False, 0, codes.RELAY_DENIED),
    (FOREIGN, True, 0, None),
    (FORWARD, False, 0, None),  # our alias forwarding elsewhere is not relaying
    (Resolution("full@example.test", hosted=True, local=(FULL,)), False, 0, codes.MAILBOX_FULL_AT_RCPT),
    (Resolution("nearly@example.test", hosted=True, local=(NEARLY,)), False, 50, None),
    (Resolution("nearly@example.test", hosted=True, local=(NEARLY,)), False, 51, codes.MAILBOX_FULL_AT_RCPT),
    (Resolution("team@example.test", hosted=True, local=(ALICE, FULL)), False, 0, codes.MAILBOX_FULL_AT_RCPT),
])
def test_recipient_refusal(resolution: Resolution, may_relay: bool, size: int, expected: str | None) -> None:
    assert recipient_refusal(resolution, may_relay=may_relay, declared_size=size) == expected


@pytest.mark.parametrize(("address", "hostname", "candidates"), [
    ("Postmaster", "mail.example.test", ("postmaster@mail.example.test", "postmaster@example.test")),
    ("POSTMASTER", "example.test", ("postmaster@example.test",)),
    ("postmaster", "localhost", ("postmaster@localhost",)),
    ("postmaster@example.test", "mail.example.test", ()),
    ("alice", "mail.example.test", ()),
])
def test_postmaster_candidates(address: str, hostname: str, candidates: tuple[str, ...]) -> None:
    assert postmaster_candidates(address, hostname) == candidates


@pytest.mark.parametrize(("data", "refused"), [
    (b"Subject: x\r\n\r\nfine\r\n", False),
    (b"", False),
    (b"Subject: x\r\n\r\nbare\nLF\r\n", True),
    (b"Subject: x\r\n\r\nbare\rCR\r\n", True),
    (b"Subject: x\r\n\r\n\n.\nMAIL FROM:<a@b>\r\n", True),
    (b"Subject: x\r\n\r\n\r\n.\nsmuggled\r\n", True),
    (b"Subject: x\r\n\r\n\r.\r\nsmuggled\r\n", True),
])
def test_content_refusal(data: bytes, refused: bool) -> None:
    assert content_refusal(data) == (codes.BARE_LINE_ENDING if refused else None)


@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"x"]), max_size=12).map(b"".join))
def test_bare_line_endings_are_any_cr_not_before_lf_or_lf_not_after_cr(data: bytes) -> None:
    reference = re.search(rb"\r(?!\n)|(?<!\r)\n", data) is not None
    assert (content_refusal(data) is not None) == reference


@pytest.mark.parametrize(("result", "policy", "action"), [
    ("pass", "reject", DmarcAction.DELIVER),
    ("fail", "reject", DmarcAction.REJECT),
    ("fail", "quarantine", DmarcAction.QUARANTINE),
    ("fail", "none", DmarcAction.DELIVER),
    ("temperror", "reject", DmarcAction.DELIVER),
    ("none", "none", DmarcAction.DELIVER),
])
def test_dmarc_action(result: str, policy: str, action: DmarcAction) -> None:
    assert dmarc_action(result, policy) is action


@pytest.mark.parametrize(("reply", "expected"), [
    ("250 OK", "250 2.0.0 OK"),
    ("503 Error: need MAIL command", codes.NEED_MAIL),
    ("502 EXPN not implemented", codes.EXPN_DISABLED),
    ("552 Error: Too much mail data", codes.TOO_MUCH_DATA),
    ("530 Must issue a STARTTLS command first", codes.TLS_REQUIRED),
    ("220 Ready to start TLS", codes.READY_FOR_TLS),
    ("599 odd", "599 5.0.0 odd"),
    ("250 2.1.5 Recipient OK", codes.RECIPIENT_OK),
    ("354 End data with <CR><LF>.<CR><LF>", codes.START_DATA),
    ("334 ", "334 "),
])
def test_enhanced_codes_are_added_where_missing(reply: str, expected: str) -> None:
    assert codes.with_enhanced_code(reply) == expected


def test_every_named_reply_is_enhanced_or_a_continuation() -> None:
    for name in dir(codes):
        value = getattr(codes, name)
        if name.isupper() and isinstance(value, str) and value[:1] in "245":
            assert codes.with_enhanced_code(value) == value, name


@pytest.mark.parametrize(("address", "expected"), [
    ("Alice@Example.TEST", "alice@example.test"),
    ("alice@bücher.example", "alice@xn--bcher-kva.example"),
    ("no-at-sign", None),
    ("a@b@c.example", None),
    ("x" * 250 + "@example.test", None),
    ("tab\t@example.test", None),
])
def test_normalised(address: str, expected: str | None) -> None:
    assert normalised(address) == expected


@given(st.text(max_size=80))
def test_usable_never_raises_and_implies_encodable(text: str) -> None:
    if usable(text):
        text.encode("utf-8")


@pytest.mark.parametrize(("options", "size"), [
    ([], 0), (["SIZE=1234"], 1234), (["BODY=8BITMIME", "SIZE=10"], 10), (["SIZE"], 0),
])
def test_declared_size(options: list[str], size: int) -> None:
    assert declared_size(options) == size


MESSAGE = (b"From: Alice <alice@example.test>\r\nSubject: hi\r\n  folded\r\n"
           b"Authentication-Results: mail.example.test; spf=pass\r\n"
           b"Authentication-Results: other.example; spf=fail\r\n"
           b"Authentication-Results: (comment) MAIL.example.test;\r\n dkim=pass\r\n"
           b"Authentication-Results: mail.example.test.evil; dkim=pass\r\n"
           b"\r\nbody\r\nFrom: not@a.header\r\n")


def test_header_fields_are_found_with_their_folds_and_only_in_the_header() -> None:
    assert [name for name, _, _ in headers.fields(MESSAGE)] == [
        "from", "subject", "authentication-results", "authentication-results",
        "authentication-results", "authentication-results"]
    assert headers.field_value(MESSAGE, "subject") == "hi  folded"
    assert headers.author_domain(MESSAGE) == "example.test"
    assert headers.author_domain(b"Subject: none\r\n\r\n") is None
    assert headers.field_names(MESSAGE) == {"from", "subject", "authentication-results"}


def test_forged_authentication_results_are_removed() -> None:
    cleaned = headers.without_forged_auth_results(MESSAGE, "mail.example.test")
    assert cleaned == (b"From: Alice <alice@example.test>\r\nSubject: hi\r\n  folded\r\n"
                       b"Authentication-Results: other.example; spf=fail\r\n"
                       b"Authentication-Results: mail.example.test.evil; dkim=pass\r\n"
                       b"\r\nbody\r\nFrom: not@a.header\r\n")


@pytest.mark.parametrize(("data", "expected"), [
    (b"Subject: a\r\n\r\nbody\r\n", b"Subject: a\r\nX: 1\r\n\r\nbody\r\n"),
    (b"Subject: a\r\n", b"Subject: a\r\nX: 1\r\n"),
    (b"\r\nbody\r\n", b"X: 1\r\n\r\nbody\r\n"),
    (b"", b"X: 1\r\n"),
])
def test_append_to_header(data: bytes, expected: bytes) -> None:
    assert headers.append_to_header(data, b"X: 1\r\n") == expected


NOW = datetime(2025, 7, 1, 10, 0, 0, tzinfo=UTC)


def test_received_records_the_client_and_tls() -> None:
    field = headers.received(source=("mx.example.net", "192.0.2.1"), hostname="mail.example.test",
                             protocol="ESMTPS", tls="TLS1.3 TLS_AES_256_GCM_SHA384", queue_id="ABC", now=NOW)
    assert field == (b"Received: from mx.example.net ([192.0.2.1])\r\n"
                     b"\tby mail.example.test (runbox-mta) (using TLS1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n"
                     b"\twith ESMTPS id ABC; Tue, 01 Jul 2025 10:00:00 +0000\r\n")


def test_received_for_submission_withholds_the_client_and_odd_helos_are_unknown() -> None:
    field = headers.received(source=None, hostname="h.example", protocol="ESMTPSA", tls="none",
                             queue_id="Q", now=NOW)
    assert field.startswith(b"Received: from submission\r\n\tby h.example (runbox-mta) (no TLS)\r\n")
    odd = headers.received(source=("evil)\r\nX: y", "2001:db8::1"), hostname="h.example", protocol="SMTP",
                           tls="none", queue_id="Q", now=NOW)
    assert odd.startswith(b"Received: from unknown ([IPv6:2001:db8::1])\r\n")


@pytest.mark.parametrize(("extended", "tls", "authenticated", "keyword"), [
    (False, False, False, "SMTP"), (True, False, False, "ESMTP"), (True, True, False, "ESMTPS"),
    (True, True, True, "ESMTPSA"),
])
def test_protocol_keyword(extended: bool, tls: bool, authenticated: bool, keyword: str) -> None:
    assert headers.protocol_keyword(extended=extended, tls=tls, authenticated=authenticated) == keyword


def test_plan_gives_each_account_one_copy_with_return_path_and_remote_none() -> None:
    twice = Resolution("alice+x@example.test", hosted=True, local=(ALICE,))
    delivery = plan("Sender@Example.NET", [LOCAL, twice, FORWARD, FOREIGN], b"M\r\n", "Q")
    assert delivery.mailbox_ids == (10,)
    assert delivery.local_data == b"Return-Path: <Sender@Example.NET>\r\nM\r\n"
    assert delivery.remote_recipients == ("x@elsewhere.example",) and delivery.remote_data == b"M\r\n"
    assert delivery.sender == "sender@example.net"
    bounce = plan("<>", [LOCAL], b"M\r\n", "Q", quarantine=True)
    assert bounce.mailbox_ids == (11,) and bounce.sender == "" and bounce.remote_data == b""
    assert bounce.local_data.startswith(b"Return-Path: <>\r\n")


def test_plan_has_the_quota_checked_again_only_when_a_recipient_has_one() -> None:
    limited = Resolution("nearly@example.test", hosted=True, local=(NEARLY,))
    assert plan("a@example.net", [LOCAL, limited], b"M\r\n", "Q").quota is True
    assert plan("a@example.net", [LOCAL, FORWARD], b"M\r\n", "Q").quota is False
