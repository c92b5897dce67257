"""The one login check behind SMTP AUTH, IMAP LOGIN/AUTHENTICATE and POP3 (SPEC §7).

Every protocol calls `AuthService.authenticate`, so the Argon2id cost, the
failed-login limiter, app-password scopes and the app-passwords-only policy
are the same on every port and no protocol becomes the weak door.

The client learns one of three things: success, ``invalid`` or
``temporarily-locked``. Whether the account exists, is disabled, or refused
a correct main password for app-passwords-only stays in `AuthResult.detail`,
which is for the operator's log and names the client address only when
debug logging is on. Suggested replies: IMAP ``NO [AUTHENTICATIONFAILED]``
/ ``NO [UNAVAILABLE]`` (RFC 5530), SMTP ``535 5.7.8`` / ``454 4.7.0``
(RFC 4954 §6), POP3 ``-ERR [AUTH]`` / ``-ERR [SYS/TEMP]`` (RFC 3206).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from runbox_mta.auth.app_passwords import SCOPES, looks_like_app_password, normalise_app_password
from runbox_mta.auth.limiter import LoginLimiter
from runbox_mta.auth.passwords import PasswordHasher
from runbox_mta.config import AuthConfig

logger = logging.getLogger(__name__)

Scope = Literal["imap", "pop3", "smtp"]

MAIN_PASSWORD = "password"  # AuthResult.via for the account's own password

# RFC 3696 errata 1690: at most 64 + 1 + 255 octets in an address. Longer or
# unprintable login names are never looked up (a NUL would even make
# PostgreSQL raise) but cost the same dummy verification as an unknown one.
MAX_LOGIN_LENGTH = 320


class StoredAppPassword(Protocol):
    """What the store returns for one app password (store.api.AppPasswordCredential)."""

    @property
    def id(self) -> int: ...
    @property
    def label(self) -> str: ...
    @property
    def scopes(self) -> tuple[str, ...]: ...
    @property
    def password_hash(self) -> str: ...


class StoredLogin(Protocol):
    """What the store returns for a login name (store.api.LoginRecord)."""

    @property
    def account_id(self) -> int: ...
    @property
    def address(self) -> str: ...
    @property
    def password_hash(self) -> str: ...
    @property
    def app_passwords_only(self) -> bool: ...
    @property
    def disabled(self) -> bool: ...
    @property
    def app_passwords(self) -> Sequence[StoredAppPassword]: ...


class CredentialStore(Protocol):
    """The part of store.api.Store that authentication needs."""

    async def get_login(self, address: str) -> StoredLogin | None: ...
    async def update_password_hash(self, account_id: int, password_hash: str) -> None: ...
    async def update_app_password_hash(self, app_password_id: int, password_hash: str) -> None: ...


class AuthFailure(enum.Enum):
    """The only failure distinction a client may see."""

    INVALID = "invalid"
    TEMPORARILY_LOCKED = "temporarily-locked"


@dataclass(frozen=True)
class AuthResult:
    ok: bool
    failure: AuthFailure | None  # None exactly when ok
    account_id: int | None
    address: str | None  # the account's stored address, when ok
    via: str | None  # MAIN_PASSWORD or the app password's label, when ok
    detail: str  # for the operator's log only; never sent to the client


@dataclass(frozen=True)
class _Credential:
    via: str
    password_hash: str
    scopes: tuple[str, ...]
    app_password_id: int | None  # None for the main password

    def secret(self, password: str) -> str:
        """What this credential's hash was made from: app passwords are normalised."""
        return password if self.app_password_id is None else normalise_app_password(password)


