"""SMTP throughput benchmark: runbox-mta against Postfix delivering into Dovecot (LMTP).

Run through `scripts/bench smtp [--messages N] [--sessions N] [--size BYTES]`,
which prepares .venv, installs postfix/dovecot from Debian when missing, makes
the temporary directory and stops every server it started, even on failure.

Everything here is outside the runbox_mta package on purpose: the daemon is
driven only through its command line (`runbox-mta ... serve`, `domain add`,
`user add`) and, to verify the result, through its store API.

The servers run one after the other, never together, so they do not compete
for the machine's cores. The load generator is the same for both: N
concurrent sessions, each sending messages back to back over one connection
(MAIL, RCPT, DATA pipelined when the server offers PIPELINING), counting the
250 replies to the final dot.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_common import (
    POSTFIX_MASTER_CF,
    REPO,
    Listener,
    free_port,
    percentile,
    postfix_instance,
    postfix_main_cf,
    postfix_problems,
    run,
    runbox_instance,
    server_cpu,
    start_daemon,
    wait_for_port,
    warn_if_busy,
)
from bench_load import Load, LoadResult, add_load_arguments, print_notes, run_load

DOMAIN = "bench.test"
RECIPIENT = f"rcpt@{DOMAIN}"
SENDER_DOMAIN = "sender.bench-example.net"
SENDER = f"load@{SENDER_DOMAIN}"
MAIL_UID = MAIL_GID = 65534  # Dovecot delivers as nobody:nogroup (a virtual-mail uid)


# --- a local DNS responder (stands in for the MX's warm caching resolver) ------------------


def dns_server(port: int) -> None:
    """UDP DNS on 127.0.0.1:port: SPF and DMARC for the sender domain, PTR for 127.0.0.1,
    NXDOMAIN for everything else. Answers are built once per distinct question and then
    replayed with the query's ID, so the responder costs next to no CPU."""
    import dns.flags
    import dns.message
    import dns.rcode
    import dns.rdatatype
    import dns.rrset

    records = {
        (f"{SENDER_DOMAIN}.", "TXT"): ['"v=spf1 ip4:127.0.0.0/8 -all"'],
        (f"_dmarc.{SENDER_DOMAIN}.", "TXT"): ['"v=DMARC1; p=none"'],
        ("1.0.0.127.in-addr.arpa.", "PTR"): ["localhost."],
        ("localhost.", "A"): ["127.0.0.1"],
    }
    names = {name for name, _ in records}
    cache: dict[bytes, bytes] = {}
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    while True:
        data, peer = sock.recvfrom(4096)
        if len(data) < 12:
            continue
        key = data[2:3] + data[12:]  # flags byte (RD/CD...) + question + OPT
        wire = cache.get(key)
        if wire is None:
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            response = dns.message.make_response(query)
            question = query.question[0]
            name = question.name.to_text().lower()
            rtype = dns.rdatatype.to_text(question.rdtype)
            if (name, rtype) in records:
                response.answer.append(dns.rrset.from_text(name, 300, "IN", rtype, *records[(name, rtype)]))
            elif name not in names:
                response.set_rcode(dns.rcode.NXDOMAIN)
            response.flags |= dns.flags.AA
            wire = response.to_wire()
            cache[key] = wire
        sock.sendto(data[:2] + wire[2:], peer)


# --- runbox-mta ---------------------------------------------------------------------------


@dataclass
class ServerRun:
    name: str
    load: LoadResult
    stored: int = 0
    stored_seconds: float | None = None  # first connect -> last message in the mailbox
    stored_cpu: float | None = None  # server CPU seconds until then, if later than the last 250
    notes: list[str] = field(default_factory=list)


def smtp_load(port: int, args: argparse.Namespace) -> Load:
    return Load(port, SENDER, RECIPIENT, args.messages, args.sessions, args.size, args.tls)


def bench_runbox(args: argparse.Namespace, work: Path, dns_port: int) -> ServerRun:
    port = free_port()
    extra = (f"[limits]\nconnections_per_address = {args.sessions + 10}\n"
             f'[outbound]\nnameservers = ["127.0.0.1:{dns_port}"]\n')
    with runbox_instance(work, hostname=f"mx.{DOMAIN}", domain=DOMAIN, users=[RECIPIENT],
                         listeners=[Listener("smtp", args.tls, port)], extra_config=extra) as config:
        warn_if_busy("runbox-mta")
        print(f"  runbox-mta listening on 127.0.0.1:{port}; sending ...", flush=True)
        result = run_load(smtp_load(port, args), work)
    stored = count_runbox_inbox(config)
    server = ServerRun("runbox-mta", result, stored=stored,
                       stored_seconds=result.seconds if stored >= result.accepted else None)
    if stored != result.accepted:
        server.notes.append(f"runbox-mta: {result.accepted} accepted but {stored} in the INBOX")
    return server


