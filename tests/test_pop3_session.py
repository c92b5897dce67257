"""The pure POP3 session: C:/S: transcripts for every command and every error, with
in-memory fakes answering its requests; Hypothesis for arbitrary input."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from textwrap import dedent

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runbox_mta.auth.service import AuthFailure, AuthResult
from runbox_mta.pop3.message import top, transmitted, transmitted_size
from runbox_mta.pop3.session import (
    MAX_ERRORS, Authenticate, Authorization, Close, Closed, CommitDeletions, DeletionsCommitted,
    FetchMessage, MaildropBusy, MaildropOpened, MessageData, MessageGone, OpenMaildrop, Request,
    RequestFailed, Send, SendMessage, Session, StartTls, TlsStarted, Transaction,
)
from runbox_mta.pop3.wire import Line, LineReceiver, NeedMore
from runbox_mta.store.maildrop import Maildrop, MaildropMessage

UIDVALIDITY = 0x65000000
MESSAGES = {
    3: b"Subject: one\r\n\r\nhello\r\n",
    5: b"Subject: two\r\n\r\n.leading dot\r\nsecond\r\n",
    9: b"Subject: three\n\nbare LF\n",
}
SIZES = {uid: transmitted_size(data) for uid, data in MESSAGES.items()}
TOTAL = sum(SIZES.values())
PASSWORD = "pass word"  # RFC 1939 §7: spaces belong to the password


def plain(authcid: str, password: str, authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode()).decode()


@dataclass
class Fakes:
    """What the glue would do, in memory, with knobs for every outcome."""

    accounts: dict[str, str] = field(default_factory=lambda: {"ola@example.test": PASSWORD})
    messages: dict[int, bytes] = field(default_factory=lambda: dict(MESSAGES))
    locked_out: set[str] = field(default_factory=set)
    busy: bool = False
    gone: set[int] = field(default_factory=set)
    fail: type[Request] | None = None  # this kind of request fails (store down)
    committed: list[tuple[int, ...]] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def perform(self, request: Request) -> object:
        self.requests.append(request)
        if isinstance(request, self.fail or ()):
            return RequestFailed()
        match request:
            case StartTls():
                return TlsStarted()
            case Authenticate(username, password):
                return self.authenticate(username, password)
            case OpenMaildrop():
                if self.busy:
                    return MaildropBusy()
                messages = tuple(MaildropMessage(uid, transmitted_size(self.messages[uid]))
                                 for uid in sorted(self.messages))
                return MaildropOpened(Maildrop(1, UIDVALIDITY, messages))
            case FetchMessage(uid=uid):
                return MessageGone() if uid in self.gone else MessageData(self.messages[uid])
            case CommitDeletions(uids=uids):
                self.committed.append(uids)
                return DeletionsCommitted()
        raise AssertionError(request)

    def authenticate(self, username: str, password: str) -> AuthResult:
        if username in self.locked_out:
            return AuthResult(False, AuthFailure.TEMPORARILY_LOCKED, None, None, None, "locked")
        if self.accounts.get(username) == password:
            return AuthResult(True, None, 7, username, "password", "ok")
        return AuthResult(False, AuthFailure.INVALID, None, None, None, "invalid")


class Harness:
    """Feeds bytes through a receiver into a session and plays the glue's part."""

    def __init__(self, *, tls: bool = True, fakes: Fakes | None = None) -> None:
        self.session = Session(tls=tls)
        self.receiver = LineReceiver()
        self.fakes = fakes or Fakes()
        self.output = bytearray()
        self.checked = 0  # bytes of output a transcript has already matched
        self.closed = False
        self._act(self.session.greeting())

    def send(self, data: bytes) -> bytes:
        """Feed client bytes; return what the server wrote in response."""
        start = len(self.output)
        self.receiver.feed(data)
        while not self.closed:
            event = self.receiver.next_event(self.session.max_line)
            if isinstance(event, NeedMore):
                break
            self._act(self.session.receive(event))
        return bytes(self.output[start:])

    def _act(self, actions: list) -> None:
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            if isinstance(action, Request):
                assert not pending, "a request is always the last action"
                if isinstance(action, StartTls):
                    self.receiver = LineReceiver()  # the glue discards plaintext read ahead
                pending = self.session.complete(self.fakes.perform(action))
            elif isinstance(action, Send):
                self.output += action.data
            elif isinstance(action, SendMessage):
                body = transmitted(action.data) if action.body_lines is None else top(action.data, action.body_lines)
                self.output += body + b".\r\n"
            else:
                assert isinstance(action, Close)
                self.closed = True


