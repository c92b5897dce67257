"""The `runbox-mta` command line (SPEC §2: these spellings are a public interface).

Every failure an operator can cause is one line on stderr and exit status 1;
usage errors exit 2 (argparse). Passwords are read from a no-echo prompt or
from stdin, never from argv, so they stay out of shell history and `ps`.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable

from runbox_mta.config import DEFAULT_CONFIG_PATH, Config, load_config, parse_size
from runbox_mta.errors import RunboxError

if TYPE_CHECKING:
    from runbox_mta.auth.passwords import PasswordHasher
    from runbox_mta.store import Store

MIN_PASSWORD_LENGTH = 8
_UNCHANGED = object()  # `user set --quota unlimited` means None, so absence needs its own value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except RunboxError as error:
        print(f"runbox-mta: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runbox-mta", description="Privacy-first mail server.")
    parser.add_argument(
        "--config", type=Path, default=None,
        help=f"config file (default: $RUNBOX_MTA_CONFIG, else {DEFAULT_CONFIG_PATH})",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("serve", help="run the daemon in the foreground").set_defaults(handler=cmd_serve)
    commands.add_parser("check-config", help="validate config, certificates and database").set_defaults(
        handler=cmd_check_config
    )

    db = _group(commands, "db", "database schema")
    db.add_parser("upgrade", help="create or migrate the schema").set_defaults(handler=cmd_db_upgrade)

    certs = _group(commands, "certs", "TLS certificates")
    generate = certs.add_parser("generate", help="create a self-signed development certificate")
    generate.add_argument("--hostname", required=True)
    generate.add_argument("--out", type=Path, help="directory for server.pem and server.key")
    generate.set_defaults(handler=cmd_certs_generate)

    tls = _group(commands, "tls", "TLS policy")
    tls.add_parser("audit", help="probe every listener's accepted TLS versions and ciphers").set_defaults(
        handler=cmd_tls_audit
    )

    _add_domain_commands(_group(commands, "domain", "hosted domains"))
    _add_user_commands(_group(commands, "user", "accounts"))
    _add_alias_commands(_group(commands, "alias", "aliases and catch-alls"))
    _add_app_password_commands(_group(commands, "app-password", "per-device app passwords"))
    _add_queue_commands(_group(commands, "queue", "outbound queue"))
    _add_transfer_commands(commands)
    return parser


def _group(commands: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    parser = commands.add_parser(name, help=help)
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")


def _store_command(sub: argparse._SubParsersAction, name: str, run: Callable, help: str,
                   *arguments: str) -> argparse.ArgumentParser:
    """A sub-command whose coroutine `run(store, args, config)` needs the database."""
    parser = sub.add_parser(name, help=help)
    for argument in arguments:
        parser.add_argument(argument)
    parser.set_defaults(handler=lambda args: _with_store(args, run))
    return parser


def _add_domain_commands(sub: argparse._SubParsersAction) -> None:
    _store_command(sub, "add", domain_add, "host a domain (creates its DKIM key)", "name")
    _store_command(sub, "list", domain_list, "list hosted domains")
    _store_command(sub, "remove", domain_remove, "stop hosting a domain", "name")
    _store_command(sub, "dns", domain_dns, "print the DNS records to publish", "name")


def _add_user_commands(sub: argparse._SubParsersAction) -> None:
    add = _store_command(sub, "add", user_add, "create an account", "address")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add.add_argument("--quota", type=_size_argument, help="storage quota, e.g. 2G")
    passwd = _store_command(sub, "passwd", user_passwd, "change an account's password", "address")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    _store_command(sub, "list", user_list, "list accounts")
    remove = _store_command(sub, "remove", user_remove, "disable an account, or --purge it", "address")
    remove.add_argument("--purge", action="store_true", help="delete every trace: mail, passwords, queue")
    set_ = _store_command(sub, "set", user_set, "change account policy", "address")
    set_.add_argument("--app-passwords-only", type=_on_off, metavar="on/off",
                      help="two-factor mode: only app passwords work for IMAP, POP3 and SMTP")
    set_.add_argument("--no-backup", type=_on_off, metavar="on/off",
                      help="deleted mail is erased at once, no copy kept")
    set_.add_argument("--quota", type=_quota_argument, default=_UNCHANGED,
                      help="storage quota, e.g. 2G, or 'unlimited'")


def _add_alias_commands(sub: argparse._SubParsersAction) -> None:
    _store_command(sub, "add", alias_add, "add an alias (@domain for a catch-all)", "alias", "target")
    _store_command(sub, "list", alias_list, "list aliases")
    _store_command(sub, "remove", alias_remove, "remove an alias", "alias")


def _add_app_password_commands(sub: argparse._SubParsersAction) -> None:
    add = _store_command(sub, "add", app_password_add, "generate an app password", "address")
    add.add_argument("--label", required=True, help="the device, e.g. 'phone'")
    add.add_argument("--scope", default="imap,pop3,smtp", help="comma-separated: imap,pop3,smtp")
    _store_command(sub, "list", app_password_list, "list an account's app passwords", "address")
    _store_command(sub, "revoke", app_password_revoke, "revoke an app password", "address", "label")


def _add_queue_commands(sub: argparse._SubParsersAction) -> None:
    _store_command(sub, "list", queue_list, "list queued mail and why it waits")
    _store_command(sub, "flush", queue_flush, "retry all queued mail now")
    remove = _store_command(sub, "remove", queue_remove, "delete a queued message (no bounce)")
    remove.add_argument("id", type=int)


def _add_transfer_commands(commands: argparse._SubParsersAction) -> None:
    import_ = _store_command(commands, "import", import_mail,
                             "import a Maildir, an mbox file or a directory of mbox files", "address")
    import_.add_argument("path", type=Path)
    export = _store_command(commands, "export", export_mail,
                            "write every mailbox as an mbox file into a new directory", "address")
    export.add_argument("path", type=Path)


def _on_off(text: str) -> bool:
    if text.lower() not in ("on", "off"):
        raise argparse.ArgumentTypeError("expected on or off")
    return text.lower() == "on"


def _size_argument(text: str) -> int:
    try:
        return parse_size(text, "quota")
    except RunboxError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _quota_argument(text: str) -> int | None:
    return None if text.lower() in ("unlimited", "none") else _size_argument(text)


def format_size(size: int | None) -> str:
    if size is None:
        return "unlimited"
    for unit, factor in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


# --- configuration and store plumbing -------------------------------------------------


def config_from(args: argparse.Namespace) -> Config:
    path = args.config or Path(os.environ.get("RUNBOX_MTA_CONFIG") or DEFAULT_CONFIG_PATH)
    return load_config(path)


def _with_store(args: argparse.Namespace, run: Callable[..., Awaitable[None]]) -> int:
    config = config_from(args)

    async def go() -> None:
        async with open_config_store(config) as store:
            await run(store, args, config)

    asyncio.run(go())
    return 0


@asynccontextmanager
async def open_config_store(config: Config) -> AsyncIterator["Store"]:
    from runbox_mta.store import open_store

    store = await open_store(config.database.url, data_dir=config.data_dir)
    try:
        yield store
    finally:
        await store.close()


def read_new_password(from_stdin: bool) -> str:
    """One line from stdin, or a no-echo prompt asked twice."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise RunboxError("no terminal to prompt for the password on: use --password-stdin")
        password = getpass.getpass("New password: ")
        if getpass.getpass("Repeat password: ") != password:
            raise RunboxError("the passwords do not match")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise RunboxError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    return password