def count_runbox_inbox(config: Path) -> int:
    """Messages in the recipient's INBOX, through the store (after the daemon stopped)."""
    code = f'''
import asyncio
from runbox_mta.config import load_config
from runbox_mta.store import open_store

async def main():
    config = load_config({str(config)!r})
    store = await open_store(config.database.url, data_dir=config.data_dir)
    try:
        account = await store.get_account({RECIPIENT!r})
        mailbox = await store.get_mailbox(account.id, "INBOX")
        print(len(await store.list_messages(mailbox.id)))
    finally:
        await store.close()

asyncio.run(main())
'''
    return int(run([sys.executable, "-c", code], cwd=REPO).strip())


# --- Postfix + Dovecot --------------------------------------------------------------------


DOVECOT_CONF = """\
# Private Dovecot instance for the benchmark: LMTP only, everything under {root}.
base_dir = {root}/run
state_dir = {root}/state
instance_name = bench-dovecot-{tag}
protocols = lmtp
listen = 127.0.0.1
ssl = no
log_path = {root}/dovecot.log
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 500
mail_location = maildir:~/Maildir
# mail_fsync = optimized is Dovecot's default: a delivered maildir file is
# fsync'd before LMTP answers 250. Stated here so nobody has to look it up.
mail_fsync = optimized
auth_username_format = %Lu
recipient_delimiter = +
postmaster_address = postmaster@{domain}
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/mail/%d/%n allow_all_users=yes
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
}}
"""


def postfix_mx_cf(root: Path, lmtp_socket: Path, sessions: int, starttls: bool) -> str:
    tls = (f"smtpd_tls_security_level = may\n"
           f"smtpd_tls_chain_files = {root}/etc/server.key, {root}/etc/server.pem\n"
           f"smtpd_tls_session_cache_database = btree:{root}/data/smtpd_scache") if starttls \
        else "smtpd_tls_security_level = none"
    return postfix_main_cf(root, DOMAIN, sessions, f"""\
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_maps = texthash:{root}/etc/vmailbox
virtual_transport = lmtp:unix:{lmtp_socket}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
{tls}
smtp_tls_security_level = none""")


def maildir_count(maildir: Path) -> int:
    count = 0
    for sub in ("new", "cur"):
        try:
            with os.scandir(maildir / sub) as entries:
                count += sum(1 for _ in entries)
        except FileNotFoundError:
            pass
    return count


