"""The IMAP session: typed commands in, responses out, one state type per connection state.

The glue (server.py) feeds `execute(raw)` each framed command and acts on
the `Outcome` it returns (close, start TLS, wait for a SASL response, idle,
compress). The session writes responses through `Output` (write buffers,
flush drains) and reaches the world only through the store facade and the
auth service: no sockets, no timers, no TLS here. Unlike pop3.session it
awaits those services itself instead of returning requests: some twenty
IMAP commands need the store, several of them more than once (FETCH in
batches, \\Seen then rows), and a request/result pair per step would double
the code without making the parsing, which is where purity pays, any purer.

States (RFC 9051 §3): `NotAuthenticated`, `Authenticated(account)`,
`Selected(account, view)`. `_HANDLERS` maps each command type to its
handler and the states that accept it; any other state gets BAD.

Concerns are split by module: this one has the any-state and
not-authenticated commands (RFC 9051 §6.1, §6.2) and ENABLE/ID/NAMESPACE;
session_mailbox.py the authenticated-state mailbox commands (§6.3);
session_messages.py the selected-state commands (§6.4) and the untagged
updates about other sessions' changes (§7.4.1, §7.5).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Awaitable, Callable

from sqlalchemy.exc import SQLAlchemyError

from runbox_mta.auth.sasl import SaslCancelled, SaslError, decode_plain, parse_plain
from runbox_mta.auth.service import AuthFailure
from runbox_mta.errors import AlreadyExists, NotFound, RunboxError
from runbox_mta.imap import commands as c
from runbox_mta.imap.responses import quoted, status, tagged, untagged
from runbox_mta.imap.session_mailbox import MailboxCommands
from runbox_mta.imap.session_messages import MessageCommands
from runbox_mta.imap.session_state import (
    Authenticated, MailboxGone, NotAuthenticated, Outcome, Output, Refused, Selected, State,
)
from runbox_mta.imap.wire import RawCommand
from runbox_mta.log import client_label
from runbox_mta.store.recipients import QuotaExceeded

if TYPE_CHECKING:
    from runbox_mta.app import Services

log = logging.getLogger("runbox_mta.imap")

SERVER_NAME = "runbox-mta"
# A client earning this many BAD replies is broken or probing; a working one earns few.
MAX_ERRORS = 20
# Store and auth failures: NO [SERVERBUG] and logged; anything else is a bug.
SERVICE_ERRORS = (RunboxError, SQLAlchemyError, OSError)
ENABLEABLE = ("IMAP4REV2", "CONDSTORE", "QRESYNC", "UTF8=ACCEPT")  # RFC 5161; what ENABLE can switch on
# What works, and only that (RFC 9051 §6.1.1); APPENDLIMIT and the authentication ones are added per session.
CAPABILITIES = (
    "IMAP4rev1", "IMAP4rev2", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE", "UNSELECT", "UIDPLUS",
    "MOVE", "CHILDREN", "SPECIAL-USE", "CREATE-SPECIAL-USE", "LIST-EXTENDED", "LIST-STATUS", "ESEARCH", "SEARCHRES",
    "STATUS=SIZE", "CONDSTORE", "QRESYNC", "BINARY", "UTF8=ACCEPT", "QUOTA", "QUOTA=RES-STORAGE", "COMPRESS=DEFLATE",
    "MULTIAPPEND",
)
MAILBOX_GONE_REPLY = status("BYE", "The selected mailbox was deleted.")


class Session(MailboxCommands, MessageCommands):
    def __init__(self, services: Services, out: Output, *, tls: bool, starttls_offered: bool,
                 client_ip: str) -> None:
        self.services = services
        self.out = out
        self.tls = tls
        self.starttls_offered = starttls_offered
        self.client_ip = client_ip
        self.state: State = NotAuthenticated()
        self.enabled: set[str] = set()
        self.errors = 0
        self._sasl_tag: str | None = None
        self._idle_tag: str | None = None
        self.compressed = False

    # --- what the glue asks ----------------------------------------------------------------

    @property
    def timeout(self) -> float:
        limits = self.services.config.limits
        return limits.imap_login_timeout if isinstance(self.state, NotAuthenticated) else limits.imap_idle_timeout

    @property
    def utf8(self) -> bool:
        """Mailbox names are UTF-8 (RFC 6855 §3, RFC 9051 §5.1), not modified UTF-7."""
        return bool(self.enabled & {"UTF8=ACCEPT", "IMAP4REV2"})

    @property
    def rev2(self) -> bool:
        return "IMAP4REV2" in self.enabled

    def greeting(self) -> bytes:
        return status("OK", f"{SERVER_NAME} ready", "CAPABILITY " + self.capabilities())

    def capabilities(self) -> str:
        limits = self.services.config.limits
        names = [*CAPABILITIES, f"APPENDLIMIT={min(limits.imap_literal_size, limits.message_size)}"]
        if isinstance(self.state, NotAuthenticated):
            # RFC 9051 §6.2.1, §6.2.3: no authentication offered before TLS.
            if not self.tls:
                names += ["STARTTLS", "LOGINDISABLED"]
            else:
                names += ["AUTH=PLAIN"]
        return " ".join(names)

    async def execute(self, raw: RawCommand) -> Outcome:
        """Run one command; its responses are written (not necessarily flushed)."""
        try:
            command = c.parse_command(raw, utf8=self.utf8)
        except c.CommandError as error:
            return self.reply_error(raw.tag, error.status, str(error), error.code)
        handler, states = _HANDLERS.get(type(command), (None, ()))
        if handler is None:
            return self.reply_error(raw.tag, "BAD", f"{raw.name} is not supported")
        if not isinstance(self.state, states):
            return self.reply_error(raw.tag, "BAD", f"{raw.name} is not allowed in this state")
        return await self._guarded(raw.tag, raw.name, handler(self, command))

    async def _guarded(self, tag: str, name: str, work: Awaitable[Outcome | None]) -> Outcome:
        """Run a command's work; its failures become the tagged reply (one place for all commands)."""
        try:
            return await work or Outcome.CONTINUE
        except Refused as refused:
            return self.reply_error(tag, refused.status, refused.text, refused.code)
        except MailboxGone:
            self.out.write(MAILBOX_GONE_REPLY)
            return Outcome.CLOSE
        except NotFound:
            return self.reply_error(tag, "NO", "No such mailbox.", "NONEXISTENT")
        except AlreadyExists:
            return self.reply_error(tag, "NO", "Mailbox already exists.", "ALREADYEXISTS")
        except QuotaExceeded:
            return self.reply_error(tag, "NO", "Quota exceeded.", "OVERQUOTA")  # RFC 9208 §4.3
        except SERVICE_ERRORS:
            log.exception("imap %s failed (%s)", name, client_label(self.client_ip))
            return self.reply_error(tag, "NO", "Internal error, try again later.", "SERVERBUG")

    def reply_error(self, tag: str | None, status_word: str, text: str, code: str | None = None,
                    close: bool = False) -> Outcome:
        """A BAD or NO; too many BADs end the connection."""
        line = tagged(tag, status_word, text, code) if tag else status(status_word, text, code)
        self.out.write(line)
        if status_word == "BAD":
            self.errors += 1
        if close or self.errors >= MAX_ERRORS:
            self.out.write(status("BYE", "Too many errors." if not close else "Closing connection."))
            return Outcome.CLOSE
        return Outcome.CONTINUE

    async def sasl_response(self, line: bytes) -> Outcome:
        """The client's answer to AUTHENTICATE PLAIN's empty challenge (RFC 9051 §6.2.2)."""
        tag, self._sasl_tag = self._sasl_tag, None
        assert tag is not None, "sasl_response without AUTHENTICATE"
        try:
            credentials = decode_plain(line)
        except SaslCancelled:
            return self.reply_error(tag, "BAD", "Authentication cancelled.")  # RFC 9051 §6.2.2
        except SaslError:
            return self.reply_error(tag, "BAD", "Invalid SASL response.")
        return await self._guarded(tag, "AUTHENTICATE", self._login(tag, credentials.username, credentials.password))

    async def idle_done(self, error: str | None = None) -> Outcome:
        """DONE ended IDLE; or the line was not DONE (`error`), which ends IDLE with BAD."""
        tag, self._idle_tag = self._idle_tag, None
        assert tag is not None, "idle_done without IDLE"
        if error is not None:
            return self.reply_error(tag, "BAD", error)
        return await self._guarded(tag, "IDLE", self.done(tag, "IDLE terminated."))

    async def done(self, tag: str, text: str, code: str | None = None, *, expunges: bool = True,
                   uid: bool = False) -> None:
        """Untagged updates about others' changes, then the tagged OK (RFC 9051 §7.4.1).

        `expunges`: False while answering FETCH, STORE or SEARCH; `uid`: the command was a UID one.
        """
        if isinstance(self.state, Selected):
            await self.sync(expunges=expunges, uid=uid)
        self.out.write(tagged(tag, "OK", text, code))

    # --- any state (RFC 9051 §6.1) ----------------------------------------------------------

    async def _capability(self, command: c.Capability) -> None:
        self.out.write(untagged("CAPABILITY " + self.capabilities()))
        await self.done(command.tag, "CAPABILITY completed.")

    async def _noop(self, command: c.Command) -> None:
        await self.done(command.tag, "NOOP completed.")

    async def _logout(self, command: c.Logout) -> Outcome:
        self.out.write(status("BYE", "Logging out."))
        self.out.write(tagged(command.tag, "OK", "LOGOUT completed."))
        return Outcome.CLOSE

    async def _id(self, command: c.Id) -> None:
        # RFC 2971; only the name: the version would help attackers, not clients.
        self.out.write(untagged(f"ID ({quoted('name')} {quoted(SERVER_NAME)})"))
        await self.done(command.tag, "ID completed.")

    # --- not authenticated (RFC 9051 §6.2) --------------------------------------------------

    async def _starttls(self, command: c.Starttls) -> Outcome:
        if self.tls or not self.starttls_offered:
            raise Refused("TLS is already active.", status="BAD")
        self.out.write(tagged(command.tag, "OK", "Begin TLS negotiation now."))
        return Outcome.STARTTLS

    def tls_started(self) -> None:
        self.tls = True  # RFC 9051 §6.2.1: the client must ask CAPABILITY again

    async def _login_command(self, command: c.Login) -> Outcome:
        self._require_tls()
        return await self._login(command.tag, command.username, command.password)

    async def _authenticate(self, command: c.Authenticate) -> Outcome:
        self._require_tls()
        if command.mechanism != "PLAIN":
            raise Refused("Unsupported authentication mechanism.")
        if command.initial_response is None:
            self._sasl_tag = command.tag
            self.out.write(b"+ \r\n")  # RFC 4616: PLAIN's challenge is empty
            return Outcome.SASL
        try:
            credentials = parse_plain(command.initial_response)  # SASL-IR (RFC 4959)
        except SaslError:
            raise Refused("Invalid SASL response.", status="BAD") from None
        return await self._login(command.tag, credentials.username, credentials.password)

    def _require_tls(self) -> None:
        if not self.tls:  # RFC 9051 §6.2.3, SPEC §6
            raise Refused("Plaintext authentication disallowed on non-secure connections.", "PRIVACYREQUIRED")

    async def _login(self, tag: str, username: str, password: str) -> Outcome:
        result = await self.services.auth.authenticate(username, password, protocol="imap",
                                                      client_address=self.client_ip)
        if result.failure is AuthFailure.TEMPORARILY_LOCKED:
            raise Refused("Too many failed logins, try again later.", "UNAVAILABLE")
        if not result.ok or result.account_id is None or result.address is None:
            self.errors += 1
            raise Refused("Authentication failed.", "AUTHENTICATIONFAILED")  # RFC 5530
        self.state = Authenticated(result.account_id, result.address)
        self.out.write(tagged(tag, "OK", "Logged in.", "CAPABILITY " + self.capabilities()))
        return Outcome.CONTINUE

    # --- authenticated: session-wide settings -----------------------------------------------

    async def _enable(self, command: c.Enable) -> None:
        wanted = [name for name in command.capabilities if name in ENABLEABLE and name not in self.enabled]
        self.enabled.update(wanted)  # RFC 5161 §3.1: unknown names are ignored
        if "QRESYNC" in wanted:
            self.enabled.add("CONDSTORE")  # RFC 7162 §3.2.3: QRESYNC implies CONDSTORE
        self.out.write(untagged(" ".join(["ENABLED", *wanted])))
        await self.done(command.tag, "ENABLE completed.")

    async def _namespace(self, command: c.Namespace) -> None:
        self.out.write(untagged('NAMESPACE (("" "/")) NIL NIL'))  # RFC 2342: personal only
        await self.done(command.tag, "NAMESPACE completed.")

    async def _compress(self, command: c.Compress) -> Outcome:
        if command.mechanism != "DEFLATE":
            raise Refused("Unknown compression mechanism.", status="BAD")
        if self.compressed:
            raise Refused("Compression is already active.", "COMPRESSIONACTIVE")  # RFC 4978 §3
        self.compressed = True
        self.out.write(tagged(command.tag, "OK", "DEFLATE active."))
        return Outcome.COMPRESS

    async def _idle(self, command: c.Idle) -> Outcome:
        self._idle_tag = command.tag
        if isinstance(self.state, Selected):
            await self.sync(expunges=True)
        self.out.write(b"+ idling\r\n")  # RFC 2177 §3
        return Outcome.IDLE


