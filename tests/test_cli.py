"""The command line of SPEC §2: every command round-trips through the real store,
errors are one line with exit 1, usage errors exit 2, passwords never come from argv."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from runbox_mta.auth.app_passwords import normalise_app_password
from runbox_mta.auth.passwords import PasswordHasher
from runbox_mta.cli import main
from runbox_mta.config import load_config
from runbox_mta.store import open_store

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def config_path(tmp_path, database_url) -> Path:
    path = tmp_path / "runbox-mta.toml"
    path.write_text(f'''
hostname = "mail.example.test"
data_dir = "var"
[database]
url = "{database_url}"
[tls]
cert = "tls/cert.pem"
key = "tls/key.pem"
[auth]
argon2_time_cost = 1
argon2_memory_kib = 64
argon2_parallelism = 1
''')
    return path


@pytest.fixture
def cli(config_path, capsys, monkeypatch):
    """Run `runbox-mta --config X ARGS`, in process; returns (status, stdout, stderr)."""

    def run(*args: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        status = main(["--config", str(config_path), *args])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def ok(result: tuple[int, str, str]) -> str:
    status, out, err = result
    assert status == 0, err
    return out


def fails(result: tuple[int, str, str], message: str) -> None:
    status, out, err = result
    assert status == 1
    assert err.startswith("runbox-mta: ") and err.count("\n") == 1, err
    assert message in err


def stored(config_path: Path, coroutine_function):
    async def go():
        store = await open_store(load_config(config_path).database.url)
        try:
            return await coroutine_function(store)
        finally:
            await store.close()

    return asyncio.run(go())


def test_domain_add_list_dns_remove(cli):
    assert "added domain example.test" in ok(cli("domain", "add", "Example.TEST"))
    ok(cli("domain", "add", "example.org"))
    assert ok(cli("domain", "list")).split() == ["example.org", "example.test"]
    fails(cli("domain", "add", "example.test"), "example.test")
    ok(cli("domain", "remove", "example.org"))
    assert ok(cli("domain", "list")).split() == ["example.test"]
    fails(cli("domain", "remove", "example.org"), "example.org")


def test_domain_dns_prints_every_record_and_the_dkim_key_matches(cli, config_path):
    ok(cli("domain", "add", "example.test"))
    out = ok(cli("domain", "dns", "example.test"))
    assert re.search(r"^example\.test\.\s+3600\s+IN\s+MX\s+10 mail\.example\.test\.$", out, re.M)
    assert '"v=spf1 mx -all"' in out
    assert re.search(r'^_dmarc\.example\.test\..*"v=DMARC1; p=quarantine', out, re.M)
    assert re.search(r'^_mta-sts\.example\.test\..*"v=STSv1; id=\w+"', out, re.M)
    assert re.search(r'^_smtp\._tls\.example\.test\..*"v=TLSRPTv1; rua=mailto:', out, re.M)
    for service, port in (("submissions", 465), ("submission", 587), ("imaps", 993), ("imap", 143),
                          ("pop3s", 995), ("pop3", 110)):
        assert re.search(rf"^_{service}\._tcp\.example\.test\..*SRV\s+\d+ 1 {port} mail\.example\.test\.$", out, re.M)
    assert "mode: enforce" in out and "mx: mail.example.test" in out

    match = re.search(r'^(\w+)\._domainkey\.example\.test\.\s.*TXT\s+(.*)$', out, re.M)
    selector, quoted = match.groups()
    strings = re.findall(r'"([^"]*)"', quoted)
    assert all(len(s) <= 255 for s in strings)
    record = "".join(strings)
    published = base64.b64decode(record.split("p=")[1])
    domain = stored(config_path, lambda store: store.get_domain("example.test"))
    assert domain.dkim_selector == selector
    key = serialization.load_pem_private_key(domain.dkim_private_key.encode(), None)
    assert key.key_size == 2048
    assert key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == published


def test_user_add_passwd_list_and_password_hashes(cli, config_path):
    fails(cli("user", "add", "alice@example.test", "--password-stdin", stdin="correct horse\n"),
          "example.test")  # domain not hosted yet
    ok(cli("domain", "add", "example.test"))
    out = ok(cli("user", "add", "Alice@Example.test", "--password-stdin", "--quota", "2G", stdin="correct horse\n"))
    assert "alice@example.test" in out and "2G" in out
    fails(cli("user", "add", "alice@example.test", "--password-stdin", stdin="correct horse\n"), "alice@example.test")
    fails(cli("user", "add", "bob@example.test", "--password-stdin", stdin="short\n"), "at least 8 characters")
    assert ok(cli("user", "list")).splitlines() == ["alice@example.test\tquota 2G\t-"]

    hasher = PasswordHasher(load_config(config_path).auth)
    login = stored(config_path, lambda store: store.get_login("alice@example.test"))
    assert login.password_hash.startswith("$argon2id$")
    assert hasher.verify(login.password_hash, "correct horse")

    ok(cli("user", "passwd", "alice@example.test", "--password-stdin", stdin="battery staple\n"))
    login = stored(config_path, lambda store: store.get_login("alice@example.test"))
    assert hasher.verify(login.password_hash, "battery staple")
    assert not hasher.verify(login.password_hash, "correct horse")
    fails(cli("user", "passwd", "nobody@example.test", "--password-stdin", stdin="whatever1\n"), "nobody@example.test")


def test_password_prompt_needs_a_terminal(cli):
    ok(cli("domain", "add", "example.test"))
    fails(cli("user", "add", "alice@example.test"), "use --password-stdin")


def test_user_set_policy(cli):
    ok(cli("domain", "add", "example.test"))
    ok(cli("user", "add", "alice@example.test", "--password-stdin", stdin="correct horse\n"))
    out = ok(cli("user", "set", "alice@example.test", "--app-passwords-only", "on", "--no-backup", "on"))
    assert "app-passwords-only on, no-backup on, quota unlimited" in out
    assert ok(cli("user", "list")).splitlines() == ["alice@example.test\tquota unlimited\tapp-passwords-only no-backup"]
    out = ok(cli("user", "set", "alice@example.test", "--quota", "500M", "--no-backup", "off"))
    assert "app-passwords-only on, no-backup off, quota 500M" in out
    out = ok(cli("user", "set", "alice@example.test", "--quota", "unlimited"))
    assert "quota unlimited" in out
    fails(cli("user", "set", "alice@example.test"), "nothing to change")
    fails(cli("user", "set", "nobody@example.test", "--no-backup", "on"), "nobody@example.test")


def test_user_remove_disables_then_purge_erases(cli, config_path):
    ok(cli("domain", "add", "example.test"))
    ok(cli("user", "add", "alice@example.test", "--password-stdin", stdin="correct horse\n"))
    assert "its mail is kept" in ok(cli("user", "remove", "alice@example.test"))
    assert ok(cli("user", "list")).splitlines() == ["alice@example.test\tquota unlimited\tremoved"]
    # The address stays reserved, so nobody else receives the former owner's mail.
    fails(cli("user", "add", "alice@example.test", "--password-stdin", stdin="correct horse\n"), "purge")
    assert stored(config_path, lambda store: store.get_login("alice@example.test")).disabled
    assert "purged" in ok(cli("user", "remove", "alice@example.test", "--purge"))
    assert ok(cli("user", "list")) == ""
    assert stored(config_path, lambda store: store.get_login("alice@example.test")) is None
    ok(cli("user", "add", "alice@example.test", "--password-stdin", stdin="correct horse\n"))


def test_domain_with_accounts_cannot_be_removed(cli):
    ok(cli("domain", "add", "example.test"))
    ok(cli("user", "add", "alice@example.test", "--password-stdin", stdin="correct horse\n"))
    fails(cli("domain", "remove", "example.test"), "still has 1 account")


def test_alias_add_list_remove_with_catch_all(cli):
    ok(cli("domain", "add", "example.test"))
    ok(cli("alias", "add", "Sales@example.test", "alice@example.test"))
    ok(cli("alias", "add", "sales@example.test", "bob@elsewhere.test"))
    ok(cli("alias", "add", "@example.test", "alice@example.test"))
    assert sorted(ok(cli("alias", "list")).splitlines()) == [
        "@example.test\talice@example.test",
        "sales@example.test\talice@example.test",
        "sales@example.test\tbob@elsewhere.test",
    ]
    fails(cli("alias", "add", "x@unhosted.test", "alice@example.test"), "unhosted.test")
    ok(cli("alias", "remove", "sales@example.test"))
    assert ok(cli("alias", "list")).splitlines() == ["@example.test\talice@example.test"]
    fails(cli("alias", "remove", "sales@example.test"), "sales@example.test")


def test_app_password_add_list_revoke(cli, config_path):
    ok(cli("domain", "add", "example.test"))
    ok(cli("user", "add", "alice@example.test", "--password-stdin", stdin="correct horse\n"))
    status, out, err = cli("app-password", "add", "alice@example.test", "--label", "phone", "--scope", "imap,smtp")
    assert status == 0 and "cannot be shown again" in err
    password = out.strip()
    assert len(password.replace("-", "").replace(" ", "")) >= 16
    ok(cli("app-password", "add", "alice@example.test", "--label", "laptop"))
    fails(cli("app-password", "add", "alice@example.test", "--label", "phone"), "phone")
    fails(cli("app-password", "add", "alice@example.test", "--label", "tv", "--scope", "ftp"), "ftp")
    listing = ok(cli("app-password", "list", "alice@example.test")).splitlines()
    assert [line.split("\t")[:2] for line in listing] == [["laptop", "imap,pop3,smtp"], ["phone", "imap,smtp"]]

    login = stored(config_path, lambda store: store.get_login("alice@example.test"))
    phone = next(entry for entry in login.app_passwords if entry.label == "phone")
    assert phone.scopes == ("imap", "smtp")
    hasher = PasswordHasher(load_config(config_path).auth)
    assert hasher.verify(phone.password_hash, normalise_app_password(password))
    assert password not in phone.password_hash

    ok(cli("app-password", "revoke", "alice@example.test", "phone"))
    assert [line.split("\t")[0] for line in ok(cli("app-password", "list", "alice@example.test")).splitlines()] == ["laptop"]
    fails(cli("app-password", "revoke", "alice@example.test", "phone"), "phone")


def test_certs_generate_to_out_dir_and_to_config_paths(cli, config_path, tmp_path):
    out = ok(cli("certs", "generate", "--hostname", "mail.example.test", "--out", str(tmp_path / "dev")))
    assert (tmp_path / "dev" / "server.pem").exists() and (tmp_path / "dev" / "server.key").exists()
    assert "server.pem" in out
    ok(cli("certs", "generate", "--hostname", "mail.example.test"))
    assert (tmp_path / "tls" / "cert.pem").exists()
    assert oct((tmp_path / "tls" / "key.pem").stat().st_mode & 0o777) == "0o600"


def test_db_upgrade_is_idempotent_and_check_config_reports(cli, tmp_path):
    assert "schema is at revision" in ok(cli("db", "upgrade"))
    assert "schema is at revision" in ok(cli("db", "upgrade"))
    status, out, _ = cli("check-config")
    assert status == 1 and "tls" in out  # no certificate yet
    ok(cli("certs", "generate", "--hostname", "mail.example.test"))
    assert "OK" in ok(cli("check-config"))


def test_check_config_reports_an_unmigrated_database(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text('hostname = "mail.example.test"\ndata_dir = "var"\n')
    main(["certs", "generate", "--hostname", "x.test", "--out", str(tmp_path / "certs")])
    capsys.readouterr()
    assert main(["--config", str(path), "check-config"]) == 1
    assert "runbox-mta db upgrade" in capsys.readouterr().out


# --- real processes: exit codes and what reaches the terminal --------------------------


def run_process(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runbox_mta", *args], input=stdin, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=60,
    )


def test_usage_errors_exit_2():
    assert run_process("frobnicate").returncode == 2
    assert run_process("user", "add").returncode == 2
    # There is deliberately no way to put a password in argv.
    assert run_process("user", "add", "a@b.test", "--password", "hunter22").returncode == 2


def test_errors_are_one_line_without_traceback(tmp_path):
    result = run_process("--config", str(tmp_path / "missing.toml"), "user", "list")
    assert result.returncode == 1
    assert result.stderr == f"runbox-mta: {tmp_path / 'missing.toml'}: config file not found\n"


def test_config_path_comes_from_the_environment(tmp_path):
    result = run_process("domain", "list", env={"RUNBOX_MTA_CONFIG": str(tmp_path / "env.toml")})
    assert result.returncode == 1 and "env.toml: config file not found" in result.stderr


def test_serve_refuses_an_out_of_date_schema(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('hostname = "mail.example.test"\ndata_dir = "var"\n'
                    '[tls]\ncert = "certs/server.pem"\nkey = "certs/server.key"\n')
    assert run_process("certs", "generate", "--hostname", "x.test", "--out", str(tmp_path / "certs")).returncode == 0
    result = run_process("--config", str(path), "serve")
    assert result.returncode == 1
    assert "runbox-mta db upgrade" in result.stderr and "Traceback" not in result.stderr