def bench_postfix(args: argparse.Namespace, work: Path) -> ServerRun:
    dc = work / "dovecot"
    pf = work / "postfix"
    for path in (dc, dc / "run", dc / "state", dc / "mail", pf, pf / "etc", pf / "queue"):
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chown(dc / "mail", MAIL_UID, MAIL_GID)
    dovecot_conf = dc / "dovecot.conf"
    dovecot_conf.write_text(DOVECOT_CONF.format(root=dc, tag=os.getpid(), domain=DOMAIN,
                                                uid=MAIL_UID, gid=MAIL_GID))
    port = free_port()
    lmtp_socket = dc / "run" / "lmtp"
    starttls = args.tls == "starttls"
    if starttls:  # the same self-signed ECDSA P-256 certificate runbox-mta uses
        from runbox_mta.certs import generate_self_signed
        generate_self_signed("localhost", pf / "etc")
    (pf / "etc" / "main.cf").write_text(postfix_mx_cf(pf, lmtp_socket, args.sessions, starttls))
    (pf / "etc" / "master.cf").write_text(POSTFIX_MASTER_CF.format(port=port))
    (pf / "etc" / "vmailbox").write_text(f"{RECIPIENT} ok\n")
    maildir = dc / "mail" / DOMAIN / RECIPIENT.split("@")[0] / "Maildir"

    start_daemon(["dovecot", "-c", str(dovecot_conf)], dc / "start.log")
    try:
        deadline = time.monotonic() + 30
        while not lmtp_socket.exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"dovecot did not create {lmtp_socket}\n"
                                 + (dc / "dovecot.log").read_text(errors="replace")[-3000:])
            time.sleep(0.1)
        with postfix_instance(pf):
            wait_for_port(port, 60, log=pf / "maillog")
            warn_if_busy("postfix+dovecot")
            print(f"  postfix listening on 127.0.0.1:{port}, delivering over LMTP to dovecot; sending ...",
                  flush=True)
            result = run_load(smtp_load(port, args), work)
            # Accepted is over; now wait for the queue to drain into the mailbox.
            deadline = time.monotonic() + max(300.0, result.seconds * 10)
            stored = maildir_count(maildir)
            while stored < result.accepted and time.monotonic() < deadline:
                time.sleep(0.05)
                stored = maildir_count(maildir)
            delivered_at = time.monotonic()
            server = ServerRun("postfix+dovecot", result, stored=stored)
            server.stored_cpu = server_cpu(work) - result.server_cpu_start
            if stored >= result.accepted:
                server.stored_seconds = delivered_at - result.started
            else:
                server.notes.append(f"postfix+dovecot: only {stored} of {result.accepted} delivered "
                                    f"before the time limit")
            problems = postfix_problems(pf)
            if problems:
                server.notes.append(problems)
            return server
    finally:
        subprocess.run(["dovecot", "-c", str(dovecot_conf), "stop"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# --- reporting ----------------------------------------------------------------------------


def report(args: argparse.Namespace, runs: dict[str, ServerRun]) -> None:
    print()
    print(f"SMTP benchmark (nice {args.nice:+d}): {args.messages} messages of {args.size} bytes, {args.sessions} concurrent "
          f"sessions, 1 recipient, {'plaintext' if args.tls == 'none' else 'STARTTLS'} SMTP on 127.0.0.1, "
          f"{os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print()
    header = f"{'server':<18} {'accepted':>9} {'errors':>6} {'seconds':>8} {'accepted/s':>11} " \
             f"{'stored':>7} {'stored/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'CPU busy':>8}"
    print(header)
    print("-" * len(header))
    for server in runs.values():
        result = server.load
        stored_rate = (server.stored / server.stored_seconds) if server.stored_seconds else float("nan")
        print(f"{server.name:<18} {result.accepted:>9} {result.rejected:>6} {result.seconds:>8.2f} "
              f"{result.rate:>11.1f} {server.stored:>7} {stored_rate:>9.1f} "
              f"{percentile(result.latencies, 0.5) * 1000:>7.1f} {percentile(result.latencies, 0.99) * 1000:>7.1f} {result.machine_busy:>8.0%}")
    print()
    print("accepted/s: 250 replies after DATA per second, first connect to last 250.")
    print("stored/s:   runbox-mta: = accepted/s (its 250 follows the SQLite COMMIT, synchronous=FULL),")
    print("            INBOX count checked through the store afterwards;")
    print("            postfix+dovecot: first connect until the last message is in Dovecot's maildir")
    print("            (Postfix's 250 follows the fsync of its queue file; Dovecot fsyncs each")
    print("            maildir file before its LMTP 250, mail_fsync = optimized, the default).")
    for server in runs.values():
        result = server.load
        print(f"{server.name}: servers used {result.server_cpu:.1f} CPU-s "
              f"({result.server_cpu / max(result.accepted, 1) * 1e3:.2f} ms per message) during sending; "
              f"the load generator used {result.client_cpu:.1f} CPU-s")
        if server.stored_cpu is not None:
            print(f"{server.name}: servers used {server.stored_cpu:.1f} CPU-s "
                  f"({server.stored_cpu / max(server.stored, 1) * 1e3:.2f} ms per message) "
                  f"until the last message was in the mailbox")
    print("p50/p99:    latency of one message, MAIL sent to 250 after the dot.")
    print(f"CPU busy:   all {os.cpu_count()} CPUs, any process (server, load generator, DNS stub, others)")
    print("            while the messages were being sent.")
    rb, pd = runs.get("runbox"), runs.get("postfix")
    if rb and pd and rb.load.rate and pd.load.rate:
        print()
        print(f"ratio runbox-mta accepted/s / postfix accepted/s:             {rb.load.rate / pd.load.rate:6.2f}x")
        if pd.stored_seconds:
            pd_stored = pd.stored / pd.stored_seconds
            print(f"ratio runbox-mta stored/s   / postfix+dovecot delivered/s:    "
                  f"{rb.load.rate / pd_stored:6.2f}x   (the like-for-like comparison)")
        target = 2.0
        verdict = "met" if pd.stored_seconds and rb.load.rate / (pd.stored / pd.stored_seconds) >= target \
            else "NOT met"
        print(f"target: at least {target:.0f}x the Postfix+Dovecot stored rate: {verdict}")
    print_notes(runs.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench")
    sub = parser.add_subparsers(dest="command", required=True)
    smtp = sub.add_parser("smtp", help="runbox-mta vs Postfix+Dovecot, messages per second")
    add_load_arguments(smtp, messages=20000)
    smtp.add_argument("--tls", choices=("none", "starttls"), default="none",
                      help="plaintext (default) or STARTTLS on both servers")
    dns = sub.add_parser("dns-server", help=argparse.SUPPRESS)
    dns.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    # scripts/bench stops the driver with SIGTERM (Ctrl-C, its own failure): unwind
    # through the finally blocks, which stop the servers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.command == "dns-server":
        dns_server(args.port)
        return 0
    if args.messages < 1 or args.sessions < 1 or args.size < 512:
        parser.error("--messages and --sessions must be positive, --size at least 512")

    work: Path = args.work
    runs: dict[str, ServerRun] = {}
    if args.nice and os.geteuid() == 0:
        # Every process started from here (servers, DNS stub, load generator) inherits
        # the priority: on a shared machine the others' jobs then disturb both sides less.
        os.nice(args.nice)
    dns_port = free_port()
    dns_process = subprocess.Popen([sys.executable, __file__, "dns-server", "--port", str(dns_port)],
                                   start_new_session=True)
    (work / "dns.pid").write_text(str(dns_process.pid))
    try:
        if args.only in (None, "runbox"):
            print("runbox-mta ...", flush=True)
            runs["runbox"] = bench_runbox(args, work, dns_port)
        if args.only in (None, "postfix"):
            print("postfix + dovecot ...", flush=True)
            runs["postfix"] = bench_postfix(args, work)
    finally:
        dns_process.terminate()
        dns_process.wait()
        (work / "dns.pid").unlink(missing_ok=True)  # so scripts/bench never signals a reused pid
    report(args, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