def hasher_for(config: Config) -> "PasswordHasher":
    from runbox_mta.auth.passwords import PasswordHasher

    return PasswordHasher(config.auth)


# --- commands -------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    from runbox_mta.app import Daemon
    from runbox_mta.log import setup_logging

    config = config_from(args)
    setup_logging(config.log.level)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(Daemon(config).run())
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from runbox_mta.app import check_listeners, protocol_registry
    from runbox_mta.store import schema_status
    from runbox_mta.tls import TlsContextFactory

    config = config_from(args)
    problems: list[str] = []
    for check in (lambda: check_listeners(config, protocol_registry()),
                  lambda: TlsContextFactory(config.tls)):
        try:
            check()
        except RunboxError as error:
            problems.append(str(error))
    try:
        current, head = asyncio.run(schema_status(config.database.url))
        if current != head:
            problems.append(f"database schema is at {current or 'nothing'}, needs {head}: run `runbox-mta db upgrade`")
    except RunboxError as error:
        problems.append(str(error))
    for problem in problems:
        print(f"problem: {problem}")
    if problems:
        return 1
    print(f"{config.path}: OK ({len(config.listeners)} listeners)")
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from runbox_mta.store import schema_status, upgrade_schema

    config = config_from(args)
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # mail is private
    asyncio.run(upgrade_schema(config.database.url))
    current, _ = asyncio.run(schema_status(config.database.url))
    print(f"database schema is at revision {current}")
    return 0


