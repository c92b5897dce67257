"""The POP3 session: a pure state machine from lines to replies and requests.

The glue calls `greeting()`, then `receive(event)` for each event of the
line receiver, and performs the actions it gets back in order: `Send` bytes,
`SendMessage` (render with pop3.message, write, then ".CRLF"), `Close`, and
at most one `Request` (always last), whose result it hands to `complete()`,
which answers with more actions. Nothing here does I/O or raises on input.

States, one type each (RFC 1939 §3): `Authorization(tls, user)`, then
`SaslExchange` while an AUTH PLAIN waits for its response, `Transaction`
with the maildrop snapshot and the DELE marks, `Update` while QUIT's
deletions are committed, and `Closed`. `_COMMANDS` maps each verb to the
states that accept it.

Replies follow RFC 2449 RESP-CODES and RFC 3206: [AUTH] for refused
credentials, [SYS/TEMP] for our own trouble, [IN-USE] for a locked maildrop.
A failure never says whether the account exists (the auth service decides;
we only relay "invalid" or "temporarily locked").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from runbox_mta.auth.sasl import SaslCancelled, SaslError, decode_plain
from runbox_mta.auth.service import AuthFailure, AuthResult
from runbox_mta.pop3.message import CRLF, uidl
from runbox_mta.pop3.wire import MAX_COMMAND_LINE, MAX_SASL_LINE, Line, LineTooLong
from runbox_mta.store.maildrop import Maildrop

# A client that earns this many -ERR replies for its own mistakes (bad
# commands, arguments, credentials) is talking to the wrong server or probing;
# a working client makes at most a few.
MAX_ERRORS = 10
# RFC 3206 response codes.
AUTH = "AUTH"
IN_USE = "IN-USE"
SYS_TEMP = "SYS/TEMP"

END_OF_MULTILINE = b".\r\n"  # RFC 1939 §3

# Printable text after the verb; UTF-8 allowed, control characters not.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Message numbers and TOP's line count; ten digits bound int() (RFC 1939 §3 allows no sign).
_NUMBER = re.compile(r"[0-9]{1,10}")


# --- states ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Authorization:
    tls: bool
    user: str | None = None  # after a successful USER, for PASS


@dataclass(frozen=True)
class SaslExchange:
    """AUTH PLAIN sent "+ " and waits for the client's response line (RFC 5034 §4)."""


@dataclass(frozen=True)
class Transaction:
    maildrop: Maildrop
    # Message numbers marked by DELE. The one part changed in place: a new
    # set per DELE would make deleting n messages cost O(n^2).
    deleted: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Update:
    """QUIT in TRANSACTION: the deletions are being committed (RFC 1939 §6)."""


@dataclass(frozen=True)
class Closed:
    pass


State = Authorization | SaslExchange | Transaction | Update | Closed


# --- what the glue does ------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    data: bytes


@dataclass(frozen=True)
class SendMessage:
    """Render `data` (pop3.message.transmitted, or .top with `body_lines`), send it, then ".CRLF"."""

    data: bytes = field(repr=False)
    body_lines: int | None = None


@dataclass(frozen=True)
class Close:
    pass


@dataclass(frozen=True)
class Request:
    """Something only the glue can do; its result goes to `Session.complete`."""


@dataclass(frozen=True)
class StartTls(Request):
    pass


@dataclass(frozen=True)
class Authenticate(Request):
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class OpenMaildrop(Request):
    account_id: int


@dataclass(frozen=True)
class FetchMessage(Request):
    mailbox_id: int
    uid: int
    number: int
    body_lines: int | None  # None: RETR; n: TOP with n body lines


@dataclass(frozen=True)
class CommitDeletions(Request):
    mailbox_id: int
    uids: tuple[int, ...]


Action = Send | SendMessage | Close | Request


# --- results the glue hands back -----------------------------------------------------------


@dataclass(frozen=True)
class TlsStarted:
    pass


@dataclass(frozen=True)
class MaildropOpened:
    maildrop: Maildrop


@dataclass(frozen=True)
class MaildropBusy:
    pass


@dataclass(frozen=True)
class MessageData:
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class MessageGone:
    """Expunged by another client (IMAP) since the snapshot."""


@dataclass(frozen=True)
class DeletionsCommitted:
    pass


@dataclass(frozen=True)
class RequestFailed:
    """The store or the auth service failed (already logged by the glue)."""


Result = AuthResult | TlsStarted | MaildropOpened | MaildropBusy | MessageData | MessageGone | \
    DeletionsCommitted | RequestFailed


# --- replies --------------------------------------------------------------------------------


