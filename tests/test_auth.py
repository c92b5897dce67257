"""Authentication (SPEC §7): Argon2id, app passwords, the failed-login limiter,
the shared AuthService and SASL decoding.

Argon2 is real but cheap here (8 KiB, one pass); only tests may do that.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import math
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import argon2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runbox_mta.auth.app_passwords import (
    ALPHABET,
    LENGTH,
    SCOPES,
    generate_app_password,
    looks_like_app_password,
    normalise_app_password,
    parse_scopes,
)
from runbox_mta.auth.limiter import LoginLimiter
from runbox_mta.net.clients import address_key
from runbox_mta.auth.passwords import PasswordHasher
from runbox_mta.auth.sasl import (
    LOGIN_PASSWORD_CHALLENGE,
    LOGIN_USERNAME_CHALLENGE,
    Credentials,
    SaslCancelled,
    SaslError,
    decode_login_password,
    decode_login_username,
    decode_plain,
)
from runbox_mta.auth.service import MAIN_PASSWORD, AuthFailure, AuthService
from runbox_mta.config import AuthConfig
from runbox_mta.errors import RunboxError

CHEAP = AuthConfig(argon2_time_cost=1, argon2_memory_kib=8, argon2_parallelism=1)
OLD = AuthConfig(argon2_time_cost=2, argon2_memory_kib=16, argon2_parallelism=1)
WINDOW = CHEAP.failure_window

PASSWORD = "correct horse battery staple"
ADDRESS = "ola@example.test"
CLIENT = "192.0.2.10"


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


class CountingHasher(PasswordHasher):
    """Counts Argon2 verifications (the dummy one included) and where they ran."""

    def __init__(self, config: AuthConfig) -> None:
        super().__init__(config)
        self.verifications = 0
        self.threads: set[str] = set()

    def verify(self, password_hash: str, password: str) -> bool:
        self.verifications += 1
        self.threads.add(threading.current_thread().name)
        return super().verify(password_hash, password)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordedSleeps(list):
    """Stands in for asyncio.sleep: remembers the delays and moves the fake clock on."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self._clock = clock

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)
        self._clock.advance(seconds)


@dataclass(frozen=True)
class AppPassword:  # the attributes of store.api.AppPasswordCredential
    id: int
    label: str
    scopes: tuple[str, ...]
    password_hash: str


@dataclass(frozen=True)
class Login:  # the attributes of store.api.LoginRecord
    account_id: int
    address: str
    password_hash: str
    app_passwords_only: bool = False
    disabled: bool = False
    app_passwords: tuple[AppPassword, ...] = ()


@dataclass
class MemoryStore:
    """A CredentialStore over a dict, for the service's pure logic."""

    logins: dict[str, Login] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)
    fail_updates: bool = False

    def add(self, login: Login) -> Login:
        self.logins[login.address] = login
        return login

    async def get_login(self, address: str) -> Login | None:
        self.lookups.append(address)
        return self.logins.get(address)

    async def update_password_hash(self, account_id: int, password_hash: str) -> None:
        if self.fail_updates:
            raise ConnectionError("database went away")
        for address, login in self.logins.items():
            if login.account_id == account_id:
                self.logins[address] = dataclasses.replace(login, password_hash=password_hash)

    async def update_app_password_hash(self, app_password_id: int, password_hash: str) -> None:
        for address, login in self.logins.items():
            apps = tuple(
                dataclasses.replace(app, password_hash=password_hash) if app.id == app_password_id else app
                for app in login.app_passwords
            )
            self.logins[address] = dataclasses.replace(login, app_passwords=apps)


@pytest.fixture
def hasher():
    hasher = CountingHasher(CHEAP)
    yield hasher
    hasher.close()


@pytest.fixture
def memory() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sleeps(clock) -> RecordedSleeps:
    return RecordedSleeps(clock)


@pytest.fixture
def make_service(memory, hasher, clock, sleeps):
    def make(config: AuthConfig = CHEAP, debug: bool = False) -> AuthService:
        return AuthService(memory, config, clock=clock, hasher=hasher, sleep=sleeps, debug=debug)
    return make


@pytest.fixture
def service(make_service) -> AuthService:
    return make_service()