def check(harness: Harness, transcript: str) -> None:
    """Run a C:/S: dialogue; S: lines may be regexes when written as S~:."""
    lines = [line for line in dedent(transcript).splitlines() if line.strip()]
    output = harness.output[harness.checked:].decode("utf-8", "replace").split("\r\n")[:-1]
    position = 0
    for line in lines:
        who, _, text = line.partition(": ")
        if who == "C":
            assert position == len(output), f"unexpected server lines: {output[position:]}"
            output += harness.send(text.encode() + b"\r\n").decode("utf-8", "replace").split("\r\n")[:-1]
        else:
            assert position < len(output), f"server said nothing, expected {text!r}"
            if who == "S~":
                assert re.fullmatch(text, output[position]), (text, output[position])
            else:
                assert output[position] == text, (output[position], text)
            position += 1
    assert position == len(output), f"unexpected server lines: {output[position:]}"
    harness.checked = len(harness.output)


LOGIN = f"""
S: +OK POP3 server ready.
C: USER ola@example.test
S: +OK
C: PASS {PASSWORD}
S: +OK Logged in.
"""


def logged_in(fakes: Fakes | None = None) -> Harness:
    harness = Harness(fakes=fakes)
    check(harness, LOGIN)
    return harness


# --- AUTHORIZATION ----------------------------------------------------------------------------


def test_capa_before_tls_offers_stls_and_no_way_to_send_a_password():
    check(Harness(tls=False), """
        S: +OK POP3 server ready.
        C: CAPA
        S: +OK Capability list follows
        S: TOP
        S: UIDL
        S: RESP-CODES
        S: AUTH-RESP-CODE
        S: PIPELINING
        S: STLS
        S: .
    """)


def test_capa_with_tls_offers_user_and_sasl_plain_but_not_stls():
    check(Harness(tls=True), """
        S: +OK POP3 server ready.
        C: CAPA
        S: +OK Capability list follows
        S: TOP
        S: UIDL
        S: RESP-CODES
        S: AUTH-RESP-CODE
        S: PIPELINING
        S: USER
        S: SASL PLAIN
        S: .
    """)


def test_passwords_are_refused_before_tls():
    harness = Harness(tls=False)
    check(harness, f"""
        S: +OK POP3 server ready.
        C: USER ola@example.test
        S: -ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.
        C: PASS {PASSWORD}
        S: -ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.
        C: AUTH PLAIN {plain("ola@example.test", PASSWORD)}
        S: -ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.
        C: AUTH
        S: -ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.
    """)
    assert harness.fakes.requests == []  # nothing reached the auth service


def test_stls_then_login():
    harness = Harness(tls=False)
    check(harness, f"""
        S: +OK POP3 server ready.
        C: STLS
        S: +OK Begin TLS negotiation now.
        C: STLS
        S: -ERR TLS is already active.
        C: USER ola@example.test
        S: +OK
        C: PASS {PASSWORD}
        S: +OK Logged in.
    """)
    assert isinstance(harness.fakes.requests[0], StartTls)