def ok(text: str = "") -> Send:
    return Send(b"+OK" + (b" " + text.encode() if text else b"") + CRLF)


def err(text: str, code: str | None = None) -> Send:
    prefix = f"[{code}] " if code else ""
    return Send(f"-ERR {prefix}{text}".encode() + CRLF)


def multiline(first: str, lines: list[str]) -> Send:
    # Only our own lines (numbers, unique-ids, capabilities): none starts with ".".
    body = b"".join(line.encode() + CRLF for line in lines)
    return Send(ok(first).data + body + END_OF_MULTILINE)


GREETING = ok("POP3 server ready.")
IDLE_TIMEOUT_REPLY = err("Disconnected for inactivity.")
SHUTDOWN_REPLY = err("Server shutting down.", SYS_TEMP)
BUSY_REPLY = err("Too many connections, try again later.", SYS_TEMP)
# RFC 2595 §2.3 / SPEC §6: no passwords over plaintext; Dovecot's wording.
PLAINTEXT_REFUSED = "Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
TEMPORARY_FAILURE = "Temporary server failure, try again later."


# --- the session -----------------------------------------------------------------------------


class _Refused(Exception):
    """The client's command is wrong; caught in `Session._command`, answered with -ERR."""

    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.code = code


class Session:
    """One POP3 connection's protocol state; see the module doc."""

    def __init__(self, *, tls: bool) -> None:
        self.state: State = Authorization(tls=tls)
        self.errors = 0
        self._pending: Request | None = None

    @property
    def max_line(self) -> int:
        """The line limit for the next event of the receiver."""
        return MAX_SASL_LINE if isinstance(self.state, SaslExchange) else MAX_COMMAND_LINE

    @property
    def closed(self) -> bool:
        return isinstance(self.state, Closed)

    def greeting(self) -> list[Action]:
        return [GREETING]  # RFC 1939 §4; no APOP timestamp: APOP is not offered

    def receive(self, event: Line | LineTooLong) -> list[Action]:
        if self._pending is not None or isinstance(self.state, (Update, Closed)):
            raise RuntimeError(f"no input expected in {type(self.state).__name__} (pending: {self._pending})")
        if isinstance(event, LineTooLong):
            if isinstance(self.state, SaslExchange):
                self.state = Authorization(tls=True)
            return self._error("Line too long.")
        if isinstance(self.state, SaslExchange):
            return self._sasl_response(event.text)
        try:
            return self._command(event.text)
        except _Refused as refused:
            return self._error(refused.text, refused.code)

    def complete(self, result: Result) -> list[Action]:
        request, self._pending = self._pending, None
        if request is None:
            raise RuntimeError("complete() without a pending request")
        if isinstance(result, RequestFailed):
            return self._request_failed(request)
        match request, result:
            case StartTls(), TlsStarted():
                # RFC 2595 §4: forget what the client said before TLS.
                self.state = Authorization(tls=True)
                return []
            case Authenticate(), AuthResult():
                return self._authenticated(result)
            case OpenMaildrop(), MaildropOpened(maildrop):
                self.state = Transaction(maildrop)
                return [ok("Logged in.")]
            case OpenMaildrop(), MaildropBusy():
                self.state = Authorization(tls=True)
                return [err("Mailbox is locked by another POP3 session.", IN_USE)]  # RFC 2449 §8.1
            case FetchMessage(), MessageData(data):
                return self._message(request, data)
            case FetchMessage(), MessageGone():
                return [err("Message was deleted by another client.")]
            case CommitDeletions(), DeletionsCommitted():
                self.state = Closed()
                return [ok("Logging out, messages deleted."), Close()]
        raise RuntimeError(f"{type(result).__name__} does not answer {type(request).__name__}")

    # --- commands -----------------------------------------------------------------------

    def _command(self, line: bytes) -> list[Action]:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise _Refused("Invalid characters in command.") from None
        if _CONTROL.search(text):
            raise _Refused("Invalid characters in command.")
        verb, _, argument = text.partition(" ")
        command = _COMMANDS.get(verb.upper())  # RFC 1939 §3: keywords are case-insensitive
        if command is None:
            raise _Refused("Unknown command.")
        handler, states = command
        if not isinstance(self.state, states):
            raise _Refused("Command not valid in this state.")
        return handler(self, argument)

    def _capa(self, argument: str) -> list[Action]:
        _no_arguments(argument)
        # RFC 2449 §6 and, for AUTH-RESP-CODE, RFC 3206.
        capabilities = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        state = self.state
        if isinstance(state, Authorization):
            # RFC 2595 §2.3: no USER or SASL offered where they would be refused.
            capabilities += ["USER", "SASL PLAIN"] if state.tls else ["STLS"]
        return [multiline("Capability list follows", capabilities)]

    def _stls(self, argument: str) -> list[Action]:
        _no_arguments(argument)
        if self._authorization().tls:
            raise _Refused("TLS is already active.")  # RFC 2595 §4
        return self._request(StartTls(), ok("Begin TLS negotiation now."))

    def _user(self, argument: str) -> list[Action]:
        self._require_tls()
        if not argument:
            raise _Refused("USER needs a user name.")
        # The whole rest of the line, as Dovecot takes it: the name is checked at PASS.
        self.state = Authorization(tls=True, user=argument)
        return [ok()]

    def _pass(self, argument: str) -> list[Action]:
        user = self._require_tls().user
        if user is None:
            raise _Refused("Send USER first.")
        # RFC 1939 §7: a password may contain spaces, so it is the rest of the
        # line. A failed PASS needs a new USER (RFC 1939 §7).
        self.state = Authorization(tls=True)
        return self._request(Authenticate(user, argument))

    def _auth(self, argument: str) -> list[Action]:
        self._require_tls()
        mechanism, _, initial = argument.partition(" ")
        if not mechanism:
            # Not in RFC 5034, but older clients probe the mechanisms this way.
            return [multiline("Mechanisms follow", ["PLAIN"])]
        if mechanism.upper() != "PLAIN":
            raise _Refused("Unsupported authentication mechanism.")
        if not initial:
            self.state = SaslExchange()
            return [Send(b"+ " + CRLF)]  # RFC 5034 §4: PLAIN's challenge is empty
        self.state = Authorization(tls=True)
        return self._sasl_plain(initial)

    def _sasl_response(self, line: bytes) -> list[Action]:
        self.state = Authorization(tls=True)
        return self._sasl_plain(line)

    def _sasl_plain(self, response: str | bytes) -> list[Action]:
        """An initial response or the reply to "+ ": RFC 4616 PLAIN credentials, "=" or "*"."""
        try:
            credentials = decode_plain(response)
        except SaslCancelled:
            return self._error("Authentication cancelled.")  # RFC 5034 §4: "*" gets -ERR
        except SaslError:
            return self._error("Invalid SASL response.")
        return self._request(Authenticate(credentials.username, credentials.password))

    def _quit(self, argument: str) -> list[Action]:
        _no_arguments(argument)
        state = self.state
        if isinstance(state, Transaction) and state.deleted:
            self.state = Update()  # RFC 1939 §6: deletions happen now and only now
            uids = tuple(sorted(state.maildrop.messages[number - 1].uid for number in state.deleted))
            return self._request(CommitDeletions(state.maildrop.mailbox_id, uids))
        self.state = Closed()
        return [ok("Logging out."), Close()]

    def _noop(self, argument: str) -> list[Action]:
        _no_arguments(argument)
        return [ok()]

    def _stat(self, argument: str) -> list[Action]:
        _no_arguments(argument)
        live = _live(self._transaction())
        return [ok(f"{len(live)} {sum(size for _, size in live)}")]  # RFC 1939 §5 drop listing

    def _list(self, argument: str) -> list[Action]:
        return self._listing(argument, lambda state, number: str(state.maildrop.messages[number - 1].size))

    def _uidl(self, argument: str) -> list[Action]:
        def unique_id(state: Transaction, number: int) -> str:
            return uidl(state.maildrop.messages[number - 1].uid, state.maildrop.uidvalidity)

        return self._listing(argument, unique_id)

    def _listing(self, argument: str, value: Callable[[Transaction, int], str]) -> list[Action]:
        """LIST and UIDL: one message with an argument, else each one not deleted (RFC 1939 §5, §7)."""
        state = self._transaction()
        if argument:
            number = _message_number(state, argument)
            return [ok(f"{number} {value(state, number)}")]
        lines = [f"{number} {value(state, number)}" for number, _ in _live(state)]
        return [multiline(f"{len(lines)} messages", lines)]

    def _retr(self, argument: str) -> list[Action]:
        return self._fetch(argument, None)

    def _top(self, argument: str) -> list[Action]:
        number, _, lines = argument.partition(" ")
        if not _NUMBER.fullmatch(lines):
            raise _Refused("TOP needs a message number and a number of lines.")
        return self._fetch(number, int(lines))

    def _dele(self, argument: str) -> list[Action]:
        state = self._transaction()
        number = _message_number(state, argument)
        state.deleted.add(number)  # RFC 1939 §6: only marked; removed at QUIT
        return [ok(f"Message {number} marked for deletion.")]

    def _rset(self, argument: str) -> list[Action]:
        _no_arguments(argument)
        state = self._transaction()
        state.deleted.clear()
        total = sum(message.size for message in state.maildrop.messages)
        return [ok(f"Maildrop has {len(state.maildrop.messages)} messages ({total} octets).")]

    # --- results ------------------------------------------------------------------------

    def _authenticated(self, result: AuthResult) -> list[Action]:
        if result.ok and result.account_id is not None:
            return self._request(OpenMaildrop(result.account_id))
        if result.failure is AuthFailure.TEMPORARILY_LOCKED:
            return [err("Too many failed logins, try again later.", SYS_TEMP)]
        return self._error("Authentication failed.", AUTH)  # RFC 3206: the credentials are at fault

    def _message(self, request: FetchMessage, data: bytes) -> list[Action]:
        if request.body_lines is None:
            size = self._transaction().maildrop.messages[request.number - 1].size
            return [ok(f"{size} octets"), SendMessage(data)]
        return [ok("Top of message follows."), SendMessage(data, request.body_lines)]

    def _request_failed(self, request: Request) -> list[Action]:
        if isinstance(request, CommitDeletions):
            # Nothing half-done: the expunge is one transaction, so none were deleted.
            self.state = Closed()
            return [err("Could not delete the messages; none were deleted.", SYS_TEMP), Close()]
        return [err(TEMPORARY_FAILURE, SYS_TEMP)]

    # --- helpers ------------------------------------------------------------------------

    def _request(self, request: Request, *before: Action) -> list[Action]:
        self._pending = request
        return [*before, request]

    def _fetch(self, argument: str, body_lines: int | None) -> list[Action]:
        state = self._transaction()
        number = _message_number(state, argument)
        uid = state.maildrop.messages[number - 1].uid
        return self._request(FetchMessage(state.maildrop.mailbox_id, uid, number, body_lines))

    def _error(self, text: str, code: str | None = None) -> list[Action]:
        """A -ERR for the client's own mistake; too many of them end the connection."""
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            self.state = Closed()
            return [err("Too many errors, closing connection."), Close()]
        return [err(text, code)]

    def _require_tls(self) -> Authorization:
        state = self._authorization()
        if not state.tls:
            raise _Refused(PLAINTEXT_REFUSED, AUTH)  # RFC 2595 §2.3, SPEC §6
        return state

    def _authorization(self) -> Authorization:
        assert isinstance(self.state, Authorization), "_COMMANDS lets this verb in AUTHORIZATION only"
        return self.state

    def _transaction(self) -> Transaction:
        assert isinstance(self.state, Transaction), "_COMMANDS lets this verb in TRANSACTION only"
        return self.state


