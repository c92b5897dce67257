"""Configuration: every error names its key; valid files load into frozen objects."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from runbox_mta.config import load_config, parse_duration, parse_size
from runbox_mta.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

MINIMAL = 'hostname = "mail.example.test"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "etc" / "runbox-mta.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_minimal_file_gets_documented_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.hostname == "mail.example.test"
    assert config.data_dir == tmp_path / "var"  # "../var" relative to the config file
    assert config.database.url == f"sqlite+aiosqlite:///{tmp_path / 'var' / 'runbox-mta.sqlite3'}"
    assert config.tls.cert == tmp_path / "certs" / "server.pem"
    assert config.limits.message_size == 50 * 1024**2
    assert config.limits.smtp_idle_timeout == 300
    assert config.limits.imap_idle_timeout == 1800
    assert config.limits.imap_login_timeout == 60
    assert config.limits.pop3_idle_timeout == 600
    assert config.outbound.port == 25
    assert config.outbound.enabled and config.outbound.max_per_destination == 4
    assert config.outbound.max_queue_lifetime == 5 * 86400 and config.outbound.delay_warning == 4 * 3600
    assert (config.outbound.retry_base, config.outbound.retry_max, config.outbound.poll_interval) == (300, 3600, 1)
    assert config.listeners == ()
    assert config.user is None


def test_config_is_immutable(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hostname = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.outbound.routes["x"] = "y"  # type: ignore[index]


def test_full_file_round_trips(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + '''
data_dir = "/srv/mail"
user = "runbox-mta"
[database]
url = "postgresql+asyncpg://runbox@db/runbox"
[tls]
cert = "tls/a.pem"
key = "tls/a.key"
[[tls.sni]]
hostname = "Mail.Example.NET"
cert = "tls/b.pem"
key = "tls/b.key"
[limits]
message_size = "10M"
smtp_idle_timeout = "2m"
imap_literal_size = 1048576
[auth]
argon2_time_cost = 1
argon2_memory_kib = 64
argon2_parallelism = 1
[outbound]
routes = { "example.net" = "127.0.0.1:2526", "*" = "[::1]:2527" }
port = 2525
nameservers = ["127.0.0.1:5353"]
enabled = false
tls_policy = { "Bank.Example" = "verify", "other.example" = "may" }
max_queue_lifetime = "2d"
delay_warning = "30m"
retry_base = 10
retry_max = "2h"
max_per_destination = 2
poll_interval = 0.1
[log]
level = "DEBUG"
[[listeners]]
protocol = "smtp"
port = 2525
tls = "none"
[[listeners]]
protocol = "imap"
bind = "::1"
port = 2993
tls = "implicit"
max_connections = 5
'''))
    assert config.data_dir == Path("/srv/mail")
    assert config.user == "runbox-mta"
    assert config.database.url == "postgresql+asyncpg://runbox@db/runbox"
    assert config.tls.cert == tmp_path / "etc" / "tls" / "a.pem"
    assert config.tls.sni[0].hostname == "mail.example.net"
    assert config.limits.message_size == 10 * 1024**2
    assert config.limits.smtp_idle_timeout == 120
    assert config.limits.imap_literal_size == 1048576
    assert config.outbound.routes == {"example.net": "127.0.0.1:2526", "*": "[::1]:2527"}
    assert config.outbound.nameservers == ("127.0.0.1:5353",)
    outbound = config.outbound
    assert outbound.tls_policy == {"bank.example": "verify", "other.example": "may"}
    assert not outbound.enabled and outbound.max_per_destination == 2 and outbound.poll_interval == 0.1
    assert (outbound.max_queue_lifetime, outbound.delay_warning, outbound.retry_base, outbound.retry_max) == (
        2 * 86400, 1800, 10, 7200)
    assert config.debug
    assert [(l.protocol, l.bind, l.port, l.tls, l.max_connections) for l in config.listeners] == [
        ("smtp", "127.0.0.1", 2525, "none", 1000),
        ("imap", "::1", 2993, "implicit", 5),
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        ('bogus = 1', "bogus: unknown key"),
        ('[tls]\ncertificate = "x"', "tls.certificate: unknown key"),
        ('[[listeners]]\nprotocol = "smtp"\nport = 25\nprot = 1', "listeners[0].prot: unknown key"),
        ('[[listeners]]\nprotocol = "smtp"\nport = 25\n[[listeners]]\nprotocol = "ftp"\nport = 21',
         "listeners[1].protocol: expected one of smtp, submission, imap, pop3, got 'ftp'"),
        ('[[listeners]]\nprotocol = "imap"\nport = 143\ntls = "none"',
         'listeners[0].tls: "none" is only allowed for protocol smtp'),
        ('[[listeners]]\nprotocol = "imap"\nport = 143\ntls = "maybe"',
         "listeners[0].tls: expected starttls, implicit or none, got 'maybe'"),
        ('[[listeners]]\nprotocol = "imap"\nport = 70000', "listeners[0].port: expected 0-65535, got 70000"),
        ('[[listeners]]\nprotocol = "imap"', "listeners[0].port: missing required key"),
        ('[[listeners]]\nprotocol = "imap"\nport = "143"', "listeners[0].port: expected an integer, got '143'"),
        ('[[listeners]]\nprotocol = "imap"\nport = true', "listeners[0].port: expected an integer, got True"),
        ('[[listeners]]\nprotocol = "smtp"\nport = 25\n[[listeners]]\nprotocol = "imap"\nport = 25',
         "listeners[1]: 127.0.0.1 port 25 is used twice"),
        ('[limits]\nmessage_size = "lots"', "limits.message_size: expected a size such as 50M or 2G, got 'lots'"),
        ('[limits]\nsmtp_idle_timeout = "soon"', "limits.smtp_idle_timeout: expected a duration"),
        ('[limits]\nsmtp_line_length = 512', "limits.smtp_line_length: RFC 5321 requires at least 1000"),
        ('[limits]\nrecipients_per_message = 0', "limits.recipients_per_message: must be positive"),
        ('[auth]\nargon2_memory_kib = 8\nargon2_parallelism = 4',
         "auth.argon2_memory_kib: must be at least 8 x argon2_parallelism"),
        ('[database]\nurl = "mysql://x"', "database.url: expected sqlite+aiosqlite:///PATH"),
        ('[outbound]\nroutes = { "example.net" = "nowhere" }',
         "outbound.routes.example.net: expected host:port, got 'nowhere'"),
        ('[outbound]\nport = 0', "outbound.port: expected 1-65535, got 0"),
        ('[outbound]\nnameservers = [53]', "outbound.nameservers[0]: expected a string"),
        ('[outbound]\nmax_queue_lifetime = "forever"', "outbound.max_queue_lifetime: expected a duration"),
        ('[outbound]\ndelay_warning = 0', "outbound.delay_warning: must be positive"),
        ('[outbound]\nretry_base = "2h"\nretry_max = "1h"', "outbound.retry_max: must not be less than retry_base"),
        ('[outbound]\nmax_per_destination = 0', "outbound.max_per_destination: must be positive"),
        ('[outbound.tls_policy]\n"bank.example" = "dane"', "outbound.tls_policy.bank.example: expected may or verify"),
        ('[outbound]\nenabled = "yes"', "outbound.enabled: expected true or false, got 'yes'"),
        ('[log]\nlevel = "chatty"', "log.level: expected debug, info, warning or error, got 'chatty'"),
        ('[[tls.sni]]\nhostname = "a.test"\ncert = "a.pem"', "tls.sni[0].key: missing required key"),
        ('[[tls.sni]]\nhostname = "not a host"\ncert = "a"\nkey = "b"', "tls.sni[0].hostname: not a valid host name"),
    ],
)
def test_errors_name_the_key(tmp_path, extra, message):
    path = write(tmp_path, MINIMAL + extra + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: ")
    assert message in text
    assert "\n" not in text


def test_missing_hostname_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"hostname: missing required key"):
        load_config(write(tmp_path, 'data_dir = "x"\n'))


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=rf"{tmp_path}/nope.toml: config file not found"):
        load_config(tmp_path / "nope.toml")


def test_invalid_toml_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "hostname = \n"))


@pytest.mark.parametrize("text, size", [("2G", 2 * 1024**3), ("512k", 512 * 1024), ("50MB", 50 * 1024**2),
                                        ("1000", 1000), (4096, 4096)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("5m", 300), ("1h", 3600), ("2d", 172800),
                                           (90, 90), ("1.5", 1.5)])
def test_durations(text, seconds):
    assert parse_duration(text, "x") == seconds


@pytest.mark.parametrize("name", ["runbox-mta.toml", "production.toml"])
def test_shipped_configs_load(name):
    config = load_config(REPO / "config" / name)
    assert config.hostname
    assert all(listener.port for listener in config.listeners)


def test_production_config_uses_the_standard_ports():
    config = load_config(REPO / "config" / "production.toml")
    assert sorted((l.protocol, l.port, l.tls) for l in config.listeners) == [
        ("imap", 143, "starttls"), ("imap", 993, "implicit"),
        ("pop3", 110, "starttls"), ("pop3", 995, "implicit"),
        ("smtp", 25, "starttls"),
        ("submission", 465, "implicit"), ("submission", 587, "starttls"),
    ]