def cmd_certs_generate(args: argparse.Namespace) -> int:
    from runbox_mta.certs import write_self_signed

    if args.out:
        cert, key = args.out / "server.pem", args.out / "server.key"
    else:
        config = config_from(args)
        cert, key = config.tls.cert, config.tls.key
    write_self_signed(args.hostname, cert, key)
    print(f"wrote {cert} and {key}")
    return 0


def cmd_tls_audit(args: argparse.Namespace) -> int:
    from runbox_mta.tls_audit import audit, report

    audits = asyncio.run(audit(config_from(args)))
    print(report(audits))
    if all(entry.ok for entry in audits):
        print("every listener meets the policy: TLS 1.2 or newer, forward secrecy only")
        return 0
    return 1


async def domain_add(store: "Store", args: argparse.Namespace, config: Config) -> None:
    from runbox_mta.domains import new_dkim_key

    selector, key = await asyncio.to_thread(new_dkim_key)
    domain = await store.add_domain(args.name, dkim_selector=selector, dkim_private_key=key)
    print(f"added domain {domain.name}; publish its records: runbox-mta domain dns {domain.name}")


async def domain_list(store: "Store", args: argparse.Namespace, config: Config) -> None:
    for domain in await store.list_domains():
        print(domain.name)


async def domain_remove(store: "Store", args: argparse.Namespace, config: Config) -> None:
    await store.remove_domain(args.name)
    print(f"removed domain {args.name.lower()}")


async def domain_dns(store: "Store", args: argparse.Namespace, config: Config) -> None:
    from runbox_mta.domains import dns_records

    domain = await store.get_domain(args.name)
    print(dns_records(domain.name, config.hostname, domain.dkim_selector, domain.dkim_private_key), end="")


async def user_add(store: "Store", args: argparse.Namespace, config: Config) -> None:
    password = read_new_password(args.password_stdin)
    password_hash = await asyncio.to_thread(hasher_for(config).hash, password)
    account = await store.add_account(args.address, password_hash, quota_bytes=args.quota)
    print(f"added account {account.address} (quota {format_size(account.quota_bytes)})")


async def user_passwd(store: "Store", args: argparse.Namespace, config: Config) -> None:
    await store.get_account(args.address)  # fail before prompting for nothing
    password = read_new_password(args.password_stdin)
    password_hash = await asyncio.to_thread(hasher_for(config).hash, password)
    await store.set_password_hash(args.address, password_hash)
    print(f"changed the password of {args.address.lower()}")


async def user_list(store: "Store", args: argparse.Namespace, config: Config) -> None:
    for account in await store.list_accounts():
        modes = [name for name, on in (("app-passwords-only", account.app_passwords_only),
                                       ("no-backup", account.no_backup),
                                       ("removed", account.disabled)) if on]
        print(f"{account.address}\tquota {format_size(account.quota_bytes)}\t{' '.join(modes) or '-'}")


async def user_remove(store: "Store", args: argparse.Namespace, config: Config) -> None:
    await store.remove_account(args.address, purge=args.purge)
    if args.purge:
        print(f"purged account {args.address.lower()} and all its data")
    else:
        print(f"disabled account {args.address.lower()}; its mail is kept (erase it with --purge)")