class AuthService:
    """Checks logins for every protocol; one instance per daemon, on its event loop."""

    def __init__(
        self,
        store: CredentialStore,
        config: AuthConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        hasher: PasswordHasher | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        debug: bool = False,
    ) -> None:
        self._store = store
        self._hasher = hasher or PasswordHasher(config)
        self._limiter = LoginLimiter(config, clock=clock)
        self._sleep = sleep
        self._debug = debug

    async def authenticate(
        self, address: str, password: str, *, protocol: Scope, client_address: str
    ) -> AuthResult:
        """Check `address`/`password` for `protocol` (the app-password scope it needs)."""
        if protocol not in SCOPES:
            raise ValueError(f"unknown protocol {protocol!r}")
        login = address.lower()
        delay = self._limiter.reserve_attempt(client_address)
        if delay:
            await self._sleep(delay)
        if self._limiter.is_account_locked(login):
            return self._failed(AuthFailure.TEMPORARILY_LOCKED, "account temporarily locked",
                                protocol, client_address)
        outcome = await self._check(login, password, protocol)
        if isinstance(outcome, str):
            self._limiter.record_failure(client_address, login)
            return self._failed(AuthFailure.INVALID, outcome, protocol, client_address)
        record, credential = outcome
        self._limiter.record_success(client_address, login)
        await self._upgrade(record, credential, password)
        return self._succeeded(record, credential, protocol, client_address)

    def close(self) -> None:
        """Stop the password hasher's worker threads (daemon shutdown)."""
        self._hasher.close()

    async def _check(
        self, login: str, password: str, protocol: str
    ) -> tuple[StoredLogin, _Credential] | str:
        """The account and credential this login opens, or why it is refused (for the log)."""
        record = await self._store.get_login(login) if _plausible(login) else None
        if record is None:
            await self._hasher.verify_dummy_async(password)
            return "unknown account"
        credential = await self._match(record, password)
        if record.disabled:
            return "account disabled"
        if credential is None:
            return "wrong password"
        if credential.app_password_id is None and record.app_passwords_only:
            return "main password refused: the account accepts app passwords only"
        if protocol not in credential.scopes:
            return f"app password {credential.via!r} lacks the {protocol} scope"
        return record, credential

    async def _match(self, record: StoredLogin, password: str) -> _Credential | None:
        """The credential `password` opens; every candidate is tried before giving up."""
        for credential in _candidates(record, password):
            if await self._hasher.verify_async(credential.password_hash, credential.secret(password)):
                return credential
        return None

    async def _upgrade(self, record: StoredLogin, credential: _Credential, password: str) -> None:
        """Re-hash with today's parameters (SPEC §7): only now is the password known."""
        if not self._hasher.needs_rehash(credential.password_hash):
            return
        new_hash = await self._hasher.hash_async(credential.secret(password))
        try:
            if credential.app_password_id is None:
                await self._store.update_password_hash(record.account_id, new_hash)
            else:
                await self._store.update_app_password_hash(credential.app_password_id, new_hash)
        except Exception:  # best effort: the login is valid; the next one retries
            logger.warning("could not store an upgraded password hash", exc_info=True)

    def _failed(self, failure: AuthFailure, reason: str, protocol: str, client: str) -> AuthResult:
        detail = f"{protocol} login failed: {reason}{self._from(client)}"
        logger.info("%s", detail)
        return AuthResult(False, failure, None, None, None, detail)

    def _succeeded(self, record: StoredLogin, credential: _Credential, protocol: str,
                   client: str) -> AuthResult:
        kind = "password" if credential.app_password_id is None else "app password"
        detail = f"{protocol} login: account {record.account_id} via {kind}{self._from(client)}"
        logger.info("%s", detail)
        return AuthResult(True, None, record.account_id, record.address, credential.via, detail)

    def _from(self, client: str) -> str:
        # Client addresses are traffic data: logged only on the operator's
        # explicit debug opt-in (SPEC §7).
        return f" from {client}" if self._debug else ""


def _plausible(login: str) -> bool:
    return 0 < len(login) <= MAX_LOGIN_LENGTH and login.isprintable()


def _candidates(record: StoredLogin, password: str) -> list[_Credential]:
    """The credentials to try, in order.

    App passwords only when the password has their shape, so an ordinary
    guess costs exactly one verification, as for an unknown account; the
    main password always, even on an app-passwords-only account, so the
    policy does not change the cost.
    """
    main = _Credential(MAIN_PASSWORD, record.password_hash, SCOPES, None)
    if not looks_like_app_password(password):
        return [main]
    apps = [_Credential(app.label, app.password_hash, tuple(app.scopes), app.id)
            for app in record.app_passwords]
    return [*apps, main]