def test_after_stls_the_session_starts_afresh_and_reads_nothing_sent_before():
    harness = Harness(tls=False)
    # The glue drops plaintext read ahead of the handshake (tested end to end too).
    assert harness.send(b"STLS\r\nPASS injected\r\n") == b"+OK Begin TLS negotiation now.\r\n"
    assert harness.session.state == Authorization(tls=True, user=None)  # RFC 2595 §4
    assert harness.send(b"PASS x\r\n") == b"-ERR Send USER first.\r\n"


def test_stls_takes_no_arguments():
    check(Harness(tls=False), """
        S: +OK POP3 server ready.
        C: STLS now
        S: -ERR This command takes no arguments.
    """)


def test_user_pass_failures():
    harness = Harness(fakes=Fakes(locked_out={"locked@example.test"}))
    check(harness, f"""
        S: +OK POP3 server ready.
        C: PASS {PASSWORD}
        S: -ERR Send USER first.
        C: USER
        S: -ERR USER needs a user name.
        C: USER ola@example.test
        S: +OK
        C: PASS wrong
        S: -ERR [AUTH] Authentication failed.
        C: PASS {PASSWORD}
        S: -ERR Send USER first.
        C: USER nobody@example.test
        S: +OK
        C: PASS {PASSWORD}
        S: -ERR [AUTH] Authentication failed.
        C: USER locked@example.test
        S: +OK
        C: PASS {PASSWORD}
        S: -ERR [SYS/TEMP] Too many failed logins, try again later.
    """)
    assert [request.username for request in harness.fakes.requests] == [
        "ola@example.test", "nobody@example.test", "locked@example.test"]
    assert harness.fakes.requests[0].password == "wrong"


def test_auth_plain_with_initial_response():
    harness = Harness()
    check(harness, f"""
        S: +OK POP3 server ready.
        C: AUTH PLAIN {plain("ola@example.test", PASSWORD)}
        S: +OK Logged in.
    """)
    assert harness.fakes.requests[0] == Authenticate("ola@example.test", PASSWORD)
    assert PASSWORD not in repr(harness.fakes.requests[0])


def test_auth_plain_with_continuation_and_cancel():
    check(Harness(), f"""
        S: +OK POP3 server ready.
        C: AUTH
        S: +OK Mechanisms follow
        S: PLAIN
        S: .
        C: AUTH LOGIN
        S: -ERR Unsupported authentication mechanism.
        C: AUTH PLAIN
        S: + 
        C: *
        S: -ERR Authentication cancelled.
        C: AUTH PLAIN
        S: + 
        C: not base64!
        S: -ERR Invalid SASL response.
        C: AUTH PLAIN =
        S: -ERR Invalid SASL response.
        C: AUTH plain
        S: + 
        C: {plain("ola@example.test", "wrong")}
        S: -ERR [AUTH] Authentication failed.
        C: AUTH PLAIN
        S: + 
        C: {plain("ola@example.test", PASSWORD, authzid="ola@example.test")}
        S: +OK Logged in.
    """)


def test_a_sasl_response_may_be_longer_than_a_command():
    harness = Harness(fakes=Fakes(accounts={"ola@example.test": "p" * 400}))
    check(harness, f"""
        S: +OK POP3 server ready.
        C: AUTH PLAIN
        S: + 
        C: {plain("ola@example.test", "p" * 400)}
        S: +OK Logged in.
    """)


def test_an_over_long_sasl_response_ends_the_exchange():
    harness = Harness()
    check(harness, """
        S: +OK POP3 server ready.
        C: AUTH PLAIN
        S: + 
    """)
    assert harness.send(b"A" * 5000 + b"\r\n") == b"-ERR Line too long.\r\n"
    assert isinstance(harness.session.state, Authorization)


def test_a_locked_maildrop_answers_in_use_and_stays_in_authorization():
    harness = Harness(fakes=Fakes(busy=True))
    check(harness, f"""
        S: +OK POP3 server ready.
        C: USER ola@example.test
        S: +OK
        C: PASS {PASSWORD}
        S: -ERR [IN-USE] Mailbox is locked by another POP3 session.
        C: CAPA
        S: +OK Capability list follows
        S: TOP
        S: UIDL
        S: RESP-CODES
        S: AUTH-RESP-CODE
        S: PIPELINING
        S: USER
        S: SASL PLAIN
        S: .
    """)
    assert harness.session.errors == 0  # not the client's fault


