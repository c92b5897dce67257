"""The TOML configuration, loaded into frozen, validated dataclasses.

Invariants: every path is absolute (relative ones resolve against the config
file's directory); every key the file contains is known (an unknown key is an
error naming it, e.g. ``listeners[1].prot``); every value has been checked, so
the rest of the daemon never re-validates configuration.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from runbox_mta.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/runbox-mta/runbox-mta.toml")
SQLITE_FILENAME = "runbox-mta.sqlite3"

PROTOCOLS = ("smtp", "submission", "imap", "pop3")
TLS_MODES = ("starttls", "implicit", "none")
# Outbound TLS per destination domain: "may" is opportunistic STARTTLS
# (Postfix `may`), "verify" demands a certificate valid for the MX host name
# and never falls back to plaintext (Postfix `verify`).
OUTBOUND_TLS_POLICIES = ("may", "verify")

_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class DatabaseConfig:
    url: str  # always a full SQLAlchemy async URL after loading


@dataclass(frozen=True)
class SniCertificate:
    hostname: str
    cert: Path
    key: Path


@dataclass(frozen=True)
class TlsConfig:
    cert: Path
    key: Path
    sni: tuple[SniCertificate, ...] = ()


@dataclass(frozen=True)
class ListenerConfig:
    protocol: str
    bind: str
    port: int
    tls: str
    max_connections: int = 1000


@dataclass(frozen=True)
class LimitsConfig:
    message_size: int = 50 * 1024**2  # SPEC §8 default 50 MB
    smtp_line_length: int = 1000  # RFC 5321 §4.5.3.1.6 text line, CRLF included
    imap_command_length: int = 64 * 1024  # excluding literals (SPEC §8)
    imap_literal_size: int = 50 * 1024**2  # one literal; ties to APPENDLIMIT
    recipients_per_message: int = 100  # RFC 5321 §4.5.3.1.8 minimum buffer
    connections_per_address: int = 20
    smtp_idle_timeout: float = 300.0  # RFC 5321 §4.5.3.2.7: 5 minutes
    imap_idle_timeout: float = 1800.0  # RFC 9051 §5.4: at least 30 minutes
    imap_login_timeout: float = 60.0
    pop3_idle_timeout: float = 600.0  # RFC 1939 §3: at least 10 minutes


@dataclass(frozen=True)
class AuthConfig:
    # RFC 9106 §4 second recommended option (64 MiB, t=3, p=4).
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65536
    argon2_parallelism: int = 4
    # Failed-login limiter: after `free_failures` failures from one client
    # address, each further attempt waits base*2^n up to max_delay seconds;
    # counters decay after `window` seconds without failures.
    free_failures: int = 3
    failure_base_delay: float = 1.0
    failure_max_delay: float = 30.0
    failure_window: float = 900.0
    # An account alone (all addresses together) is locked for `window` only
    # after this many failures; higher than the per-address limit so a third
    # party hits its own address limit long before it can lock a user out.
    account_lockout_failures: int = 50


@dataclass(frozen=True)
class OutboundConfig:
    routes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    port: int = 25
    nameservers: tuple[str, ...] = ()
    tls_policy: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # domain -> may|verify
    # false: this daemon queues mail but leaves delivery to others sharing the database.
    enabled: bool = True
    max_queue_lifetime: float = 5 * 86400.0  # SPEC §5: retries for 5 days, then a bounce
    delay_warning: float = 4 * 3600.0  # RFC 3464 "delayed" DSN once mail has waited this long
    # Back-off after the n-th failed attempt: retry_base * 2^(n-1), at most
    # retry_max, with jitter (Postfix: 300 s minimal, 4000 s maximal back-off).
    retry_base: float = 300.0
    retry_max: float = 3600.0
    max_per_destination: int = 4  # parallel connections to one recipient domain
    poll_interval: float = 1.0  # how often to look for due mail (other daemons enqueue too)
    status_interval: float = 300.0  # how often the worker logs the queue's state (counts only) while it holds mail
    mta_sts_port: int = 443  # HTTPS port of mta-sts.DOMAIN policy hosts (RFC 8461 §3.3; tests change it)
    # CA certificates (PEM) trusted beside the system's wherever outbound TLS is
    # authenticated by PKIX: MTA-STS policy hosts and MX hosts, `verify` domains.
    ca_file: Path | None = None


@dataclass(frozen=True)
class LogConfig:
    # "debug" is the operator's explicit opt-in to traffic details
    # (client addresses); every other level logs events only (SPEC §7).
    level: str = "info"


@dataclass(frozen=True)
class Config:
    path: Path
    hostname: str
    data_dir: Path
    user: str | None  # drop root to this user after binding; None: stay as started
    database: DatabaseConfig
    tls: TlsConfig
    listeners: tuple[ListenerConfig, ...]
    limits: LimitsConfig
    auth: AuthConfig
    outbound: OutboundConfig
    log: LogConfig

    @property
    def debug(self) -> bool:
        return self.log.level == "debug"


def load_config(path: Path | str) -> Config:
    """Read and validate the TOML file at `path`; raise ConfigError naming the culprit."""
    path = Path(path).absolute()
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config file: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None
    try:
        return _build(path, raw)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


class _Table:
    """A TOML table being consumed key by key, so leftovers are reported as unknown."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where or 'top level'}: expected a table")
        self._data = dict(data)
        self._where = where

    def name(self, key: str) -> str:
        return f"{self._where}.{key}" if self._where else key

    def take(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self._data:
            if default is ...:
                raise ConfigError(f"{self.name(key)}: missing required key")
            return default
        value = self._data.pop(key)
        # bool is an int in Python; never accept true for a number.
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            raise ConfigError(f"{self.name(key)}: expected {_kind_name(kind)}, got {value!r}")
        return value

    def keys(self) -> list[str]:
        return list(self._data)

    def table(self, key: str) -> _Table:
        return _Table(self._data.pop(key, {}), self.name(key))

    def finish(self) -> None:
        for key in self._data:
            raise ConfigError(f"{self.name(key)}: unknown key")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "an array", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def parse_size(text: str | int, where: str = "size") -> int:
    """Parse a byte count such as 2G, 512K, 50M or a bare integer."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)B?\s*", str(text), re.IGNORECASE)
        if not match:
            raise ConfigError(f"{where}: expected a size such as 50M or 2G, got {text!r}")
        value = int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    if value <= 0:
        raise ConfigError(f"{where}: must be positive, got {text!r}")
    return value


def parse_duration(text: str | int | float, where: str) -> float:
    """Parse seconds given as a number or as 30s, 5m, 1h, 2d."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
        if not match:
            raise ConfigError(f"{where}: expected a duration such as 30s, 5m or 1h, got {text!r}")
        value = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if value <= 0:
        raise ConfigError(f"{where}: must be positive, got {text!r}")
    return value


def _path(base: Path, value: str) -> Path:
    return (base / Path(value).expanduser()).resolve()


def _hostname(value: str, where: str) -> str:
    label = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
    if not re.fullmatch(rf"{label}(\.{label})*\.?", value) or len(value) > 253:
        raise ConfigError(f"{where}: not a valid host name: {value!r}")
    return value.rstrip(".").lower()


def _host_port(value: str, where: str) -> str:
    match = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d{1,5})", value)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(f"{where}: expected host:port, got {value!r}")
    return value


