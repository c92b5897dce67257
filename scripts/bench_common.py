"""What the benchmark drivers share: ports, processes, CPU accounting, a runbox-mta instance.

The drivers (scripts/bench_*.py) run through `scripts/bench NAME`, which makes
the temporary directory, installs what is missing and stops every server a
driver left running (each writes WORK/NAME.pid for that).
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNBOX = str(REPO / ".venv" / "bin" / "runbox-mta")
BENCH_PASSWORD = "benchmark-password-123"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen[bytes] | None = None,
                  log: Path | None = None, greeting: bytes = b"220", tls: ssl.SSLContext | None = None) -> None:
    """Until something answers on 127.0.0.1:port with `greeting` (SMTP's by default);
    with `tls`, inside a TLS connection (implicit TLS ports say nothing before the handshake)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise SystemExit(f"server exited with status {process.returncode} before answering on {port}\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
                raw.settimeout(5)
                sock = tls.wrap_socket(raw, server_hostname="localhost") if tls is not None else raw
                if sock.recv(512).startswith(greeting):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise SystemExit(f"nothing answered on 127.0.0.1:{port} within {timeout:.0f} s\n{tail}")


def run(cmd: list[str], *, input: bytes | None = None, cwd: Path | None = None) -> str:
    result = subprocess.run(cmd, input=input, cwd=cwd, capture_output=True)
    return checked(cmd, result)


def start_daemon(cmd: list[str], log: Path) -> None:
    """A command that forks a daemon: its output goes to a file (a pipe would stay open)."""
    with log.open("ab") as out:
        result = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"command failed ({result.returncode}): {' '.join(cmd)}\n"
                         + log.read_text(errors="replace")[-3000:])


def checked(cmd: list[str], result: subprocess.CompletedProcess[bytes]) -> str:
    if result.returncode != 0:
        raise SystemExit(f"command failed ({result.returncode}): {' '.join(cmd)}\n"
                         f"{result.stdout.decode(errors='replace')}{result.stderr.decode(errors='replace')}")
    return result.stdout.decode(errors="replace")


def client_tls() -> ssl.SSLContext:
    """The load generator's TLS: no certificate check (self-signed test certificates),
    otherwise the defaults (TLS 1.2+, the servers pick the cipher)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [float(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def machine_busy(seconds: float = 1.0) -> float:
    busy0, total0 = cpu_times()
    time.sleep(seconds)
    busy1, total1 = cpu_times()
    return (busy1 - busy0) / max(total1 - total0, 1.0)


def warn_if_busy(what: str) -> None:
    busy = machine_busy()
    if busy > 0.15:
        print(f"  warning: the machine is already {busy:.0%} busy before the {what} run "
              f"(other processes): its figures will be low", flush=True)


def server_cpu(work: Path) -> float:
    """CPU seconds used so far by the servers under `work`: every process whose working
    directory or command line is inside it, with its reaped children."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry.name}/cwd")
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes().decode(errors="replace")
            if not (cwd.startswith(str(work)) or str(work) in cmdline) or "dns-server" in cmdline:
                continue
            fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(value) for value in fields[11:15]) / tick  # utime stime cutime cstime
    return total