@pytest.mark.parametrize("failing", [Authenticate, OpenMaildrop])
def test_service_failures_during_login_are_temporary(failing):
    harness = Harness(fakes=Fakes(fail=failing))
    check(harness, f"""
        S: +OK POP3 server ready.
        C: USER ola@example.test
        S: +OK
        C: PASS {PASSWORD}
        S: -ERR [SYS/TEMP] Temporary server failure, try again later.
    """)
    assert isinstance(harness.session.state, Authorization)


@pytest.mark.parametrize("command", ["STAT", "LIST", "UIDL", "RETR 1", "TOP 1 0", "DELE 1", "RSET", "NOOP"])
def test_transaction_commands_are_refused_before_login(command):
    check(Harness(), f"""
        S: +OK POP3 server ready.
        C: {command}
        S: -ERR Command not valid in this state.
    """)


def test_quit_in_authorization_closes_without_update():
    harness = Harness()
    check(harness, """
        S: +OK POP3 server ready.
        C: QUIT
        S: +OK Logging out.
    """)
    assert harness.closed and isinstance(harness.session.state, Closed)
    assert harness.fakes.requests == []


def test_apop_is_not_offered():
    check(Harness(), """
        S: +OK POP3 server ready.
        C: APOP ola@example.test c4c9334bac560ecc979e58001b3e22fb
        S: -ERR Unknown command.
    """)


# --- TRANSACTION ----------------------------------------------------------------------------


def test_stat_list_and_uidl():
    check(logged_in(), f"""
        C: STAT
        S: +OK 3 {TOTAL}
        C: LIST
        S: +OK 3 messages
        S: 1 {SIZES[3]}
        S: 2 {SIZES[5]}
        S: 3 {SIZES[9]}
        S: .
        C: LIST 2
        S: +OK 2 {SIZES[5]}
        C: UIDL
        S: +OK 3 messages
        S: 1 0000000365000000
        S: 2 0000000565000000
        S: 3 0000000965000000
        S: .
        C: uidl 3
        S: +OK 3 0000000965000000
    """)


def test_retr_sends_the_announced_octets_dot_stuffed():
    harness = logged_in()
    reply = harness.send(b"RETR 2\r\n")
    head, _, rest = reply.partition(b"\r\n")
    assert head == f"+OK {SIZES[5]} octets".encode()
    assert rest == b"Subject: two\r\n\r\n..leading dot\r\nsecond\r\n.\r\n"
    assert len(rest) - len(b".\r\n") == SIZES[5]
    reply = harness.send(b"RETR 3\r\n")  # stored with bare LFs: sent as CRLF, counted so
    assert reply == f"+OK {SIZES[9]} octets\r\n".encode() + b"Subject: three\r\n\r\nbare LF\r\n.\r\n"
    assert SIZES[9] == len(b"Subject: three\r\n\r\nbare LF\r\n")


def test_top():
    check(logged_in(), """
        C: TOP 2 0
        S: +OK Top of message follows.
        S: Subject: two
        S: 
        S: .
        C: TOP 2 1
        S: +OK Top of message follows.
        S: Subject: two
        S: 
        S: ..leading dot
        S: .
        C: TOP 2
        S: -ERR TOP needs a message number and a number of lines.
        C: TOP 2 -1
        S: -ERR TOP needs a message number and a number of lines.
        C: TOP 4 0
        S: -ERR No such message.
    """)