def _build(path: Path, raw: dict) -> Config:
    base = path.parent
    top = _Table(raw, "")
    hostname = _hostname(top.take("hostname", str), "hostname")
    data_dir = _path(base, top.take("data_dir", str, "../var"))
    user = top.take("user", str, "") or None

    db = top.table("database")
    url = db.take("url", str, "")
    db.finish()
    if not url:
        url = f"sqlite+aiosqlite:///{data_dir / SQLITE_FILENAME}"
    elif not url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
        raise ConfigError(
            "database.url: expected sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB"
        )

    tls = _build_tls(base, top.table("tls"))

    listeners_raw = top.take("listeners", list, [])
    listeners = tuple(_build_listener(item, f"listeners[{i}]") for i, item in enumerate(listeners_raw))
    seen: set[tuple[str, int]] = set()
    for i, listener in enumerate(listeners):
        if listener.port and (listener.bind, listener.port) in seen:  # port 0: any free port
            raise ConfigError(f"listeners[{i}]: {listener.bind} port {listener.port} is used twice")
        seen.add((listener.bind, listener.port))

    limits = _build_limits(top.table("limits"))
    auth = _build_auth(top.table("auth"))
    outbound = _build_outbound(base, top.table("outbound"))

    log = top.table("log")
    level = log.take("level", str, "info").lower()
    log.finish()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log.level: expected debug, info, warning or error, got {level!r}")

    top.finish()
    return Config(
        path=path, hostname=hostname, data_dir=data_dir, user=user,
        database=DatabaseConfig(url=url), tls=tls, listeners=listeners, limits=limits,
        auth=auth, outbound=outbound, log=LogConfig(level=level),
    )


def _build_tls(base: Path, table: _Table) -> TlsConfig:
    cert = _path(base, table.take("cert", str, "../certs/server.pem"))
    key = _path(base, table.take("key", str, "../certs/server.key"))
    sni = []
    for i, item in enumerate(table.take("sni", list, [])):
        entry = _Table(item, f"tls.sni[{i}]")
        sni.append(SniCertificate(
            hostname=_hostname(entry.take("hostname", str), entry.name("hostname")),
            cert=_path(base, entry.take("cert", str)),
            key=_path(base, entry.take("key", str)),
        ))
        entry.finish()
    table.finish()
    return TlsConfig(cert=cert, key=key, sni=tuple(sni))