def _no_arguments(argument: str) -> None:
    if argument:
        raise _Refused("This command takes no arguments.")


def _message_number(state: Transaction, argument: str) -> int:
    """The message `argument` names: 1..N and not marked deleted (RFC 1939 §5)."""
    if not _NUMBER.fullmatch(argument):
        raise _Refused("Expected a message number.")
    number = int(argument)
    if not 1 <= number <= len(state.maildrop.messages):
        raise _Refused("No such message.")
    if number in state.deleted:
        raise _Refused("Message is deleted.")
    return number


def _live(state: Transaction) -> list[tuple[int, int]]:
    """(number, size) of each message not marked deleted."""
    return [(number, message.size) for number, message in enumerate(state.maildrop.messages, 1)
            if number not in state.deleted]


Handler = Callable[[Session, str], list[Action]]
ANY_STATE = (Authorization, Transaction)  # where lines are commands

# Each verb and the states that accept it (RFC 1939 §4-6, RFC 2449 §5, RFC 2595 §4, RFC 5034 §4).
_COMMANDS: dict[str, tuple[Handler, tuple[type, ...]]] = {
    "CAPA": (Session._capa, ANY_STATE),
    "QUIT": (Session._quit, ANY_STATE),
    "NOOP": (Session._noop, (Transaction,)),
    "STLS": (Session._stls, (Authorization,)),
    "USER": (Session._user, (Authorization,)),
    "PASS": (Session._pass, (Authorization,)),
    "AUTH": (Session._auth, (Authorization,)),
    "STAT": (Session._stat, (Transaction,)),
    "LIST": (Session._list, (Transaction,)),
    "UIDL": (Session._uidl, (Transaction,)),
    "RETR": (Session._retr, (Transaction,)),
    "TOP": (Session._top, (Transaction,)),
    "DELE": (Session._dele, (Transaction,)),
    "RSET": (Session._rset, (Transaction,)),
}