def test_dele_marks_and_rset_unmarks():
    harness = logged_in()
    check(harness, f"""
        C: DELE 1
        S: +OK Message 1 marked for deletion.
        C: DELE 1
        S: -ERR Message is deleted.
        C: RETR 1
        S: -ERR Message is deleted.
        C: LIST 1
        S: -ERR Message is deleted.
        C: STAT
        S: +OK 2 {SIZES[5] + SIZES[9]}
        C: LIST
        S: +OK 2 messages
        S: 2 {SIZES[5]}
        S: 3 {SIZES[9]}
        S: .
        C: RSET
        S: +OK Maildrop has 3 messages ({TOTAL} octets).
        C: STAT
        S: +OK 3 {TOTAL}
        C: QUIT
        S: +OK Logging out.
    """)
    assert harness.fakes.committed == []  # RSET undid the only DELE


def test_quit_commits_the_deletions_in_update():
    harness = logged_in()
    check(harness, """
        C: DELE 3
        S: +OK Message 3 marked for deletion.
        C: DELE 1
        S: +OK Message 1 marked for deletion.
        C: QUIT
        S: +OK Logging out, messages deleted.
    """)
    assert harness.fakes.committed == [(3, 9)]  # UIDs, in order
    assert harness.closed


def test_a_failed_commit_reports_sys_temp_and_closes():
    harness = logged_in(Fakes(fail=CommitDeletions))
    check(harness, """
        C: DELE 1
        S: +OK Message 1 marked for deletion.
        C: QUIT
        S: -ERR [SYS/TEMP] Could not delete the messages; none were deleted.
    """)
    assert harness.closed


def test_a_message_expunged_meanwhile_cannot_be_read_but_counts_stay():
    harness = logged_in(Fakes(gone={5}))
    check(harness, f"""
        C: RETR 2
        S: -ERR Message was deleted by another client.
        C: TOP 2 0
        S: -ERR Message was deleted by another client.
        C: STAT
        S: +OK 3 {TOTAL}
        C: RETR 1
        S: +OK {SIZES[3]} octets
        S: Subject: one
        S: 
        S: hello
        S: .
    """)
    assert harness.session.errors == 0


def test_a_failing_read_is_temporary_and_the_session_goes_on():
    check(logged_in(Fakes(fail=FetchMessage)), """
        C: RETR 1
        S: -ERR [SYS/TEMP] Temporary server failure, try again later.
        C: NOOP
        S: +OK
    """)


@pytest.mark.parametrize("command, reply", [
    ("RETR", "-ERR Expected a message number."),
    ("RETR x", "-ERR Expected a message number."),
    ("RETR 0", "-ERR No such message."),
    ("RETR 4", "-ERR No such message."),
    ("RETR -1", "-ERR Expected a message number."),
    ("RETR 99999999999", "-ERR Expected a message number."),
    ("RETR 1 2", "-ERR Expected a message number."),
    ("DELE 4", "-ERR No such message."),
    ("LIST 0", "-ERR No such message."),
    ("UIDL 7", "-ERR No such message."),
    ("STAT 1", "-ERR This command takes no arguments."),
    ("NOOP x", "-ERR This command takes no arguments."),
    ("RSET x", "-ERR This command takes no arguments."),
    ("CAPA x", "-ERR This command takes no arguments."),
    ("QUIT now", "-ERR This command takes no arguments."),
    ("USER ola@example.test", "-ERR Command not valid in this state."),
    ("PASS x", "-ERR Command not valid in this state."),
    ("AUTH PLAIN", "-ERR Command not valid in this state."),
    ("STLS", "-ERR Command not valid in this state."),
    ("XYZZY", "-ERR Unknown command."),
    ("", "-ERR Unknown command."),
    ("NO\x00OP", "-ERR Invalid characters in command."),
])
def test_argument_and_state_errors_in_transaction(command, reply):
    harness = logged_in()
    assert harness.send(command.encode() + b"\r\n") == reply.encode() + b"\r\n"
    assert isinstance(harness.session.state, Transaction)
    assert harness.send(b"NOOP\r\n") == b"+OK\r\n"  # the connection survives