def _build_listener(item: Any, where: str) -> ListenerConfig:
    table = _Table(item, where)
    protocol = table.take("protocol", str)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"{where}.protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    bind = table.take("bind", str, "127.0.0.1")
    port = table.take("port", int)
    if not 0 <= port < 65536:
        raise ConfigError(f"{where}.port: expected 0-65535, got {port}")
    tls = table.take("tls", str, "starttls")
    if tls not in TLS_MODES:
        raise ConfigError(f"{where}.tls: expected starttls, implicit or none, got {tls!r}")
    if tls == "none" and protocol != "smtp":
        # Logins must never cross the wire in clear text (SPEC §3).
        raise ConfigError(f"{where}.tls: \"none\" is only allowed for protocol smtp")
    max_connections = table.take("max_connections", int, ListenerConfig.max_connections)
    if max_connections < 1:
        raise ConfigError(f"{where}.max_connections: must be positive")
    table.finish()
    return ListenerConfig(protocol, bind, port, tls, max_connections)


def _build_limits(table: _Table) -> LimitsConfig:
    defaults = LimitsConfig()
    values: dict[str, Any] = {}
    for name in ("message_size", "imap_command_length", "imap_literal_size"):
        values[name] = parse_size(table.take(name, (str, int), getattr(defaults, name)), table.name(name))
    for name in ("smtp_line_length", "recipients_per_message", "connections_per_address"):
        values[name] = table.take(name, int, getattr(defaults, name))
        if values[name] < 1:
            raise ConfigError(f"{table.name(name)}: must be positive")
    if values["smtp_line_length"] < 1000:
        raise ConfigError(f"{table.name('smtp_line_length')}: RFC 5321 requires at least 1000")
    for name in ("smtp_idle_timeout", "imap_idle_timeout", "imap_login_timeout", "pop3_idle_timeout"):
        values[name] = parse_duration(
            table.take(name, (str, int, float), getattr(defaults, name)), table.name(name)
        )
    table.finish()
    return LimitsConfig(**values)


def _build_auth(table: _Table) -> AuthConfig:
    defaults = AuthConfig()
    values: dict[str, Any] = {}
    for name in ("argon2_time_cost", "argon2_memory_kib", "argon2_parallelism",
                 "free_failures", "account_lockout_failures"):
        values[name] = table.take(name, int, getattr(defaults, name))
        if values[name] < (0 if name == "free_failures" else 1):
            raise ConfigError(f"{table.name(name)}: must be positive")
    if values["argon2_memory_kib"] < 8 * values["argon2_parallelism"]:
        raise ConfigError(f"{table.name('argon2_memory_kib')}: must be at least 8 x argon2_parallelism")
    for name in ("failure_base_delay", "failure_max_delay", "failure_window"):
        values[name] = parse_duration(
            table.take(name, (str, int, float), getattr(defaults, name)), table.name(name)
        )
    table.finish()
    return AuthConfig(**values)


def _build_outbound(base: Path, table: _Table) -> OutboundConfig:
    routes_table = table.table("routes")
    routes = {}
    for domain in routes_table.keys():
        target = routes_table.take(domain, str)
        if domain != "*":
            domain = _hostname(domain, routes_table.name(domain))
        routes[domain] = _host_port(target, routes_table.name(domain))
    port = table.take("port", int, 25)
    if not 0 < port < 65536:
        raise ConfigError(f"{table.name('port')}: expected 1-65535, got {port}")
    mta_sts_port = table.take("mta_sts_port", int, 443)
    if not 0 < mta_sts_port < 65536:
        raise ConfigError(f"{table.name('mta_sts_port')}: expected 1-65535, got {mta_sts_port}")
    ca_file = table.take("ca_file", str, "")
    nameservers = table.take("nameservers", list, [])
    for i, server in enumerate(nameservers):
        if not isinstance(server, str):
            raise ConfigError(f"{table.name('nameservers')}[{i}]: expected a string")
    policy_table = table.table("tls_policy")
    tls_policy = {}
    for domain in policy_table.keys():
        policy = policy_table.take(domain, str)
        if policy not in OUTBOUND_TLS_POLICIES:
            raise ConfigError(f"{policy_table.name(domain)}: expected may or verify, got {policy!r}")
        tls_policy[_hostname(domain, policy_table.name(domain))] = policy
    defaults = OutboundConfig()
    durations = {name: parse_duration(table.take(name, (str, int, float), getattr(defaults, name)), table.name(name))
                 for name in ("max_queue_lifetime", "delay_warning", "retry_base", "retry_max", "poll_interval",
                              "status_interval")}
    if durations["retry_max"] < durations["retry_base"]:
        raise ConfigError(f"{table.name('retry_max')}: must not be less than retry_base")
    max_per_destination = table.take("max_per_destination", int, defaults.max_per_destination)
    if max_per_destination < 1:
        raise ConfigError(f"{table.name('max_per_destination')}: must be positive")
    enabled = table.take("enabled", bool, defaults.enabled)
    table.finish()
    return OutboundConfig(routes=MappingProxyType(routes), port=port, nameservers=tuple(nameservers),
                          tls_policy=MappingProxyType(tls_policy), enabled=enabled,
                          max_per_destination=max_per_destination, mta_sts_port=mta_sts_port,
                          ca_file=_path(base, ca_file) if ca_file else None, **durations)
