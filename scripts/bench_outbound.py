"""Outbound benchmark: submission -> queue -> a local STARTTLS sink, runbox-mta against Postfix.

Run through `scripts/bench outbound [--messages N] [--sessions N] [--size BYTES]`,
which prepares .venv, installs postfix from Debian when missing, makes the
temporary directory and stops every server it started, even on failure.

Both servers take the same load on a submission port with implicit TLS (N
sessions, each sending messages back to back to one remote recipient) and
relay every message to the same sink on 127.0.0.1, which offers STARTTLS:
runbox-mta through `[outbound] routes`, Postfix through `relayhost`, both to
an IP address, so neither asks DNS. Both use STARTTLS opportunistically and
may open the same number of connections to the sink (--destination-concurrency).
runbox-mta's sessions AUTH PLAIN first (its submission port requires it);
Postfix takes mail from 127.0.0.0/8 without SASL (Debian's Postfix has no
SASL of its own without Dovecot or Cyrus): one AUTH per session, fifty in all.

The figure that counts is delivered/s: from the first connect until the
sink has the last message. The servers run one after the other.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_common import (
    BENCH_PASSWORD,
    POSTFIX_MASTER_CF,
    Listener,
    client_tls,
    free_port,
    percentile,
    postfix_instance,
    postfix_main_cf,
    postfix_problems,
    runbox_instance,
    server_cpu,
    wait_for_port,
    warn_if_busy,
)
from bench_load import Load, LoadResult, add_load_arguments, print_notes, run_load

DOMAIN = "bench.test"
SENDER = f"sender@{DOMAIN}"
RECIPIENT = "rcpt@sink.bench-example.net"
STAT = b"XSTAT\r\n"  # the sink's own command: "250 messages tls-messages seconds-since-first-to-last"


# --- the sink -----------------------------------------------------------------------------


@dataclass
class SinkCounts:
    messages: int = 0
    over_tls: int = 0
    first: float = 0.0
    last: float = 0.0


def run_sink(port: int, cert: Path, key: Path) -> None:
    """An SMTP sink on 127.0.0.1:port: EHLO with PIPELINING and STARTTLS, every transaction 250,
    nothing stored. Written for speed (a whole DATA in one read), so it is nobody's bottleneck."""
    import uvloop

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    counts = SinkCounts()

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = False
        writer.write(b"220 sink.bench-example.net ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    offer = b"" if tls else b"250-STARTTLS\r\n"
                    writer.write(b"250-sink.bench-example.net\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                 b"250-SIZE 104857600\r\n" + offer + b"250 ENHANCEDSTATUSCODES\r\n")
                elif verb == b"STAR" and not tls:
                    writer.write(b"220 2.0.0 go ahead\r\n")
                    await writer.drain()
                    await writer.start_tls(context)
                    tls = True
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await reader.readuntil(b"\r\n.\r\n")
                    now = time.monotonic()
                    counts.first = counts.first or now
                    counts.last = now
                    counts.messages += 1
                    counts.over_tls += tls
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    break
                elif line == STAT:
                    writer.write(f"250 {counts.messages} {counts.over_tls} {counts.last - counts.first:.6f}\r\n"
                                 .encode())
                else:  # HELO, MAIL, RCPT, RSET, NOOP
                    writer.write(b"250 2.0.0 ok\r\n")
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(session, "127.0.0.1", port, limit=1 << 20, backlog=512)
        async with server:
            await server.serve_forever()

    uvloop.run(serve())


def sink_counts(port: int) -> tuple[int, int]:
    """(messages, of which over TLS) the sink has had so far."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()  # greeting
        sock.sendall(STAT)
        _, messages, over_tls, _ = reader.readline().split()
        sock.sendall(b"QUIT\r\n")
    return int(messages), int(over_tls)


@dataclass
class ServerRun:
    name: str
    load: LoadResult
    delivered: int = 0
    over_tls: int = 0
    delivered_seconds: float | None = None  # first connect -> the sink has the last message
    delivered_cpu: float | None = None
    notes: list[str] = field(default_factory=list)


def wait_for_delivery(run: ServerRun, sink_port: int, work: Path, baseline: tuple[int, int]) -> None:
    """Until the sink has every accepted message (or ten times the sending time has passed)."""
    deadline = time.monotonic() + max(300.0, run.load.seconds * 10)
    while True:
        messages, over_tls = sink_counts(sink_port)
        run.delivered, run.over_tls = messages - baseline[0], over_tls - baseline[1]
        if run.delivered >= run.load.accepted or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if run.delivered >= run.load.accepted:
        run.delivered_seconds = time.monotonic() - run.load.started
        run.delivered_cpu = server_cpu(work) - run.load.server_cpu_start
    else:
        run.notes.append(f"{run.name}: only {run.delivered} of {run.load.accepted} reached the sink in time")


# --- runbox-mta ---------------------------------------------------------------------------


def bench_runbox(args: argparse.Namespace, work: Path, sink_port: int) -> ServerRun:
    port = free_port()
    extra = (f"[limits]\nconnections_per_address = {args.sessions + 10}\n"
             f"[outbound]\nmax_per_destination = {args.destination_concurrency}\n"
             f'[outbound.routes]\n"*" = "127.0.0.1:{sink_port}"\n')
    with runbox_instance(work, hostname=f"mail.{DOMAIN}", domain=DOMAIN, users=[SENDER],
                         listeners=[Listener("submission", "implicit", port)], extra_config=extra):
        warn_if_busy("runbox-mta")
        print(f"  runbox-mta submission on 127.0.0.1:{port} (implicit TLS), relaying to the sink; sending ...",
              flush=True)
        baseline = sink_counts(sink_port)
        load = Load(port, SENDER, RECIPIENT, args.messages, args.sessions, args.size, "implicit",
                    login=(SENDER, BENCH_PASSWORD))
        result = run_load(load, work)
        run = ServerRun("runbox-mta", result)
        wait_for_delivery(run, sink_port, work, baseline)
    return run


# --- Postfix ------------------------------------------------------------------------------


def postfix_relay_cf(root: Path, sink_port: int, sessions: int, concurrency: int) -> str:
    return postfix_main_cf(root, DOMAIN, sessions, f"""\
relayhost = [127.0.0.1]:{sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_tls_chain_files = {root}/etc/server.key, {root}/etc/server.pem
smtpd_tls_security_level = encrypt
smtp_tls_security_level = may
default_destination_concurrency_limit = {concurrency}
smtp_destination_concurrency_limit = {concurrency}""")


def bench_postfix(args: argparse.Namespace, work: Path, sink_port: int) -> ServerRun:
    from runbox_mta.certs import (
        generate_self_signed,  # the same ECDSA P-256 certificate runbox-mta uses
    )

    pf = work / "postfix"
    for path in (pf, pf / "etc", pf / "queue"):
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
    generate_self_signed("localhost", pf / "etc")
    port = free_port()
    (pf / "etc" / "main.cf").write_text(postfix_relay_cf(pf, sink_port, args.sessions, args.destination_concurrency))
    (pf / "etc" / "master.cf").write_text(
        POSTFIX_MASTER_CF.replace("inet n - n - - smtpd", "inet n - n - - smtpd -o smtpd_tls_wrappermode=yes")
        .format(port=port))
    with postfix_instance(pf):
        wait_for_port(port, 60, log=pf / "maillog", tls=client_tls())
        warn_if_busy("postfix")
        print(f"  postfix submission on 127.0.0.1:{port} (implicit TLS), relaying to the sink; sending ...",
              flush=True)
        baseline = sink_counts(sink_port)
        result = run_load(Load(port, SENDER, RECIPIENT, args.messages, args.sessions, args.size, "implicit"), work)
        run = ServerRun("postfix", result)
        wait_for_delivery(run, sink_port, work, baseline)
        problems = postfix_problems(pf)
        if problems:
            run.notes.append(problems)
        return run


# --- reporting ----------------------------------------------------------------------------


def report(args: argparse.Namespace, runs: dict[str, ServerRun]) -> None:
    print()
    print(f"Outbound benchmark (nice {args.nice:+d}): {args.messages} messages of {args.size} bytes, "
          f"{args.sessions} submission sessions (implicit TLS), relayed over STARTTLS to one sink, "
          f"{args.destination_concurrency} connections to it at most, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print()
    header = (f"{'server':<12} {'accepted':>9} {'errors':>6} {'accepted/s':>11} {'delivered':>10} "
              f"{'over TLS':>9} {'delivered/s':>12} {'p50 ms':>7} {'p99 ms':>7} {'CPU ms/msg':>10} {'CPU busy':>8}")
    print(header)
    print("-" * len(header))
    for run in runs.values():
        result = run.load
        rate = run.delivered / run.delivered_seconds if run.delivered_seconds else float("nan")
        cpu = (run.delivered_cpu or float("nan")) / max(run.delivered, 1) * 1e3
        print(f"{run.name:<12} {result.accepted:>9} {result.rejected:>6} {result.rate:>11.1f} {run.delivered:>10} "
              f"{run.over_tls:>9} {rate:>12.1f} {percentile(result.latencies, 0.5) * 1e3:>7.1f} "
              f"{percentile(result.latencies, 0.99) * 1e3:>7.1f} {cpu:>10.2f} {result.machine_busy:>8.0%}")
    print()
    print("accepted/s:  250 replies after DATA per second at the submission port (both fsync before 250).")
    print("delivered/s: messages per second from the first connect until the sink had the last one.")
    print("over TLS:    messages the sink received after STARTTLS.")
    print("p50/p99:     submission latency of one message, MAIL sent to 250 after the dot.")
    print("CPU ms/msg:  server CPU (all its processes) until the last delivery, per message.")
    print(f"CPU busy:    all {os.cpu_count()} CPUs, any process, while the messages were being submitted.")
    runbox, postfix = runs.get("runbox"), runs.get("postfix")
    if runbox and postfix and runbox.delivered_seconds and postfix.delivered_seconds:
        ratio = (runbox.delivered / runbox.delivered_seconds) / (postfix.delivered / postfix.delivered_seconds)
        print()
        print(f"ratio runbox-mta delivered/s / postfix delivered/s: {ratio:6.2f}x")
        print(f"target: at least Postfix's rate: {'met' if ratio >= 1.0 else 'NOT met'}")
    print_notes(runs.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench")
    sub = parser.add_subparsers(dest="command", required=True)
    outbound = sub.add_parser("outbound", help="runbox-mta vs Postfix relaying to a STARTTLS sink")
    add_load_arguments(outbound, messages=10000)
    outbound.add_argument("--destination-concurrency", type=int, default=20,
                          help="connections each server may open to the sink (Postfix's default: 20)")
    sink = sub.add_parser("sink", help=argparse.SUPPRESS)
    sink.add_argument("--port", type=int, required=True)
    sink.add_argument("--cert", type=Path, required=True)
    sink.add_argument("--key", type=Path, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.command == "sink":
        run_sink(args.port, args.cert, args.key)
        return 0
    if args.messages < 1 or args.sessions < 1 or args.size < 512 or args.destination_concurrency < 1:
        parser.error("--messages, --sessions and --destination-concurrency must be positive, --size at least 512")

    from runbox_mta.certs import generate_self_signed

    work: Path = args.work
    if args.nice and os.geteuid() == 0:
        os.nice(args.nice)
    sink_dir = work / "sink"
    sink_dir.mkdir()
    generate_self_signed("sink.bench-example.net", sink_dir)
    sink_port = free_port()
    sink_log = sink_dir / "sink.log"
    with sink_log.open("wb") as out:
        sink_process = subprocess.Popen(
            [sys.executable, __file__, "sink", "--port", str(sink_port), "--cert", str(sink_dir / "server.pem"),
             "--key", str(sink_dir / "server.key")], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    (work / "sink.pid").write_text(str(sink_process.pid))
    runs: dict[str, ServerRun] = {}
    try:
        wait_for_port(sink_port, 30, sink_process, sink_log)
        if args.only in (None, "runbox"):
            print("runbox-mta ...", flush=True)
            runs["runbox"] = bench_runbox(args, work, sink_port)
        if args.only in (None, "postfix"):
            print("postfix ...", flush=True)
            runs["postfix"] = bench_postfix(args, work, sink_port)
    finally:
        sink_process.terminate()
        sink_process.wait()
        (work / "sink.pid").unlink(missing_ok=True)
    report(args, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