Handler = Callable[[Session, c.Command], Awaitable[Outcome | None]]
ANY = (NotAuthenticated, Authenticated)  # Selected is an Authenticated
AUTHENTICATED = (Authenticated,)
SELECTED = (Selected,)
_NOT_AUTHENTICATED = (NotAuthenticated,)

# Each command and the states that accept it (RFC 9051 §6, RFC 2177, 2971, 4315, 5161, 6851).
_HANDLERS: dict[type[c.Command], tuple[Handler, tuple[type, ...]]] = {  # type: ignore[dict-item]
    c.Capability: (Session._capability, ANY),
    c.Noop: (Session._noop, ANY),
    c.Logout: (Session._logout, ANY),
    c.Id: (Session._id, ANY),
    c.Starttls: (Session._starttls, _NOT_AUTHENTICATED),
    c.Login: (Session._login_command, _NOT_AUTHENTICATED),
    c.Authenticate: (Session._authenticate, _NOT_AUTHENTICATED),
    c.Enable: (Session._enable, AUTHENTICATED),
    c.Namespace: (Session._namespace, AUTHENTICATED),
    c.Idle: (Session._idle, AUTHENTICATED),
    c.Compress: (Session._compress, AUTHENTICATED),
    c.Select: (Session._select, AUTHENTICATED),
    c.Create: (Session._create, AUTHENTICATED),
    c.Delete: (Session._delete, AUTHENTICATED),
    c.Rename: (Session._rename, AUTHENTICATED),
    c.Subscribe: (Session._subscribe, AUTHENTICATED),
    c.Unsubscribe: (Session._unsubscribe, AUTHENTICATED),
    c.List: (Session._list, AUTHENTICATED),
    c.Lsub: (Session._lsub, AUTHENTICATED),
    c.Status: (Session._status, AUTHENTICATED),
    c.Append: (Session._append, AUTHENTICATED),
    c.GetQuotaRoot: (Session._getquotaroot, AUTHENTICATED),
    c.GetQuota: (Session._getquota, AUTHENTICATED),
    c.SetQuota: (Session._setquota, AUTHENTICATED),
    c.Check: (Session._noop, SELECTED),
    c.Close: (Session._close, SELECTED),
    c.Unselect: (Session._unselect, SELECTED),
    c.Expunge: (Session._expunge, SELECTED),
    c.Fetch: (Session._fetch, SELECTED),
    c.Store: (Session._store, SELECTED),
    c.Search: (Session._search, SELECTED),
    c.Copy: (Session._copy, SELECTED),
    c.Move: (Session._copy, SELECTED),
}