async def user_set(store: "Store", args: argparse.Namespace, config: Config) -> None:
    changes = {name: getattr(args, name) for name in ("app_passwords_only", "no_backup")
               if getattr(args, name) is not None}
    if args.quota is not _UNCHANGED:
        changes["quota_bytes"] = args.quota
    if not changes:
        raise RunboxError("nothing to change: give --app-passwords-only, --no-backup or --quota")
    account = await store.update_account(args.address, **changes)
    print(f"{account.address}: app-passwords-only {_on(account.app_passwords_only)}, "
          f"no-backup {_on(account.no_backup)}, quota {format_size(account.quota_bytes)}")


def _on(flag: bool) -> str:
    return "on" if flag else "off"


async def alias_add(store: "Store", args: argparse.Namespace, config: Config) -> None:
    alias = await store.add_alias(args.alias, args.target)
    print(f"added alias {alias.source} -> {alias.target}")


async def alias_list(store: "Store", args: argparse.Namespace, config: Config) -> None:
    for alias in await store.list_aliases():
        print(f"{alias.source}\t{alias.target}")


async def alias_remove(store: "Store", args: argparse.Namespace, config: Config) -> None:
    await store.remove_alias(args.alias)
    print(f"removed alias {args.alias.lower()}")


async def app_password_add(store: "Store", args: argparse.Namespace, config: Config) -> None:
    from runbox_mta.auth.app_passwords import generate_app_password, normalise_app_password, parse_scopes

    scopes = parse_scopes(args.scope)
    password = generate_app_password()
    # Logins normalise what the user types (dashes, spaces, case), so hash that form.
    password_hash = await asyncio.to_thread(hasher_for(config).hash, normalise_app_password(password))
    await store.add_app_password(args.address, args.label, scopes, password_hash)
    # The password goes alone to stdout so scripts can capture it; it is shown once only.
    print(f"app password '{args.label}' for {args.address.lower()} ({','.join(scopes)}); "
          "it cannot be shown again:", file=sys.stderr)
    print(password)


async def app_password_list(store: "Store", args: argparse.Namespace, config: Config) -> None:
    for entry in await store.list_app_passwords(args.address):
        print(f"{entry.label}\t{','.join(entry.scopes)}\tcreated {entry.created_at:%Y-%m-%d}")


async def app_password_revoke(store: "Store", args: argparse.Namespace, config: Config) -> None:
    await store.revoke_app_password(args.address, args.label)
    print(f"revoked app password '{args.label}' of {args.address.lower()}")


async def queue_list(store: "Store", args: argparse.Namespace, config: Config) -> None:
    from datetime import UTC, datetime

    entries = await store.list_queue()
    for entry in entries:
        print(f"{entry.id}\t{entry.size} bytes\tqueued {entry.created_at:%Y-%m-%d %H:%M:%S}Z\t<{entry.sender}>")
        for r in entry.recipients:
            print(f"  {r.recipient}\t{r.status}\tattempts {r.attempts}\t"
                  f"next {r.next_attempt_at:%Y-%m-%d %H:%M:%S}Z\t{r.last_error or '-'}\t{r.tls_outcome or '-'}")
    now = datetime.now(UTC)
    print((await store.queue_summary(now)).describe(now))


async def queue_flush(store: "Store", args: argparse.Namespace, config: Config) -> None:
    from datetime import UTC, datetime

    count = await store.flush_queue(datetime.now(UTC))
    # Running daemons look for due mail every [outbound] poll_interval.
    print(f"{count} recipient{'s' if count != 1 else ''} due now")


async def queue_remove(store: "Store", args: argparse.Namespace, config: Config) -> None:
    await store.remove_queued(args.id)
    print(f"removed queue entry {args.id}")


async def import_mail(store: "Store", args: argparse.Namespace, config: Config) -> None:
    from runbox_mta.transfer.migrate import import_path

    await import_path(store, args.address, args.path, print)


async def export_mail(store: "Store", args: argparse.Namespace, config: Config) -> None:
    from runbox_mta.transfer.migrate import export_path

    await export_path(store, args.address, args.path, print)


if __name__ == "__main__":
    raise SystemExit(main())