def process_tree(roots: list[int]) -> list[int]:
    """The processes `roots` and all their descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    pending = [pid for pid in roots if Path(f"/proc/{pid}").exists()]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, ()))
    return found


def memory_kib(pids: list[int]) -> tuple[int, int]:
    """(RSS, PSS) in KiB summed over `pids`, from /proc/PID/smaps_rollup. PSS charges each
    shared page to its sharers in equal parts, so summing it over many processes that share
    libraries and copy-on-write pages (Dovecot's one imap process per connection) counts
    every page once; summed RSS counts shared pages once per process."""
    rss = pss = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:  # gone meanwhile
            continue
        for line in text.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return rss, pss


def raise_nofile(want: int) -> int:
    """Raise this process's RLIMIT_NOFILE (inherited by the servers it starts) to `want`,
    as far as the kernel allows (root may raise the hard limit up to fs.nr_open); returns
    the soft limit in force (which may be less than `want`)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    if os.geteuid() == 0 and hard < want:
        try:
            ceiling = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            ceiling = hard
        hard = max(hard, min(want, ceiling))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    except (ValueError, OSError):  # no CAP_SYS_RESOURCE (a container): up to the hard limit
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def postfix_main_cf(root: Path, domain: str, sessions: int, specific: str) -> str:
    """main.cf of a private Postfix instance under `root` (queue, logs), taking mail from
    127.0.0.0/8; `specific` adds the benchmark's own lines (where mail goes, TLS)."""
    return f"""\
# Private Postfix instance for the benchmark: everything under {root}.
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.{domain}
mydomain = {domain}
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains =
smtpd_recipient_restrictions =
{specific}
# The load comes from one address: let all its sessions in (as a local MX
# would for its own relays), and enough smtpd processes for them.
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
default_process_limit = {max(100, sessions * 2)}
maillog_file_prefixes = {root}
maillog_file = {root}/maillog
biff = no
"""


@contextmanager
def postfix_instance(root: Path) -> Iterator[None]:
    """The private Postfix configured under root/etc runs for the block, stopped even on failure."""
    start_daemon(["postfix", "-c", str(root / "etc"), "start"], root / "start.log")
    try:
        yield
    finally:
        subprocess.run(["postfix", "-c", str(root / "etc"), "stop"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def postfix_problems(root: Path) -> str | None:
    """A note on the maillog's deferred, bounced and fatal lines, if it has any."""
    errors = [line for line in (root / "maillog").read_text(errors="replace").splitlines()
              if "status=deferred" in line or "status=bounced" in line or "fatal:" in line]
    return f"postfix maillog: {len(errors)} deferred/bounced/fatal lines, first: {errors[0]}" if errors else None


POSTFIX_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""




# --- a runbox-mta instance ----------------------------------------------------------------


@dataclass(frozen=True)
class Listener:
    protocol: str  # smtp | submission | imap | pop3
    tls: str  # none | starttls | implicit
    port: int
    max_connections: int | None = None  # None: runbox-mta's default (1000)


@contextmanager
def runbox_instance(work: Path, *, hostname: str, domain: str, users: list[str], listeners: list[Listener],
                    extra_config: str = "", greeting: bytes = b"220",
                    prepare: Callable[[list[str]], None] | None = None) -> Iterator[Path]:
    """A runbox-mta daemon under WORK/runbox with its own config, certificate and SQLite
    database, driven only through its command line; yields the config path while it serves
    (SIGTERM and a wait when the block ends). `extra_config` is TOML appended as it is.
    `prepare`, if given, runs after the users exist and before the daemon starts, with the
    command prefix [runbox-mta, --config, PATH] (to import mail, say)."""
    base = work / "runbox"
    base.mkdir()
    config = base / "runbox-mta.toml"
    blocks = "".join(f'[[listeners]]\nprotocol = "{listener.protocol}"\nbind = "127.0.0.1"\n'
                     f'port = {listener.port}\ntls = "{listener.tls}"\n'
                     + (f"max_connections = {listener.max_connections}\n" if listener.max_connections else "")
                     for listener in listeners)
    config.write_text(f'''# runbox-mta benchmark configuration (temporary)
hostname = "{hostname}"
data_dir = "{base / 'var'}"
[database]
url = ""                      # SQLite in data_dir, WAL, synchronous=FULL
[tls]
cert = "{base / 'certs' / 'server.pem'}"
key = "{base / 'certs' / 'server.key'}"
[log]
level = "info"
{extra_config}
{blocks}''')
    conf = ["--config", str(config)]
    run([RUNBOX, *conf, "certs", "generate", "--hostname", "localhost", "--out", str(base / "certs")])
    run([RUNBOX, *conf, "db", "upgrade"])
    run([RUNBOX, *conf, "domain", "add", domain])
    for user in users:
        run([RUNBOX, *conf, "user", "add", user, "--password-stdin"], input=f"{BENCH_PASSWORD}\n".encode())
    if prepare is not None:
        prepare([RUNBOX, *conf])
    log = base / "runbox-mta.log"
    with log.open("wb") as out:
        process = subprocess.Popen([RUNBOX, *conf, "serve"], stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    (work / "runbox.pid").write_text(str(process.pid))
    try:
        first = listeners[0]
        wait_for_port(first.port, 60, process, log, b"* OK" if first.protocol == "imap" else greeting,
                      tls=client_tls() if first.tls == "implicit" else None)
        yield config
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        (work / "runbox.pid").unlink(missing_ok=True)  # so scripts/bench never signals a reused pid