def add_account(memory: MemoryStore, hasher: PasswordHasher, **overrides) -> Login:
    values: dict[str, Any] = dict(account_id=1, address=ADDRESS, password_hash=hasher.hash(PASSWORD))
    return memory.add(Login(**(values | overrides)))


def old_hash(password: str) -> str:
    """A hash made before the operator changed the Argon2 parameters to CHEAP's."""
    return argon2.PasswordHasher(time_cost=OLD.argon2_time_cost, memory_cost=OLD.argon2_memory_kib,
                                 parallelism=OLD.argon2_parallelism).hash(password)


def app_password(hasher: PasswordHasher, secret: str, *, id: int = 7, label: str = "phone",
                 scopes: tuple[str, ...] = SCOPES) -> AppPassword:
    return AppPassword(id, label, scopes, hasher.hash(normalise_app_password(secret)))


# --- passwords.py ---------------------------------------------------------------------


def test_hashes_are_argon2id_with_the_configured_parameters(hasher):
    parameters = argon2.extract_parameters(hasher.hash(PASSWORD))
    assert parameters.type is argon2.Type.ID
    assert (parameters.time_cost, parameters.memory_cost, parameters.parallelism) == (1, 8, 1)


def test_each_hash_has_its_own_salt(hasher):
    assert hasher.hash(PASSWORD) != hasher.hash(PASSWORD)


def test_verify_accepts_the_password_and_refuses_anything_else(hasher):
    password_hash = hasher.hash(PASSWORD)
    assert hasher.verify(password_hash, PASSWORD)
    assert not hasher.verify(password_hash, PASSWORD.upper())
    assert not hasher.verify(password_hash, "")


@pytest.mark.parametrize("password_hash", [
    "",
    "not a hash",
    "$argon2id$v=19$m=8,t=1,p=1$garbage",
    "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW",  # bcrypt
    "$argon2id$v=19$m=8,t=1,p=1$ø$ø",
])
def test_verify_refuses_malformed_hashes_without_raising(hasher, password_hash):
    assert hasher.verify(password_hash, PASSWORD) is False


def test_verify_refuses_unencodable_passwords_without_raising(hasher):
    assert hasher.verify(hasher.hash(PASSWORD), "lone \ud800 surrogate") is False


def test_needs_rehash_when_the_parameters_differ(hasher):
    assert not hasher.needs_rehash(hasher.hash(PASSWORD))
    assert hasher.needs_rehash(old_hash(PASSWORD))
    argon2i = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, type=argon2.Type.I)
    assert hasher.needs_rehash(argon2i.hash(PASSWORD))
    assert hasher.needs_rehash("not a hash")


async def test_async_variants_run_in_the_argon2_threads_not_on_the_event_loop(hasher):
    password_hash = await hasher.hash_async(PASSWORD)
    assert await hasher.verify_async(password_hash, PASSWORD)
    assert not await hasher.verify_dummy_async(PASSWORD)
    assert hasher.threads and all(name.startswith("argon2") for name in hasher.threads)


def test_the_dummy_verification_is_a_real_one_that_always_fails(hasher):
    assert hasher.verify_dummy(PASSWORD) is False
    assert hasher.verifications == 1


# --- app_passwords.py -----------------------------------------------------------------


def test_app_passwords_are_four_groups_of_four_unambiguous_symbols():
    group = f"[{ALPHABET}]{{4}}"
    for _ in range(100):
        assert re.fullmatch(f"{group}-{group}-{group}-{group}", generate_app_password())
    assert not set(ALPHABET) & set("0o1l")


def test_app_passwords_carry_at_least_80_bits_of_entropy():
    assert len(set(ALPHABET)) == len(ALPHABET)
    assert LENGTH * math.log2(len(ALPHABET)) >= 80
    assert len({generate_app_password() for _ in range(1000)}) == 1000


@pytest.mark.parametrize("typed", [
    "k7mq-2xwd-pa9e-hn4r",
    "k7mq 2xwd pa9e hn4r",
    "K7MQ-2XWD-PA9E-HN4R",
    "k7mq2xwdpa9ehn4r",
    " k7mq - 2xwd\tpa9e hn4r ",
])
def test_app_passwords_normalise_however_they_are_typed(typed):
    assert normalise_app_password(typed) == "k7mq2xwdpa9ehn4r"
    assert looks_like_app_password(typed)


