"""DSNs (RFC 3464): the multipart/report a sender gets for failed or delayed mail."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, timedelta

import pytest

from runbox_mta.smtp import dsn

NOW = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
ORIGINAL = b"From: alice@example.test\r\nSubject: plans\r\n\r\nSecret body.\r\n"


def report(action: dsn.Action, *diagnostics: str) -> dsn.Report:
    return dsn.Report(action, "mail.example.test", NOW - timedelta(hours=5), NOW,
                      tuple(dsn.RecipientReport(f"r{i}@remote.test", text, "mx.remote.test")
                            for i, text in enumerate(diagnostics)),
                      retry_until=NOW + timedelta(days=4) if action is dsn.Action.DELAYED else None)


def test_a_bounce_is_a_multipart_report_with_the_original_header_only() -> None:
    data = dsn.build(report(dsn.Action.FAILED, "550 5.1.1 User unknown", "554 rejected"),
                     "alice@example.test", ORIGINAL)
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF only
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"  # RFC 6522 §3
    assert message["Auto-Submitted"] == "auto-replied" and message["Message-ID"]
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    text, status, headers = message.iter_parts()
    assert "<r0@remote.test>: 550 5.1.1 User unknown" in text.get_content()
    per_message, first, second = status.get_payload()  # type: ignore[misc]
    assert per_message["Reporting-MTA"] == "dns; mail.example.test"
    assert (first["Final-Recipient"], first["Action"], first["Status"]) == ("rfc822; r0@remote.test", "failed", "5.1.1")
    assert first["Remote-MTA"] == "dns; mx.remote.test"
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"
    assert second["Status"] == "5.0.0" and first["Will-Retry-Until"] is None
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Subject: plans" in data and b"Secret body" not in data


def test_a_delay_warning_says_delayed_with_a_4xx_status_and_the_retry_deadline() -> None:
    data = dsn.build(report(dsn.Action.DELAYED, "451 4.3.0 later"), "alice@example.test", ORIGINAL)
    message = email.message_from_bytes(data, policy=email.policy.default)
    _, status, _ = message.iter_parts()
    _, entry = status.get_payload()  # type: ignore[misc]
    assert (entry["Action"], entry["Status"]) == ("delayed", "4.3.0")
    assert entry["Will-Retry-Until"] == "Thu, 05 Mar 2026 10:00:00 +0000"


@pytest.mark.parametrize("action, diagnostic, status", [
    (dsn.Action.FAILED, "550 5.7.1 no", "5.7.1"),
    (dsn.Action.FAILED, "the recipient domain accepts no mail (null MX, RFC 7505)", "5.0.0"),
    (dsn.Action.DELAYED, "550 5.2.2 full", "4.2.2"),
    (dsn.Action.DELAYED, "connection failed", "4.0.0"),
])
def test_status_codes(action: dsn.Action, diagnostic: str, status: str) -> None:
    assert dsn.status_code(action, diagnostic) == status
