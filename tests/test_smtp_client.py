"""The outbound SMTP client against real aiosmtpd peers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from runbox_mta.smtp.client import (
    Envelope, Reply, Session, SmtpClientError, TlsPolicy, TlsRequired, dot_stuff, open_session, read_reply,
)
from tests.outbound_peers import SinkFactory, start_sink  # noqa: F401  (fixture)

MESSAGE = b"From: a@example.test\r\nTo: b@example.net\r\nSubject: hi\r\n\r\n.leading dot\r\nbody\r\n"


def opportunistic() -> TlsPolicy:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return TlsPolicy(context)


def required() -> TlsPolicy:
    return TlsPolicy(ssl.create_default_context(), required=True, server_name="localhost")


async def test_starttls_is_used_when_offered_and_commands_are_pipelined(start_sink: SinkFactory) -> None:
    sink = await start_sink("starttls")
    session = await open_session("127.0.0.1", sink.port, helo="mail.example.test", tls=opportunistic())
    assert session.tls_outcome.startswith("TLS1.") and session.tls_outcome.endswith(" unverified")
    assert "PIPELINING" in session.extensions and "STARTTLS" not in session.extensions
    replies = await session.send(Envelope("a@example.test", ("b@example.net", "c@example.net"), MESSAGE))
    await session.quit()
    assert [reply.code for reply in replies.values()] == [250, 250]
    (received,) = sink.messages
    assert received.tls and received.recipients == ("b@example.net", "c@example.net")
    assert received.data == MESSAGE  # dot-stuffing undone by the peer, byte for byte


async def test_no_starttls_means_plaintext(start_sink: SinkFactory) -> None:
    sink = await start_sink("plain")
    session = await open_session("127.0.0.1", sink.port, helo="mail.example.test", tls=opportunistic())
    assert session.tls_outcome == "plaintext (STARTTLS not offered)"
    await session.send(Envelope("a@example.test", ("b@example.net",), MESSAGE))
    await session.quit()
    assert not sink.messages[0].tls


async def test_failed_handshake_is_retried_in_plaintext_on_the_same_host(start_sink: SinkFactory) -> None:
    sink = await start_sink("broken-tls")
    session = await open_session("127.0.0.1", sink.port, helo="mail.example.test", tls=opportunistic())
    assert session.tls_outcome.startswith("plaintext (TLS handshake failed")
    replies = await session.send(Envelope("a@example.test", ("b@example.net",), MESSAGE))
    await session.quit()
    assert replies["b@example.net"].code == 250 and not sink.messages[0].tls
    assert sink.handler.sessions == 2  # the TLS try, then the plaintext one


@pytest.mark.parametrize("kind", ["broken-tls", "plain", "starttls"])
async def test_required_tls_never_falls_back_to_plaintext(start_sink: SinkFactory, kind: str) -> None:
    sink = await start_sink(kind)  # "starttls": the self-signed certificate fails verification
    with pytest.raises(TlsRequired) as caught:
        await open_session("127.0.0.1", sink.port, helo="mail.example.test", tls=required())
    assert caught.value.temporary
    assert not sink.messages


async def test_results_are_per_recipient_and_the_connection_is_reused(start_sink: SinkFactory) -> None:
    sink = await start_sink("flaky")
    session = await open_session("127.0.0.1", sink.port, helo="mail.example.test", tls=opportunistic())
    first = await session.send(Envelope("a@example.test", ("b@example.net",), MESSAGE))
    second = await session.send(Envelope("a@example.test", ("b@example.net", "c@example.net"), MESSAGE))
    await session.quit()
    assert first["b@example.net"].temporary and first["b@example.net"].text == "451 4.3.0 Try again later"
    assert second["b@example.net"].code == 250 and second["c@example.net"].code == 451
    assert sink.handler.sessions == 1 and [m.recipients for m in sink.messages] == [("b@example.net",)]


async def test_all_recipients_refused_means_no_data(start_sink: SinkFactory) -> None:
    sink = await start_sink("reject")
    session = await open_session("127.0.0.1", sink.port, helo="mail.example.test", tls=opportunistic())
    replies = await session.send(Envelope("a@example.test", ("b@example.net",), MESSAGE))
    again = await session.send(Envelope("", ("c@example.net",), MESSAGE))  # after RSET
    await session.quit()
    assert replies["b@example.net"].text == "550 5.1.1 No such user here" and again["c@example.net"].code == 550
    assert not sink.messages


async def test_a_closed_port_is_a_temporary_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(SmtpClientError) as caught:
        await open_session("127.0.0.1", port, helo="mail.example.test", tls=opportunistic())
    assert caught.value.temporary and "connection failed" in str(caught.value)


@pytest.mark.parametrize("data, wire", [
    (b"a\r\n", b"a\r\n"),
    (b"a", b"a\r\n"),
    (b".a\r\n..b\r\n.\r\n", b"..a\r\n...b\r\n..\r\n"),
    (b"", b""),
])
def test_dot_stuffing(data: bytes, wire: bytes) -> None:
    assert dot_stuff(data) == wire


async def test_multiline_replies_are_joined() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"250-first\r\n250-SIZE 100\r\n250 last\r\n")
    assert await read_reply(reader) == Reply(250, ("first", "SIZE 100", "last"))
    reader.feed_data(b"garbage\r\n")
    with pytest.raises(SmtpClientError, match="malformed"):
        await read_reply(reader)


@pytest.mark.parametrize("extensions, envelope, code", [
    ({"SIZE": "10"}, Envelope("a@x.test", ("b@y.test",), b"x" * 11), 552),
    ({"SIZE": "0", "8BITMIME": ""}, Envelope("a@x.test", ("b@y.test",), "é".encode()), None),
    ({}, Envelope("a@x.test", ("b@y.test",), "é".encode()), 554),  # RFC 6152 §3
    ({"8BITMIME": ""}, Envelope("a@x.test", ("bø@y.test",), b"x"), 553),  # RFC 6531 §3.2
])
async def test_what_the_server_cannot_take_fails_before_sending(extensions: dict[str, str], envelope: Envelope,
                                                         code: int | None) -> None:
    session = Session(asyncio.StreamReader(), None, extensions, "plaintext")  # type: ignore[arg-type]
    refused = session._refuse(envelope)
    assert (refused.code if refused else None) == code