@pytest.mark.parametrize("text", [
    "correct horse battery staple",
    "k7mq-2xwd-pa9e-hn4",  # one short
    "k7mq-2xwd-pa9e-hn4rr",  # one long
    "k7mq-2xwd-pa9e-hn4l",  # "l" is never generated
    "",
])
def test_other_passwords_do_not_look_like_app_passwords(text):
    assert not looks_like_app_password(text)


@pytest.mark.parametrize("text, scopes", [
    ("imap", ("imap",)),
    ("pop3,imap", ("imap", "pop3")),
    ("smtp, IMAP", ("imap", "smtp")),
    ("imap,imap", ("imap",)),
    ("imap,pop3,smtp", SCOPES),
])
def test_parse_scopes(text, scopes):
    assert parse_scopes(text) == scopes


@pytest.mark.parametrize("text", ["", "imap,", "imap,,pop3", "jmap", "imap,submission"])
def test_parse_scopes_refuses_unknown_or_empty_scopes(text):
    with pytest.raises(RunboxError, match="app password scope"):
        parse_scopes(text)


# --- limiter.py -----------------------------------------------------------------------


@pytest.fixture
def limiter(clock) -> LoginLimiter:
    return LoginLimiter(CHEAP, clock=clock)


def fail(limiter: LoginLimiter, times: int, client: str = CLIENT, account: str = ADDRESS) -> None:
    for _ in range(times):
        limiter.record_failure(client, account)


def test_first_failures_are_free_then_the_delay_doubles_up_to_the_cap(limiter, clock):
    delays = []
    for _ in range(10):
        delay = limiter.reserve_attempt(CLIENT)
        delays.append(delay)
        clock.advance(delay)  # the attempt waits its turn, then fails
        limiter.record_failure(CLIENT, ADDRESS)
    assert delays == [0, 0, 0, 1, 2, 4, 8, 16, 30, 30]


def test_parallel_attempts_from_one_address_queue_one_delay_apart(limiter):
    fail(limiter, 4)  # the next attempt waits 2 s
    assert [limiter.reserve_attempt(CLIENT) for _ in range(3)] == [2, 4, 6]


def test_one_address_alone_never_locks_the_account(limiter):
    fail(limiter, 10 * CHEAP.account_lockout_failures)
    assert limiter.address_share == 8  # 3 free + 5 doublings reach 30 s
    assert not limiter.is_account_locked(ADDRESS)
    assert limiter.reserve_attempt(CLIENT) == CHEAP.failure_max_delay


def test_many_addresses_lock_the_account_temporarily(limiter, clock):
    for n in range(6):
        fail(limiter, 10, client=f"198.51.100.{n}")
    assert not limiter.is_account_locked(ADDRESS)  # 6 x 8 = 48 of 50
    fail(limiter, 2, client="198.51.100.6")
    assert limiter.is_account_locked(ADDRESS)
    assert not limiter.is_account_locked("someone-else@example.test")
    clock.advance(WINDOW)
    assert not limiter.is_account_locked(ADDRESS)


def test_a_success_forgives_the_typos_it_explains(limiter):
    fail(limiter, 5)
    fail(limiter, 5, client="203.0.113.9")
    limiter.record_success(CLIENT, ADDRESS)
    assert limiter.reserve_attempt(CLIENT) == 0
    assert limiter.reserve_attempt("203.0.113.9") > 0  # other addresses keep their count


def test_a_success_on_another_account_does_not_reset_the_throttle(limiter):
    fail(limiter, 5, account="victim@example.test")
    limiter.record_success(CLIENT, "attacker@example.test")
    assert limiter.reserve_attempt(CLIENT) > 0


def test_counters_decay_after_a_window_without_failures(limiter, clock):
    fail(limiter, 5)
    clock.advance(WINDOW - 1)
    fail(limiter, 1)  # a failure restarts the window
    clock.advance(WINDOW - 1)
    assert limiter.reserve_attempt(CLIENT) > 0
    clock.advance(1)
    assert limiter.reserve_attempt(CLIENT) == 0