def test_capa_in_transaction():
    check(logged_in(), """
        C: CAPA
        S: +OK Capability list follows
        S: TOP
        S: UIDL
        S: RESP-CODES
        S: AUTH-RESP-CODE
        S: PIPELINING
        S: .
    """)


def test_pipelined_commands_get_their_replies_in_order():
    harness = logged_in()
    assert harness.send(b"NOOP\r\nLIST 1\r\nDELE 1\r\nSTAT\r\n") == (
        f"+OK\r\n+OK 1 {SIZES[3]}\r\n+OK Message 1 marked for deletion.\r\n"
        f"+OK 2 {SIZES[5] + SIZES[9]}\r\n").encode()


def test_an_empty_maildrop():
    check(logged_in(Fakes(messages={})), """
        C: STAT
        S: +OK 0 0
        C: LIST
        S: +OK 0 messages
        S: .
        C: RETR 1
        S: -ERR No such message.
    """)


# --- garbage and limits -------------------------------------------------------------------------


def test_garbage_gets_err_and_the_connection_survives():
    harness = Harness()
    assert harness.send(b"\xff\xfe\r\n") == b"-ERR Invalid characters in command.\r\n"
    assert harness.send(b"CA\rPA\r\n") == b"-ERR Invalid characters in command.\r\n"
    assert harness.send(b"x" * 300 + b"\r\n") == b"-ERR Line too long.\r\n"
    assert harness.send(b"QUIT\r\n") == b"+OK Logging out.\r\n"


def test_keywords_are_case_insensitive_and_bare_lf_works():
    assert Harness().send(b"cApA\n").startswith(b"+OK Capability list follows\r\n")


def test_too_many_errors_close_the_connection():
    harness = Harness()
    for _ in range(MAX_ERRORS - 1):
        assert harness.send(b"BOGUS\r\n") == b"-ERR Unknown command.\r\n"
    assert harness.send(b"BOGUS\r\nNOOP\r\n") == b"-ERR Too many errors, closing connection.\r\n"
    assert harness.closed


def test_failed_logins_count_as_errors():
    harness = Harness()
    for _ in range(MAX_ERRORS - 1):
        harness.send(f"AUTH PLAIN {plain('ola@example.test', 'guess')}\r\n".encode())
    assert not harness.closed
    assert harness.send(f"AUTH PLAIN {plain('ola@example.test', 'guess')}\r\n".encode()) == (
        b"-ERR Too many errors, closing connection.\r\n")
    assert harness.closed


def test_misuse_by_the_glue_is_a_runtime_error():
    session = Session(tls=True)
    with pytest.raises(RuntimeError):
        session.complete(TlsStarted())
    harness = logged_in()
    actions = harness.session.receive(Line(b"RETR 1"))
    assert isinstance(actions[-1], FetchMessage)
    with pytest.raises(RuntimeError):
        harness.session.receive(Line(b"NOOP"))
    with pytest.raises(RuntimeError):
        harness.session.complete(TlsStarted())


# --- anything at all -----------------------------------------------------------------------------

COMMANDISH = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda verb, rest: f"{verb} {rest}".encode(),
              st.sampled_from(["USER", "PASS", "AUTH", "AUTH PLAIN", "STAT", "LIST", "UIDL", "RETR", "TOP",
                               "DELE", "RSET", "NOOP", "CAPA", "STLS", "QUIT", "top 1", "retr"]),
              st.text(max_size=40)),
)


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.booleans(), st.lists(COMMANDISH, max_size=25))
def test_arbitrary_lines_never_raise(tls, log_in, lines):
    harness = Harness(tls=tls)
    if log_in and tls:
        harness.send(f"USER ola@example.test\r\nPASS {PASSWORD}\r\n".encode())
    for line in lines:
        if harness.closed:
            break
        reply = harness.send(line.replace(b"\n", b" ") + b"\r\n")
        assert reply.startswith((b"+OK", b"-ERR", b"+ ")), reply
        assert reply.endswith(b"\r\n")