def test_memory_stays_bounded_when_addresses_and_names_rotate(clock):
    limiter = LoginLimiter(CHEAP, clock=clock, max_entries=100)
    fail(limiter, 3, client="10.255.0.1")  # throttled, then pushed out by the rotation
    for n in range(1000):
        limiter.record_failure(f"10.0.{n // 256}.{n % 256}", f"user{n}@example.test")
    assert limiter.table_sizes() == (100, 100)
    assert limiter.reserve_attempt("10.255.0.1") == 0
    fail(limiter, 2, client="10.0.3.231")  # the newest address (n = 999) kept its first failure
    assert limiter.reserve_attempt("10.0.3.231") == 1


def test_expired_entries_are_dropped(limiter, clock):
    fail(limiter, 1, client="10.0.0.1")
    clock.advance(WINDOW)
    fail(limiter, 1, client="10.0.0.2")
    assert limiter.table_sizes() == (1, 1)


@pytest.mark.parametrize("client, key", [
    ("192.0.2.1", "192.0.2.1"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("fe80::1%eth0", "fe80::/64"),
    ("/run/runbox.sock", "/run/runbox.sock"),
])
def test_clients_are_keyed_by_ipv4_address_or_ipv6_64(client, key):
    assert address_key(client) == key


def test_a_host_cannot_escape_its_delay_by_rotating_through_its_64(limiter):
    for n in range(5):
        limiter.record_failure(f"2001:db8:1:2::{n + 1:x}", ADDRESS)
    assert limiter.reserve_attempt("2001:db8:1:2:ffff::1") == 4
    assert limiter.reserve_attempt("2001:db8:1:3::1") == 0


# --- service.py -----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", SCOPES)
async def test_the_main_password_logs_in_on_every_protocol(service, memory, hasher, protocol):
    add_account(memory, hasher)
    result = await service.authenticate(ADDRESS, PASSWORD, protocol=protocol, client_address=CLIENT)
    assert (result.ok, result.failure, result.account_id, result.address, result.via) == (
        True, None, 1, ADDRESS, MAIN_PASSWORD)


async def test_login_names_are_case_insensitive(service, memory, hasher):
    add_account(memory, hasher)
    result = await service.authenticate("Ola@Example.TEST", PASSWORD, protocol="imap", client_address=CLIENT)
    assert result.ok and result.address == ADDRESS
    assert memory.lookups == [ADDRESS]


async def test_a_wrong_password_and_an_unknown_account_look_the_same_to_the_client(service, memory, hasher):
    add_account(memory, hasher)
    wrong = await service.authenticate(ADDRESS, "guess", protocol="imap", client_address=CLIENT)
    unknown = await service.authenticate("nobody@example.test", "guess",
                                         protocol="imap", client_address=CLIENT)
    client_view = lambda r: (r.ok, r.failure, r.account_id, r.address, r.via)  # noqa: E731
    assert client_view(wrong) == client_view(unknown) == (False, AuthFailure.INVALID, None, None, None)
    assert "wrong password" in wrong.detail and "unknown account" in unknown.detail


@pytest.mark.parametrize("login", ["nobody@example.test", "nul\0@example.test", "x" * 1000 + "@example.test"])
async def test_an_unknown_account_still_costs_one_real_verification(service, hasher, login):
    result = await service.authenticate(login, PASSWORD, protocol="imap", client_address=CLIENT)
    assert not result.ok
    assert hasher.verifications == 1


async def test_implausible_login_names_never_reach_the_store(service, memory):
    await service.authenticate("nul\0@example.test", PASSWORD, protocol="imap", client_address=CLIENT)
    await service.authenticate("x" * 321, PASSWORD, protocol="imap", client_address=CLIENT)
    assert memory.lookups == []


async def test_an_ordinary_guess_costs_one_verification_whatever_the_account_has(service, memory, hasher):
    apps = tuple(app_password(hasher, generate_app_password(), id=n, label=f"device {n}") for n in range(3))
    add_account(memory, hasher, app_passwords=apps)
    hasher.verifications = 0
    await service.authenticate(ADDRESS, "guess", protocol="imap", client_address=CLIENT)
    assert hasher.verifications == 1
    await service.authenticate(ADDRESS, generate_app_password(), protocol="imap", client_address=CLIENT)
    assert hasher.verifications == 1 + 4  # an app-password-shaped guess tries them all, and the main one


async def test_an_app_password_logs_in_however_it_is_typed(service, memory, hasher):
    secret = generate_app_password()
    add_account(memory, hasher, app_passwords=(app_password(hasher, secret, label="Ola's phone"),))
    for typed in (secret, secret.replace("-", " ").upper(), secret.replace("-", "")):
        result = await service.authenticate(ADDRESS, typed, protocol="imap", client_address=CLIENT)
        assert result.ok and result.via == "Ola's phone"


async def test_an_imap_only_app_password_works_for_imap_and_nothing_else(service, memory, hasher):
    secret = generate_app_password()
    add_account(memory, hasher, app_passwords=(app_password(hasher, secret, scopes=("imap",)),))
    assert (await service.authenticate(ADDRESS, secret, protocol="imap", client_address=CLIENT)).ok
    for protocol in ("smtp", "pop3"):
        result = await service.authenticate(ADDRESS, secret, protocol=protocol, client_address=CLIENT)
        assert result.failure is AuthFailure.INVALID
        assert f"lacks the {protocol} scope" in result.detail


@pytest.mark.parametrize("protocol", SCOPES)
async def test_app_passwords_only_refuses_the_main_password_everywhere(service, memory, hasher, protocol):
    secret = generate_app_password()
    add_account(memory, hasher, app_passwords_only=True, app_passwords=(app_password(hasher, secret),))
    refused = await service.authenticate(ADDRESS, PASSWORD, protocol=protocol, client_address=CLIENT)
    assert refused.failure is AuthFailure.INVALID and "app passwords only" in refused.detail
    accepted = await service.authenticate(ADDRESS, secret, protocol=protocol, client_address=CLIENT)
    assert accepted.ok and accepted.via == "phone"


async def test_a_disabled_account_fails_even_with_the_right_password(service, memory, hasher):
    add_account(memory, hasher, disabled=True)
    result = await service.authenticate(ADDRESS, PASSWORD, protocol="imap", client_address=CLIENT)
    assert result.failure is AuthFailure.INVALID and "disabled" in result.detail


async def test_a_revoked_app_password_fails(service, memory, hasher):
    secret = generate_app_password()
    login = add_account(memory, hasher, app_passwords=(app_password(hasher, secret),))
    memory.add(dataclasses.replace(login, app_passwords=()))  # revoked
    result = await service.authenticate(ADDRESS, secret, protocol="imap", client_address=CLIENT)
    assert result.failure is AuthFailure.INVALID


async def test_an_old_hash_is_upgraded_on_successful_login(service, memory, hasher):
    add_account(memory, hasher, password_hash=old_hash(PASSWORD))
    assert (await service.authenticate(ADDRESS, PASSWORD, protocol="imap", client_address=CLIENT)).ok
    upgraded = memory.logins[ADDRESS].password_hash
    parameters = argon2.extract_parameters(upgraded)
    assert (parameters.time_cost, parameters.memory_cost) == (1, 8)
    assert hasher.verify(upgraded, PASSWORD)
    assert (await service.authenticate(ADDRESS, PASSWORD, protocol="imap", client_address=CLIENT)).ok
    assert memory.logins[ADDRESS].password_hash == upgraded  # current hashes are left alone


async def test_an_old_app_password_hash_is_upgraded_on_successful_login(service, memory, hasher):
    secret = generate_app_password()
    app = AppPassword(7, "phone", SCOPES, old_hash(normalise_app_password(secret)))
    add_account(memory, hasher, app_passwords=(app,))
    assert (await service.authenticate(ADDRESS, secret.upper(), protocol="smtp", client_address=CLIENT)).ok
    upgraded = memory.logins[ADDRESS].app_passwords[0].password_hash
    assert not hasher.needs_rehash(upgraded)
    assert hasher.verify(upgraded, normalise_app_password(secret))


async def test_a_failed_upgrade_does_not_fail_the_login(service, memory, hasher):
    add_account(memory, hasher, password_hash=old_hash(PASSWORD))
    memory.fail_updates = True
    assert (await service.authenticate(ADDRESS, PASSWORD, protocol="pop3", client_address=CLIENT)).ok


async def test_failed_logins_slow_the_client_down(service, memory, hasher, sleeps):
    add_account(memory, hasher)
    for _ in range(5):
        await service.authenticate(ADDRESS, "guess", protocol="imap", client_address=CLIENT)
    assert sleeps == [1, 2]
    assert (await service.authenticate(ADDRESS, PASSWORD, protocol="imap", client_address=CLIENT)).ok
    assert sleeps == [1, 2, 4]
    await service.authenticate(ADDRESS, PASSWORD, protocol="imap", client_address=CLIENT)
    assert sleeps == [1, 2, 4]  # the success forgave this address


async def test_a_locked_account_is_refused_without_checking_the_password(make_service, memory, hasher, clock):
    service = make_service(dataclasses.replace(CHEAP, account_lockout_failures=2))
    add_account(memory, hasher)
    for client in ("198.51.100.1", "198.51.100.2"):
        await service.authenticate(ADDRESS, "guess", protocol="smtp", client_address=client)
    hasher.verifications = 0
    locked = await service.authenticate(ADDRESS, PASSWORD, protocol="imap", client_address=CLIENT)
    assert locked.failure is AuthFailure.TEMPORARILY_LOCKED and hasher.verifications == 0
    clock.advance(WINDOW)
    assert (await service.authenticate(ADDRESS, PASSWORD, protocol="imap", client_address=CLIENT)).ok


async def test_the_log_detail_names_the_client_only_with_debug_on(make_service, memory, hasher):
    add_account(memory, hasher)
    attempt = dict(protocol="imap", client_address=CLIENT)
    quiet = await make_service().authenticate(ADDRESS, "guess", **attempt)
    debug = await make_service(debug=True).authenticate(ADDRESS, "guess", **attempt)
    assert CLIENT not in quiet.detail and PASSWORD not in quiet.detail
    assert CLIENT in debug.detail


async def test_passwords_never_reach_the_log(service, memory, hasher, caplog):
    caplog.set_level("DEBUG")
    add_account(memory, hasher)
    for password in (PASSWORD, "guess"):
        await service.authenticate(ADDRESS, password, protocol="imap", client_address=CLIENT)
    assert caplog.records and PASSWORD not in caplog.text and "guess" not in caplog.text


async def test_one_service_serves_every_protocol_at_once(service, memory, hasher):
    add_account(memory, hasher)
    results = await asyncio.gather(*(
        service.authenticate(ADDRESS, PASSWORD, protocol=protocol, client_address=f"192.0.2.{n}")
        for n, protocol in enumerate(SCOPES * 5)
    ))
    assert all(result.ok for result in results)


async def test_an_unknown_protocol_is_a_programming_error(service):
    with pytest.raises(ValueError):
        await service.authenticate(ADDRESS, PASSWORD, protocol="jmap", client_address=CLIENT)  # type: ignore[arg-type]


# --- AuthService on the real store (SQLite; PostgreSQL too when configured) ------------


async def test_the_service_on_the_real_store(store, hasher, clock, sleeps):
    service = AuthService(store, CHEAP, clock=clock, hasher=hasher, sleep=sleeps)
    await store.add_domain("example.test", "s1", "not a real key")
    await store.add_account("Ola@example.test", old_hash(PASSWORD))
    secret = generate_app_password()
    await store.add_app_password(ADDRESS, "phone", ["imap"], old_hash(normalise_app_password(secret)))
    attempt = dict(client_address=CLIENT)

    result = await service.authenticate(ADDRESS.upper(), PASSWORD, protocol="smtp", **attempt)
    assert (result.ok, result.address, result.via) == (True, ADDRESS, MAIN_PASSWORD)
    assert (await service.authenticate(ADDRESS, secret, protocol="imap", **attempt)).via == "phone"
    assert not (await service.authenticate(ADDRESS, secret, protocol="smtp", **attempt)).ok

    login = await store.get_login(ADDRESS)
    assert not hasher.needs_rehash(login.password_hash)  # both upgrades were persisted
    assert not hasher.needs_rehash(login.app_passwords[0].password_hash)
    assert (await service.authenticate(ADDRESS, PASSWORD, protocol="pop3", **attempt)).ok

    await store.update_account(ADDRESS, app_passwords_only=True)
    assert not (await service.authenticate(ADDRESS, PASSWORD, protocol="imap", **attempt)).ok
    await store.revoke_app_password(ADDRESS, "phone")
    assert not (await service.authenticate(ADDRESS, secret, protocol="imap", **attempt)).ok
    await store.remove_account(ADDRESS, purge=False)  # disabled
    await store.update_account(ADDRESS, app_passwords_only=False)
    disabled = await service.authenticate(ADDRESS, PASSWORD, protocol="imap", **attempt)
    assert "disabled" in disabled.detail


# --- sasl.py --------------------------------------------------------------------------


@pytest.mark.parametrize("line, username, password", [
    (b64("\0ola@example.test\0secret"), "ola@example.test", "secret"),
    (b64("ola@example.test\0ola@example.test\0secret"), "ola@example.test", "secret"),
    (b64("Ola@Example.test\0ola@example.test\0secret"), "ola@example.test", "secret"),
    (b64("\0ola@example.test\0pässwörd with spaces"), "ola@example.test", "pässwörd with spaces"),
    (b64("\0ola@example.test\0secret").encode() + b"\r\n", "ola@example.test", "secret"),
])
def test_plain_responses(line, username, password):
    assert decode_plain(line) == Credentials(username, password)


@pytest.mark.parametrize("line, error", [
    ("*", "cancelled"),
    ("=", "authzid NUL authcid NUL password"),
    ("", "authzid NUL authcid NUL password"),
    ("not base64!", "invalid base64"),
    ("AG9sYQBzZWNyZXQ", "invalid base64"),  # padding missing
    ("AG9s YQBz", "invalid base64"),
    ("é", "invalid base64"),
    (b64("ola\0secret"), "authzid NUL authcid NUL password"),
    (b64("a\0b\0c\0d"), "authzid NUL authcid NUL password"),
    (b64("mallory@example.test\0ola@example.test\0secret"), "authorization identity"),
    (b64("\0\0secret"), "empty user name or password"),
    (b64("\0ola@example.test\0"), "empty user name or password"),
    (b64(b"\0ola@example.test\0\xff\xfe"), "not valid UTF-8"),
])
def test_malformed_plain_responses(line, error):
    with pytest.raises(SaslError, match=error):
        decode_plain(line)


def test_star_cancels_as_its_own_error():
    with pytest.raises(SaslCancelled):
        decode_plain(b"*\r\n")
    with pytest.raises(SaslCancelled):
        decode_login_password("*")


def test_login_prompts():
    assert base64.b64decode(LOGIN_USERNAME_CHALLENGE) == b"Username:"
    assert base64.b64decode(LOGIN_PASSWORD_CHALLENGE) == b"Password:"


def test_login_responses():
    assert decode_login_username(b64("ola@example.test")) == "ola@example.test"
    assert decode_login_password(b64("pässwörd") + "\r\n") == "pässwörd"


@pytest.mark.parametrize("line, error", [
    ("=", "empty"),
    ("", "empty"),
    ("dXNlcg", "invalid base64"),
    (b64("ola\0"), "NUL"),
    (b64(b"\xc3"), "not valid UTF-8"),
])
def test_malformed_login_responses(line, error):
    with pytest.raises(SaslError, match=error):
        decode_login_username(line)


def test_credentials_hide_the_password_in_their_repr():
    assert "secret" not in repr(Credentials("ola", "secret"))


@settings(max_examples=300)
@given(st.one_of(st.binary(max_size=64), st.text(max_size=64), st.binary(max_size=48).map(base64.b64encode)))
def test_any_input_decodes_or_raises_sasl_error(line):
    for decode in (decode_plain, decode_login_username, decode_login_password):
        with contextlib.suppress(SaslError):
            decode(line)
