"""`make bench`: pitchey-ws under load, against a bare relay and raw SQLite, in one run.

Scenarios (docs/benchmarks.md gives the exact definitions):

1. ``one_to_one``: N pairs, closed loop; each pair's sender sends the next ``send_message`` when
   the server's ``message_sent`` for the previous one arrives, the peer counts ``new_message``.
2. ``fanout``: a group of 10, 100 and 1,000 members, every member connected; a few members send
   with a bounded window of undelivered messages; deliveries/s = ``new_message`` frames received.
3. ``memory``: server RSS growth per connection with 5,000 idle authenticated connections.
4. ``storm``: the same 5,000 JWT handshakes opened as fast as the driver can; failures, rate.
5. ``latency``: open loop at half the daemon's scenario-1 maximum; send -> receive, p50/p99.

Targets: the daemon (plain, and on uvloop / without orjson via ``bench/serve_variant.py``),
the bare relay ``bench/relay.py``, the same relay on python-socketio (``bench/socketio_relay.py``,
driven over Socket.IO framing) and on Node and ``ws`` (``bench/ws_relay.js``); plus
``bench/sqlite_ref.py`` for the storage limit. The server is pinned to core 0, the driver (this
process) to core 1; a scenario whose driver used more than 90% of its core is marked VOID (it
measured the driver). Every process started here is stopped at the end, also on error or Ctrl-C.

    python bench/run.py [--quick] [--targets daemon,relay] [--scenarios storm,one_to_one]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
RESULTS = HERE / "results.json"
DOC = ROOT / "docs" / "benchmarks.md"
CHART = ROOT / "docs" / "benchmarks.png"
sys.path.insert(0, str(HERE))

import jwt  # noqa: E402
import wsclient  # noqa: E402

HOST = "127.0.0.1"
WS_PATH = "/api/messages/ws"
SIO_PATH = "/socket.io/?EIO=4&transport=websocket"  # Engine.IO v4, WebSocket transport only
SECRET = "bench-secret-not-for-production-0123456789abcdef"
VOID_CPU = 0.90
NOISY = 0.10  # share of a core used by other processes or stolen, beyond which a figure is noisy
SERVER_CORE, DRIVER_CORE = 0, 1

NEW_MESSAGE = b'{"type":"new_message"'
MESSAGE_SENT = b'{"type":"message_sent"'
ERROR = b'{"type":"error"'
CONVERSATION_CREATED = b'{"type":"conversation_created"'
CONTENT_L = b'"content":"L'
PONG = b'{"type":"pong"'

@dataclass(frozen=True)
class Target:
    kind: str  # "daemon", or a reference relay: "relay", "relay-node", "relay-socketio"
    flags: tuple[str, ...] = ()  # for bench/serve_variant.py or bench/relay.py
    scenarios: tuple[str, ...] | None = None  # None: every scenario asked for
    request_ids: bool = True  # the driver's send_message frames carry a requestId
    synchronous: str | None = None  # overrides --synchronous for this target
    about: str = ""
    # Run pitchey_ws.py from the checkout named by this environment variable instead (an
    # older commit, for before/after figures in one run); the config then has only the keys
    # every version knows.
    root_env: str | None = None
    # On the PostgreSQL engine: a fresh database of a server the bench starts (tests/servers.py).
    postgres: bool = False
    # How the driver frames the daemon's protocol: "json" (one JSON text frame per frame, the
    # daemon's own) or "socketio" (Socket.IO v5 events over Engine.IO v4, wsclient.SocketIOConn).
    codec: str = "json"


_postgres_server: Any = None
# Where the bench's PostgreSQL server runs (--postgres-core): "server" = the daemon's core,
# "driver" = the driver's core, "any" = both. Its processes inherit the affinity it starts with.
POSTGRES_PLACES = {"server": {SERVER_CORE}, "driver": {DRIVER_CORE},
                   "any": {SERVER_CORE, DRIVER_CORE}}
postgres_place = "driver"


def postgres_url(label: str) -> str:
    """A fresh database on the bench's PostgreSQL server (started on first use, on the cores
    of ``postgres_place``; stopped by tests/servers.py's exit hook). Raises RuntimeError with
    the reason when it cannot start."""
    global _postgres_server
    if _postgres_server is None:
        sys.path.insert(0, str(ROOT / "tests"))
        import servers

        own = os.sched_getaffinity(0)
        cores = POSTGRES_PLACES[postgres_place] & set(range(os.cpu_count() or 1))
        try:
            server = servers.PostgresServer()
            if cores:
                os.sched_setaffinity(0, cores)  # the postmaster inherits it, its backends too
            server.start()
        except servers.ServerUnavailable as exc:
            raise RuntimeError(f"PostgreSQL unavailable: {exc}") from exc
        finally:
            os.sched_setaffinity(0, own)
        _postgres_server = server
    name = re.sub(r"[^a-z0-9_]", "_", f"bench_{label}".lower())
    _postgres_server.drop_database(name)
    return str(_postgres_server.create_database(name))


TARGETS = {
    "daemon": Target("daemon", about="pitchey_ws.py as shipped"),
    "relay": Target("relay", about="reference (a): bench/relay.py, websockets, no persistence"),
    "relay-node": Target("relay-node",
                         about="reference (d): bench/ws_relay.js, Node and ws, no persistence"),
    "relay-socketio": Target("relay-socketio", codec="socketio",
                             about="reference (c): bench/socketio_relay.py, python-socketio on"
                                   " aiohttp, no persistence"),
    "daemon+uvloop": Target("daemon", ("--uvloop",), about="daemon on uvloop"),
    "daemon+stdjson": Target("daemon", ("--stdjson",),
                             about="daemon without orjson: protocol JSON by the standard library"),
    "daemon+postgres": Target("daemon", postgres=True,
                              scenarios=("one_to_one", "latency", "fanout"),
                              about="daemon on the PostgreSQL engine (database.url, asyncpg),"
                                    " a local server started by the bench"),
    "daemon+normal": Target("daemon", synchronous="NORMAL",
                            scenarios=("one_to_one", "latency", "fanout"),
                            about="daemon, database.synchronous = NORMAL (no fsync per commit)"),
    # Diagnostics for the profile discussion; not in the default run.
    "relay+uvloop": Target("relay", ("--uvloop",), about="reference relay on uvloop"),
    "daemon+switch": Target("daemon", ("--switchinterval=0.0005",),
                            about="GIL switch interval 0.5 ms instead of 5 ms"),
    "daemon-norid": Target("daemon", request_ids=False,
                           about="driver sends no requestId"),
    "daemon@base": Target("daemon", root_env="PITCHEY_BENCH_BASE",
                          about="pitchey_ws.py of the checkout in $PITCHEY_BENCH_BASE"),
    "daemon+postgres@base": Target("daemon", postgres=True, root_env="PITCHEY_BENCH_BASE",
                                   scenarios=("one_to_one", "latency", "fanout"),
                                   about="daemon+postgres, pitchey_ws.py of the checkout in"
                                         " $PITCHEY_BENCH_BASE"),
}
DEFAULT_TARGETS = ["daemon", "relay", "relay-node", "relay-socketio", "daemon+postgres",
                   "daemon+uvloop", "daemon+stdjson", "daemon+normal"]
REFERENCES = ["relay", "relay-node", "relay-socketio"]  # the reference relays, in report order
SCENARIOS = ["storm", "one_to_one", "latency", "fanout"]


@dataclass
class Settings:
    quick: bool
    pairs: int = 50
    content_chars: int = 64
    o2o_warmup: float = 2.0
    o2o_seconds: float = 8.0
    lat_warmup: float = 1.0
    lat_seconds: float = 8.0
    fan_sizes: tuple[int, ...] = (10, 100, 1000)
    fan_senders: int = 4
    fan_window: int = 8
    fan_warmup: float = 1.0
    fan_seconds: float = 5.0
    storm_connections: int = 5000
    storm_concurrency: int = 0  # handshakes in flight at once; 0 = all of them at once
    storm_settle: float = 3.0
    handshake_timeout: float = 30.0
    sqlite_seconds: float = 2.0
    sqlite_batches: tuple[int, ...] = (1, 50, 512)
    synchronous: str = "FULL"

    @classmethod
    def make(cls, quick: bool, synchronous: str) -> Settings:
        if not quick:
            return cls(quick=False, synchronous=synchronous)
        return cls(
            quick=True, synchronous=synchronous, o2o_warmup=0.5, o2o_seconds=2.0,
            lat_warmup=0.5, lat_seconds=2.0, fan_warmup=0.5, fan_seconds=1.5,
            storm_connections=500, storm_settle=1.0, sqlite_seconds=0.7, sqlite_batches=(1, 50),
        )


# -- processes ------------------------------------------------------------------------------


class Proc:
    """A child process in its own session; ``stop()`` ends it (SIGTERM, then SIGKILL)."""

    live: ClassVar[list[Proc]] = []

    def __init__(self, name: str, argv: list[str], log_path: Path, core: int | None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        if core is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", str(core), *argv]
        self.log = log_path.open("wb")
        self.popen = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.pid = self.popen.pid
        Proc.live.append(self)

    def cpu_seconds(self) -> float:
        """User + system CPU of the process and all its threads so far."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return 0.0
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def thread_cpu(self) -> dict[str, float]:
        """CPU seconds so far split four ways: the main thread's user and system time, and
        the other threads' (the daemon's SQLite writer and reader) user and system time."""
        out = dict.fromkeys(("main_user", "main_sys", "others_user", "others_sys"), 0.0)
        tick = os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{self.pid}/task").glob("*"):
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            who = "main" if task.name == str(self.pid) else "others"
            out[f"{who}_user"] += int(fields[11]) / tick
            out[f"{who}_sys"] += int(fields[12]) / tick
        return out

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        else:
            # The leader is gone; make sure nothing it left in its group lives on.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        self.log.close()
        if self in Proc.live:
            Proc.live.remove(self)

    @classmethod
    def stop_all(cls) -> None:
        for proc in list(cls.live):
            with contextlib.suppress(Exception):
                proc.stop(5)


def setup_driver() -> dict[str, Any]:
    """Pin this process to the driver core and raise its open-file limit (children inherit)."""
    notes: dict[str, Any] = {}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    notes["nofile"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2:
        os.sched_setaffinity(0, {DRIVER_CORE})
        notes["pinned"] = True
    else:
        notes["pinned"] = False
    return notes


def postgres_cpu() -> float | None:
    """CPU seconds so far of the bench's PostgreSQL server: the postmaster and its children
    alive now (the backends, WAL writer, checkpointer...); None when none was started."""
    server = _postgres_server
    if server is None or server.proc is None:
        return None
    root = server.proc.pid
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat.parent.name == str(root) or int(fields[1]) == root:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def bench_config(path: Path, synchronous: str, *, portable: bool = False,
                 url: str | None = None) -> None:
    """The shipped defaults, but rate limits and delivery budgets out of the way (they are
    per user). ``portable``: only keys older versions know too (no delivery budget)."""
    budget = "" if portable else (
        "deliveries_per_second = 1000000000\n"
        "deliveries_burst = 1000000000\n"
    )
    path.write_text(
        "# Written by bench/run.py: defaults, except the per-user rate limits are out of the way.\n"
        "[database]\n"
        f'synchronous = "{synchronous}"\n'
        + (f'url = "{url}"\n' if url else "")
        + "[limits]\n"
        "frames_per_second = 1000000\n"
        "frames_burst = 1000000\n"
        "flood_max_dropped = 1000000\n"
        f"{budget}"
        "max_connections = 20000\n"
    )


class Server:
    """One server under test (daemon, variant or relay) with a fresh database."""

    def __init__(self, target: str, label: str, settings: Settings) -> None:
        spec = TARGETS[target]
        kind, flags = spec.kind, list(spec.flags)
        self.target, self.kind, self.spec = target, kind, spec
        self.port = free_port()
        work = OUT / "work"
        work.mkdir(parents=True, exist_ok=True)
        self.db = work / f"{label}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.db}{suffix}").unlink(missing_ok=True)
        py = sys.executable
        listen = ["--host", HOST, "--port", str(self.port)]
        if kind == "relay":
            argv = [py, str(HERE / "relay.py"), *listen, *flags]
        elif kind == "relay-node":
            argv = [node_binary() or "node", str(HERE / "ws_relay.js"), *listen, *flags]
        elif kind == "relay-socketio":
            argv = [py, str(HERE / "socketio_relay.py"), *listen, *flags]
        else:
            config = work / f"{label}-config.toml"
            root = ROOT
            if spec.root_env is not None:
                if not os.environ.get(spec.root_env):
                    raise RuntimeError(f"{target} needs ${spec.root_env}: a checkout to run")
                root = Path(os.environ[spec.root_env])
            url = postgres_url(label) if spec.postgres else None
            bench_config(config, spec.synchronous or settings.synchronous,
                         portable=spec.root_env is not None, url=url)
            serve = ["serve", "--config", str(config), "--host", HOST, "--port",
                     str(self.port), *(() if url else ("--db", str(self.db)))]
            if flags:
                argv = [py, str(HERE / "serve_variant.py"), *flags, *serve]
            else:
                argv = [py, str(root / "pitchey_ws.py"), *serve]
        env = dict(os.environ, JWT_SECRET=SECRET)
        self.proc = Proc(target, argv, OUT / f"{label}.log", SERVER_CORE, env)

    async def wait_ready(self, limit: float = 20.0) -> None:
        deadline = time.monotonic() + limit
        while True:
            if not self.proc.alive():
                raise RuntimeError(f"{self.target} exited at start; see {self.proc.log_path}")
            try:
                status, _ = await http_get(self.port, "/api/health", 2)
                if status == 200:
                    return
            except (OSError, EOFError):  # not listening yet, or closed without an answer
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.target} not healthy after {limit}s")
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        self.proc.stop()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.db}{suffix}").unlink(missing_ok=True)


def node_binary() -> str | None:
    """The ``node`` to run bench/ws_relay.js with, or None."""
    return shutil.which("node")


def unavailable(target: str) -> str | None:
    """Why ``target`` cannot run on this machine (None: it can). A reference relay on a
    runtime that is missing is skipped with this reason instead of failing the run (as is a
    target whose server does not start: ``bench()`` records its error the same way)."""
    kind = TARGETS[target].kind
    if kind == "relay-node":
        if node_binary() is None:
            return "node not found"
        if not (HERE / "node_modules" / "ws" / "package.json").exists():
            return "bench/node_modules/ws missing: run `npm ci` in bench/ (make bench does)"
    if kind == "relay-socketio":
        import importlib.util

        for module in ("socketio", "aiohttp"):
            if importlib.util.find_spec(module) is None:
                return f"{module} not installed: pip install -r bench/requirements.txt"
    return None


@contextlib.asynccontextmanager
async def running(target: str, label: str, settings: Settings) -> AsyncIterator[Server]:
    server = Server(target, label, settings)
    try:
        await server.wait_ready()
        await asyncio.sleep(0.3)  # let start-up allocations settle before any baseline
        yield server
    finally:
        server.stop()


async def http_get(port: int, path: str, limit: float = 5.0) -> tuple[int, bytes]:
    timeout = limit
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                     "Connection: close\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status = int(head[9:12])
        match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
        if match:
            body = await asyncio.wait_for(reader.readexactly(int(match.group(1))), timeout)
        else:
            body = await asyncio.wait_for(reader.read(-1), timeout)
        return status, body
    finally:
        writer.close()


async def commit_stats(server: Server) -> dict[str, float] | None:
    """The daemon's group-commit counters from /metrics (None for the relay)."""
    if server.kind != "daemon":
        return None
    _, body = await http_get(server.port, "/metrics")
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        for name in ("pitchey_commit_batch_size_sum", "pitchey_commit_batch_size_count",
                     "pitchey_commit_seconds_sum", "pitchey_commit_seconds_count",
                     "pitchey_messages_stored_total", 'pitchey_commit_seconds_bucket{le="0.005"}',
                     'pitchey_commit_seconds_bucket{le="0.01"}'):
            if line.startswith(name + " "):
                out[name] = float(line.split()[1])
    return out


def commit_delta(before: dict[str, float] | None, after: dict[str, float] | None
                 ) -> dict[str, float] | None:
    if not before or not after:
        return None
    n = after["pitchey_commit_batch_size_count"] - before["pitchey_commit_batch_size_count"]
    if n <= 0:
        return None
    size = after["pitchey_commit_batch_size_sum"] - before["pitchey_commit_batch_size_sum"]
    secs = after["pitchey_commit_seconds_sum"] - before["pitchey_commit_seconds_sum"]
    out = {"commits": n, "mean_batch": round(size / n, 1),
           "mean_commit_ms": round(1000 * secs / n, 3)}
    for ms, bucket in (("5", 'pitchey_commit_seconds_bucket{le="0.005"}'),
                       ("10", 'pitchey_commit_seconds_bucket{le="0.01"}')):
        if bucket in before and bucket in after:
            out[f"over_{ms}ms"] = n - (after[bucket] - before[bucket])
    return out


# -- measurement window ---------------------------------------------------------------------


class Window:
    """Wall time, driver CPU and server CPU between ``start()`` and ``stop()``.

    With ``--profile``, py-spy samples the server (pinned to the driver's core) for the
    window's planned length; its collapsed stacks land in ``bench/out/profile-<name>.txt``.
    """

    profile_target: str | None = None

    def __init__(self, server: Server, name: str = "", planned: float = 0.0) -> None:
        self.server = server
        self.name = name
        self.planned = planned
        self.spy: Proc | None = None

    def start(self) -> None:
        if self.name and self.planned and self.server.target == Window.profile_target:
            spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
            self.raw = OUT / f"profile-{self.server.target}-{self.name}.raw"
            self.spy = Proc("py-spy", [spy, "record", "--pid", str(self.server.proc.pid),
                                       "--duration", str(max(1, round(self.planned))),
                                       "--rate", "250", "--nonblocking", "--gil", "--format", "raw",
                                       "--output", str(self.raw)],
                            OUT / f"profile-{self.name}.log", DRIVER_CORE)
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()
        self.s0 = self.server.proc.cpu_seconds()
        self.th0 = self.server.proc.thread_cpu()
        self.pg0 = postgres_cpu() if self.server.spec.postgres else None
        self.k0 = core_ticks()

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t0
        self.wall = wall
        driver = (time.process_time() - self.c0) / wall
        server = (self.server.proc.cpu_seconds() - self.s0) / wall
        k1 = core_ticks()
        result: dict[str, Any] = {
            "seconds": round(wall, 3),
            "driver_cpu": round(driver, 3),
            "server_cpu": round(server, 3),
            "server_cpu_s": round(server * wall, 4),
            "server_threads_s": {k: round(v - self.th0.get(k, 0.0), 3)
                                 for k, v in self.server.proc.thread_cpu().items()},
        }
        pg1 = postgres_cpu() if self.pg0 is not None else None
        if self.pg0 is not None and pg1 is not None:
            # On PostgreSQL the database's CPU is part of each message's cost: kept apart
            # from the daemon's so that both figures stay comparable with the SQLite daemon's.
            result["postgres_cpu_s"] = round(pg1 - self.pg0, 4)
        # What else ran on the two cores meanwhile (other processes, the hypervisor's steal):
        # a figure taken while the cores were shared is marked noisy. The bench's PostgreSQL
        # server is part of what is measured, not an other, on the one core it is pinned to.
        pg_cores = POSTGRES_PLACES[postgres_place]
        pg_share = result.get("postgres_cpu_s", 0.0) / wall if len(pg_cores) == 1 else 0.0
        for label, core, own in (("server", SERVER_CORE, server), ("driver", DRIVER_CORE, driver)):
            if core in pg_cores:
                own += pg_share
            if core in self.k0 and core in k1:
                busy0, steal0, total0 = self.k0[core]
                busy1, steal1, total1 = k1[core]
                total = max(1, total1 - total0)
                result[f"{label}_core_others"] = round(max(0.0, (busy1 - busy0) / total - own), 3)
                result[f"{label}_core_steal"] = round((steal1 - steal0) / total, 3)
        result["noisy"] = any(result.get(k, 0) > NOISY for k in (
            "server_core_others", "driver_core_others", "server_core_steal", "driver_core_steal"))
        if self.spy is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.spy.popen.wait(30)
            self.spy.stop()
            result["profiled"] = True
            if self.raw.exists():
                report = OUT / f"profile-{self.server.target}-{self.name}.txt"
                report.write_text(summarize_profile(self.raw))
                result["profile"] = str(report.relative_to(ROOT))
        return result


def core_ticks() -> dict[int, tuple[int, int, int]]:
    """Per core: (busy, steal, total) jiffies from /proc/stat."""
    out: dict[int, tuple[int, int, int]] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals[:8]]
                user, nice, system, idle, iowait, irq, softirq, steal = v + [0] * (8 - len(v))
                busy = user + nice + system + irq + softirq
                out[int(name[3:])] = (busy, steal, busy + idle + iowait + steal)
    return out


def summarize_profile(raw: Path, top: int = 30) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        frames = [f.replace(str(ROOT) + "/", "").replace(sys.prefix + "/", "") for f in frames]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    lines = [f"{total} samples of whichever server thread held the GIL (py-spy --gil): Python"
             " CPU only; SQLite and system calls run without the GIL and are not seen", "",
             "self %  function"]
    lines += [f"{100 * c / total:6.1f}  {f}" for f, c in own.most_common(top)]
    lines += ["", "incl %  function"]
    lines += [f"{100 * c / total:6.1f}  {f}" for f, c in incl.most_common(top)]
    return "\n".join(lines) + "\n"


def postgres_text(result: dict[str, Any], op: str) -> str:
    value = result.get(f"postgres_cpu_us_per_{op}")
    return "" if value is None else f", PostgreSQL {value} us CPU/{op}"


def threads_text(split: dict[str, float | None]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in split.items())


def per_op(window: dict[str, Any], ops: int) -> float | None:
    """Server CPU microseconds per operation: less sensitive to a shared core than a rate."""
    return round(1e6 * window["server_cpu_s"] / ops, 1) if ops else None


def per_op_postgres(window: dict[str, Any], ops: int) -> float | None:
    """The PostgreSQL server's CPU microseconds per operation (None off PostgreSQL)."""
    if "postgres_cpu_s" not in window or not ops:
        return None
    return round(1e6 * window["postgres_cpu_s"] / ops, 1)


def per_op_threads(window: dict[str, Any], ops: int) -> dict[str, float | None]:
    """``per_op`` split by thread and user/system time (see ``Proc.thread_cpu``)."""
    return {k: round(1e6 * v / ops, 1) if ops > 0 else None
            for k, v in window["server_threads_s"].items()}


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    result["void"] = result.get("driver_cpu", 0) > VOID_CPU
    return result


def token(user_id: int) -> str:
    return jwt.encode({"userId": user_id, "username": f"bench{user_id}",
                       "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


def ws_path(user_id: int) -> str:
    return f"{WS_PATH}?token={token(user_id)}"


Dial = tuple[str, bytes | None]  # request path, Socket.IO CONNECT auth (None: plain frames)


def dial(codec: str, user_id: int) -> Dial:
    """Where and how ``user_id`` connects to a target speaking ``codec``: the daemon's protocol
    carries the token in the URL; the Socket.IO relay gets it in the CONNECT packet's auth."""
    if codec == "socketio":
        return SIO_PATH, json.dumps({"token": token(user_id)}).encode()
    return ws_path(user_id), None


async def open_all(port: int, user_ids: list[int], concurrency: int, limit: float,
                   codec: str = "json") -> list[wsclient.Conn]:
    """Connect every user (failing loudly: these are set-up connections, not the storm)."""
    dials = [dial(codec, u) for u in user_ids]
    sem = asyncio.Semaphore(concurrency)

    async def one(path: str, auth: bytes | None) -> wsclient.Conn:
        async with sem:
            return await wsclient.connect(HOST, port, path, limit, auth)

    results = await asyncio.gather(*(one(*d) for d in dials), return_exceptions=True)
    conns = [r for r in results if isinstance(r, wsclient.Conn)]
    errors = [r for r in results if not isinstance(r, wsclient.Conn)]
    if errors:
        for c in conns:
            c.abort()
        raise RuntimeError(
            f"{len(errors)} of {len(dials)} set-up connections failed: {errors[0]!r}")
    return conns


def send_template(cid: int, marker: str, tail: str, request_prefix: str | None) -> bytes:
    """A send_message frame with a ``%(n)08d`` slot (and ``%(n)d`` in the requestId) for the
    sequence number; fill it with ``template % {b"n": seq}``."""
    head = b'{"type":"send_message","conversationId":%d,"content":"%s%%(n)08d%s"' % (
        cid, marker.encode(), tail.encode())
    if request_prefix is None:
        return head + b"}"
    return head + b',"requestId":"%s%%(n)d"}' % request_prefix.encode()


def abort_all(conns: list[wsclient.Conn]) -> None:
    for conn in conns:
        conn.abort()


async def create_conversation(creator: wsclient.Conn, others: list[int], rid: str) -> int:
    creator.send(json.dumps({"type": "create_conversation", "participantIds": others,
                             "requestId": rid}).encode())
    reply = await creator.expect(CONVERSATION_CREATED, 30)
    return int(json.loads(reply)["conversationId"])


async def replays_done(conns: list[wsclient.Conn], limit: float) -> None:
    """Return once the daemon has ended every connection's offline replay: it reads none of a
    connection's frames before, so the pong of a ping sent now comes after it. (A message
    committed while a member is still replaying reaches it inside the replay, as a
    queued_message, which a count of new_message frames does not see.)"""
    for conn in conns:
        conn.send(b'{"type":"ping"}')
    await asyncio.gather(*(conn.expect(PONG, limit) for conn in conns))


async def wait_until(check: Callable[[], bool], limit: float) -> bool:
    deadline = time.perf_counter() + limit
    while not check():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


# -- scenario 3+4: connection storm, then idle memory ---------------------------------------


async def storm(server: Server, s: Settings) -> dict[str, Any]:
    n = s.storm_connections
    ids = list(range(100_001, 100_001 + n))
    dials = [dial(server.spec.codec, u) for u in ids]  # minted before the clock starts
    rss0 = server.proc.rss_kib()
    conns: list[wsclient.Conn] = []
    failures: Counter[str] = Counter()
    times: list[float] = []
    concurrency = s.storm_concurrency or n
    sem = asyncio.Semaphore(concurrency)

    async def one(path: str, auth: bytes | None) -> None:
        async with sem:
            t = time.perf_counter()
            try:
                conn = await wsclient.connect(HOST, server.port, path, s.handshake_timeout, auth)
            except wsclient.HandshakeError as exc:
                failures[f"http {exc.status}" if exc.status else str(exc)[:80]] += 1
                return
            except (OSError, TimeoutError) as exc:
                failures[type(exc).__name__] += 1
                return
            times.append(time.perf_counter() - t)
            conns.append(conn)

    window = Window(server)
    window.start()
    await asyncio.gather(*(one(*d) for d in dials))
    result = window.stop()
    try:
        await asyncio.sleep(s.storm_settle)
        rss1 = server.proc.rss_kib()
        _, body = await http_get(server.port, "/api/health")
        server_count = json.loads(body).get("connections")
        dropped = sum(1 for c in conns if c.closed.done())
    finally:
        abort_all(conns)
    times.sort()
    ok = len(conns)
    result.update({
        "connections": n,
        "concurrency": concurrency,
        "ok": ok,
        "failures": n - ok,
        "failure_kinds": dict(failures),
        "handshakes_per_s": round(ok / result["seconds"], 1),
        "server_cpu_us_per_handshake": per_op(result, ok),
        "handshake_p50_ms": round(1000 * pct(times, 0.50), 2),
        "handshake_p99_ms": round(1000 * pct(times, 0.99), 2),
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "kib_per_connection": round((rss1 - rss0) / ok, 2) if ok else None,
        "server_reports_connections": server_count,
        "dropped_while_idle": dropped,
    })
    return verdict(result)


# -- scenario 1: 1:1 closed loop ------------------------------------------------------------


class Run:
    active = False


class PairSender:
    """Closed loop: the next send_message goes out when message_sent for the last arrives."""

    __slots__ = ("acked", "conn", "errors", "first_error", "run", "sent", "template")

    def __init__(self, conn: wsclient.Conn, run: Run, template: bytes) -> None:
        self.conn, self.run, self.template = conn, run, template
        self.sent = self.acked = self.errors = 0
        self.first_error = b""

    def send_next(self) -> None:
        self.sent += 1
        self.conn.send(self.template % {b"n": self.sent})

    def on_frame(self, payload: bytes) -> None:
        if payload.startswith(MESSAGE_SENT):
            self.acked += 1
        elif payload.startswith(ERROR):
            self.acked += 1
            self.errors += 1
            self.first_error = self.first_error or payload[:200]
        else:
            return
        if self.run.active:
            self.send_next()


class Count:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def on_frame(self, payload: bytes) -> None:
        if payload.startswith(NEW_MESSAGE):
            self.n += 1


@dataclass
class Pairs:
    senders: list[wsclient.Conn]
    receivers: list[wsclient.Conn]
    cids: list[int]

    def close(self) -> None:
        abort_all(self.senders + self.receivers)


async def setup_pairs(server: Server, s: Settings) -> Pairs:
    a_ids = list(range(1, s.pairs + 1))
    b_ids = list(range(10_001, 10_001 + s.pairs))
    conns = await open_all(server.port, a_ids + b_ids, 200, s.handshake_timeout,
                           server.spec.codec)
    if server.spec.kind == "daemon":
        await replays_done(conns, s.handshake_timeout)  # as in fanout
    senders, receivers = conns[: s.pairs], conns[s.pairs :]
    cids = await asyncio.gather(*(
        create_conversation(a, [b], f"pair-{b}") for a, b in zip(senders, b_ids, strict=True)
    ))
    return Pairs(senders, receivers, list(cids))


async def one_to_one(server: Server, pairs: Pairs, s: Settings) -> dict[str, Any]:
    run = Run()
    rids = server.spec.request_ids
    tail = "x" * (s.content_chars - 9)
    senders = [PairSender(c, run, send_template(cid, "M", tail, f"o2o-{i}-" if rids else None))
               for i, (c, cid) in enumerate(zip(pairs.senders, pairs.cids, strict=True))]
    counts = [Count() for _ in pairs.receivers]
    for conn, role in zip(pairs.senders, senders, strict=True):
        conn.handler = role.on_frame
    for conn, count in zip(pairs.receivers, counts, strict=True):
        conn.handler = count.on_frame
    run.active = True
    for sender in senders:
        sender.send_next()
    await asyncio.sleep(s.o2o_warmup)
    window = Window(server, "one_to_one", s.o2o_seconds)
    m0 = await commit_stats(server)
    a0, r0 = sum(x.acked for x in senders), sum(c.n for c in counts)
    window.start()
    await asyncio.sleep(s.o2o_seconds)
    a1, r1 = sum(x.acked for x in senders), sum(c.n for c in counts)
    result = window.stop()
    m1 = await commit_stats(server)
    run.active = False
    drained = await wait_until(lambda: all(x.acked == x.sent for x in senders), 10)
    delivered_all = await wait_until(
        lambda: sum(c.n for c in counts) == sum(x.sent for x in senders), 10)
    wall = result["seconds"]
    result.update({
        "pairs": s.pairs,
        "messages_per_s": round((a1 - a0) / wall, 1),
        "deliveries_per_s": round((r1 - r0) / wall, 1),
        "server_cpu_us_per_message": per_op(result, a1 - a0),
        "postgres_cpu_us_per_message": per_op_postgres(result, a1 - a0),
        "server_threads_us_per_message": per_op_threads(result, a1 - a0),
        "errors": sum(x.errors for x in senders),
        "first_error": next((x.first_error.decode() for x in senders if x.first_error), None),
        "drained": drained and delivered_all,
        "commits": commit_delta(m0, m1),
    })
    return verdict(result)


# -- scenario 5: latency at a fixed offered load --------------------------------------------


async def latency(server: Server, pairs: Pairs, rate: float, s: Settings) -> dict[str, Any]:
    """Open loop: message k leaves at t0 + k/rate from sender k mod N; latency is the
    receiver's perf_counter at arrival minus the sender's at write (one process, one clock)."""
    total = max(10, int(rate * (s.lat_warmup + s.lat_seconds)))
    sent_at = [0.0] * total
    got_at = [0.0] * total
    received = [0]
    errors = [0]
    perf = time.perf_counter

    def on_receiver(payload: bytes) -> None:
        if payload.startswith(NEW_MESSAGE):
            i = payload.find(CONTENT_L)
            if i > 0:
                got_at[int(payload[i + 12 : i + 20])] = perf()
                received[0] += 1

    def on_sender(payload: bytes) -> None:
        if payload.startswith(ERROR):
            errors[0] += 1

    for conn in pairs.receivers:
        conn.handler = on_receiver
    for conn in pairs.senders:
        conn.handler = on_sender
    tail = "x" * (s.content_chars - 9)
    n = len(pairs.senders)
    rids = server.spec.request_ids
    templates = [(conn, send_template(cid, "L", tail, "lat-" if rids else None))
                 for conn, cid in zip(pairs.senders, pairs.cids, strict=True)]
    window = Window(server, "latency", s.lat_seconds)
    t0 = perf() + 0.05
    measure_from = int(rate * s.lat_warmup)
    k = 0
    started = False
    m0: dict[str, float] | None = None
    while k < total:
        now = perf()
        due = min(total, int((now - t0) * rate) + 1) if now >= t0 else 0
        if not started and due > measure_from:
            m0 = await commit_stats(server)
            window.start()
            started = True
        while k < due:
            conn, template = templates[k % n]
            sent_at[k] = perf()
            conn.send(template % {b"n": k})
            k += 1
        delay = t0 + k / rate - perf()
        # uvloop's timers count whole milliseconds: a shorter sleep returns at once, and
        # sleeping in slices of less than 1 ms spun the driver's core at ~2,000 msg/s. The
        # messages that fell due meanwhile go out together; latency counts from each write.
        await asyncio.sleep(max(delay, 0.001) if delay > 0 else 0)
    result = window.stop()
    m1 = await commit_stats(server)
    await wait_until(lambda: received[0] >= total, 10)
    lat = sorted(got_at[i] - sent_at[i] for i in range(measure_from, total) if got_at[i])
    lag = sorted(sent_at[i] - (t0 + i / rate) for i in range(measure_from, total))
    measured = total - measure_from
    result.update({
        "offered_per_s": round(rate, 1),
        "messages": measured,
        "lost": measured - len(lat),
        "errors": errors[0],
        "p50_ms": round(1000 * pct(lat, 0.50), 3),
        "p90_ms": round(1000 * pct(lat, 0.90), 3),
        "p99_ms": round(1000 * pct(lat, 0.99), 3),
        "max_ms": round(1000 * lat[-1], 3) if lat else None,
        "send_lag_p99_ms": round(1000 * pct(lag, 0.99), 3),
        "commits": commit_delta(m0, m1),
        "server_cpu_us_per_message": per_op(result, measured),
        "postgres_cpu_us_per_message": per_op_postgres(result, measured),
        "server_threads_us_per_message": per_op_threads(result, measured),
    })
    return verdict(result)


# -- scenario 2: group fan-out --------------------------------------------------------------


class Fan:
    """Shared state of one fan-out run: deliveries counted over every member connection, and
    senders parked while more than ``window`` messages' worth of deliveries are outstanding."""

    def __init__(self, per_message: int, window: int) -> None:
        self.per_message = per_message
        self.limit = window * per_message
        self.delivered = 0
        self.sent = 0
        self.parked: list[FanSender] = []
        self.active = False

    def on_frame(self, payload: bytes) -> None:
        if payload.startswith(NEW_MESSAGE):
            self.delivered += 1
            if self.parked and self.sent * self.per_message - self.delivered < self.limit:
                self.parked.pop().send_next()


class FanSender:
    __slots__ = ("acked", "conn", "errors", "fan", "seq", "template")

    def __init__(self, conn: wsclient.Conn, fan: Fan, template: bytes) -> None:
        self.conn, self.fan, self.template = conn, fan, template
        self.seq = self.acked = self.errors = 0

    def send_next(self) -> None:
        self.seq += 1
        self.fan.sent += 1
        self.conn.send(self.template % {b"n": self.seq})

    def on_frame(self, payload: bytes) -> None:
        if payload.startswith(NEW_MESSAGE):
            self.fan.on_frame(payload)
            return
        if payload.startswith(MESSAGE_SENT):
            self.acked += 1
        elif payload.startswith(ERROR):
            self.acked += 1
            self.errors += 1
        else:
            return
        fan = self.fan
        if not fan.active:
            return
        if fan.sent * fan.per_message - fan.delivered < fan.limit:
            self.send_next()
        else:
            fan.parked.append(self)


async def fanout(server: Server, size: int, base: int, s: Settings) -> dict[str, Any]:
    ids = list(range(base, base + size))
    conns = await open_all(server.port, ids, 200, s.handshake_timeout, server.spec.codec)
    try:
        if server.spec.kind == "daemon":
            # A run that started while members were still replaying counted too few
            # deliveries, and at 1,000 members its senders waited for them forever.
            await replays_done(conns, s.handshake_timeout)
        cid = await create_conversation(conns[0], ids[1:], f"group-{base}")
        fan = Fan(size - 1, s.fan_window)
        nsend = min(s.fan_senders, size)
        tail = "x" * (s.content_chars - 9)
        rids = server.spec.request_ids
        senders = [FanSender(c, fan, send_template(cid, "G", tail,
                                                   f"fan{base}-{i}-" if rids else None))
                   for i, c in enumerate(conns[:nsend])]
        for conn, role in zip(conns, senders, strict=False):
            conn.handler = role.on_frame
        for conn in conns[nsend:]:
            conn.handler = fan.on_frame
        fan.active = True
        for sender in senders:
            sender.send_next()
        await asyncio.sleep(s.fan_warmup)
        window = Window(server, f"fanout-{size}", s.fan_seconds)
        m0 = await commit_stats(server)
        d0, a0 = fan.delivered, sum(x.acked for x in senders)
        window.start()
        await asyncio.sleep(s.fan_seconds)
        d1, a1 = fan.delivered, sum(x.acked for x in senders)
        result = window.stop()
        m1 = await commit_stats(server)
        fan.active = False
        drained = await wait_until(
            lambda: fan.delivered >= fan.sent * fan.per_message
            and all(x.acked == x.seq for x in senders), 15)
        dropped = sum(1 for c in conns if c.closed.done())
    finally:
        abort_all(conns)
    wall = result["seconds"]
    result.update({
        "members": size,
        "senders": nsend,
        "window_messages": s.fan_window,
        "deliveries_per_s": round((d1 - d0) / wall, 1),
        "messages_per_s": round((a1 - a0) / wall, 1),
        "server_cpu_us_per_delivery": per_op(result, d1 - d0),
        "postgres_cpu_us_per_delivery": per_op_postgres(result, d1 - d0),
        "server_threads_us_per_delivery": per_op_threads(result, d1 - d0),
        "errors": sum(x.errors for x in senders),
        "drained": drained,
        "connections_dropped": dropped,
        "commits": commit_delta(m0, m1),
    })
    return verdict(result)


# -- the SQLite reference -------------------------------------------------------------------


def sqlite_reference(s: Settings) -> list[dict[str, Any]]:
    out = []
    work = OUT / "work"
    work.mkdir(parents=True, exist_ok=True)
    cases = [(b, 1, mode) for mode in ("minimal", "daemon") for b in s.sqlite_batches]
    cases += [(b, 99, mode) for mode in ("daemon", "per-row") for b in s.sqlite_batches if b > 1]
    for batch, recipients, mode in cases:
        db = work / "sqlite-ref.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        proc = Proc("sqlite", [sys.executable, str(HERE / "sqlite_ref.py"), "--db", str(db),
                               "--synchronous", s.synchronous, "--batch", str(batch),
                               "--seconds", str(s.sqlite_seconds), "--recipients",
                               str(recipients), "--mode", mode,
                               "--content-chars", str(s.content_chars)],
                    OUT / "sqlite-ref.log", SERVER_CORE)
        try:
            proc.popen.wait(s.sqlite_seconds + 60)
        finally:
            proc.stop()
        lines = (OUT / "sqlite-ref.log").read_text().strip().splitlines()
        out.append(json.loads(lines[-1]))
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    return out


def postgres_reference(s: Settings) -> list[dict[str, Any]]:
    """bench/pg_ref.py on fresh databases of the bench's PostgreSQL server, per batch size."""
    out = []
    for mode in ("minimal", "daemon"):
        for batch in s.sqlite_batches:
            url = postgres_url(f"pgref_{mode}_{batch}")
            proc = Proc("pgref", [sys.executable, str(HERE / "pg_ref.py"), "--url", url,
                                  "--batch", str(batch), "--seconds", str(s.sqlite_seconds),
                                  "--mode", mode, "--content-chars", str(s.content_chars)],
                        OUT / "pg-ref.log", SERVER_CORE)
            try:
                proc.popen.wait(s.sqlite_seconds + 60)
            finally:
                proc.stop()
            lines = (OUT / "pg-ref.log").read_text().strip().splitlines()
            out.append(json.loads(lines[-1]))
    return out


# -- orchestration --------------------------------------------------------------------------


def flags(r: dict[str, Any]) -> str:
    text = f" [server {r['server_cpu']:.0%}, driver {r['driver_cpu']:.0%}"
    if r.get("noisy"):
        text += (f"; NOISY: others {r.get('server_core_others', 0):.0%}/"
                 f"{r.get('driver_core_others', 0):.0%}, steal {r.get('server_core_steal', 0):.0%}/"
                 f"{r.get('driver_core_steal', 0):.0%} of server/driver core")
    if r.get("void"):
        text += "; VOID"
    return text + "]"


def log(text: str) -> None:
    print(text, flush=True)


async def bench_target(target: str, scenarios: list[str], s: Settings,
                       latency_rate: float | None) -> dict[str, Any]:
    res: dict[str, Any] = {}
    only = TARGETS[target].scenarios
    if only is not None:
        scenarios = [x for x in scenarios if x in only]
    tag = target.replace("+", "-")
    if "storm" in scenarios:
        async with running(target, f"{tag}-storm", s) as server:
            res["storm"] = await storm(server, s)
            st = res["storm"]
            log(f"  storm: {st['ok']}/{st['connections']} ok, {st['handshakes_per_s']}/s, "
                f"{st['kib_per_connection']} KiB/conn, {st['server_cpu_us_per_handshake']} us "
                f"server CPU/handshake{flags(st)}")
    if "one_to_one" in scenarios or "latency" in scenarios:
        async with running(target, f"{tag}-pairs", s) as server:
            pairs = await setup_pairs(server, s)
            try:
                if "one_to_one" in scenarios:
                    res["one_to_one"] = await one_to_one(server, pairs, s)
                    o = res["one_to_one"]
                    log(f"  1:1: {o['messages_per_s']} msg/s, "
                        f"{o['server_cpu_us_per_message']} us server CPU/msg "
                        f"({threads_text(o['server_threads_us_per_message'])})"
                        f"{postgres_text(o, 'message')}, commits {o['commits']}{flags(o)}")
                if "latency" in scenarios:
                    rate = latency_rate
                    if rate is None:
                        rate = 0.5 * res.get("one_to_one", {}).get("messages_per_s", 1000.0)
                    res["latency"] = await latency(server, pairs, rate, s)
                    lt = res["latency"]
                    log(f"  latency @ {lt['offered_per_s']}/s: p50 {lt['p50_ms']} ms, "
                        f"p99 {lt['p99_ms']} ms, lost {lt['lost']}, "
                        f"{lt['server_cpu_us_per_message']} us server CPU/msg "
                        f"({threads_text(lt['server_threads_us_per_message'])})"
                        f"{postgres_text(lt, 'message')}, commits {lt['commits']}{flags(lt)}")
            finally:
                pairs.close()
    if "fanout" in scenarios:
        res["fanout"] = {}
        async with running(target, f"{tag}-fanout", s) as server:
            for i, size in enumerate(s.fan_sizes):
                r = await fanout(server, size, 200_001 + 2000 * i, s)
                res["fanout"][str(size)] = r
                log(f"  fan-out {size}: {r['deliveries_per_s']} deliveries/s, "
                    f"{r['server_cpu_us_per_delivery']} us server CPU/delivery "
                    f"({threads_text(r['server_threads_us_per_delivery'])})"
                    f"{postgres_text(r, 'delivery')}, commits {r['commits']}{flags(r)}")
                await asyncio.sleep(0.5)  # let the server finish closing the last group
    return res


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in ("websockets", "aiosqlite", "PyJWT", "uvloop", "orjson", "python-socketio",
                 "python-engineio", "aiohttp"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[name] = version(name)
    node = node_binary()
    if node is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            versions["node"] = subprocess.run([node, "--version"], capture_output=True,
                                              text=True, timeout=10).stdout.strip().lstrip("v")
    with contextlib.suppress(OSError, ValueError, KeyError):
        ws_package = HERE / "node_modules" / "ws" / "package.json"
        versions["ws (npm)"] = json.loads(ws_package.read_text())["version"]
    import sqlite3

    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    return {
        "commit": commit,
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "kernel": platform.release(),
        "packages": versions,
    }


async def bench(args: argparse.Namespace, s: Settings, notes: dict[str, Any]) -> dict[str, Any]:
    # SIGINT/SIGTERM cancel the run; every `finally` on the way out stops its server, and
    # main() stops whatever is left.
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    results: dict[str, Any] = {
        "meta": {
            "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "quick": s.quick,
            "machine": machine_info(),
            "driver": {"loop": notes["loop"], "pinned": notes["pinned"], "core": DRIVER_CORE,
                       "server_core": SERVER_CORE, "nofile": notes["nofile"],
                       "postgres_core": postgres_place},
            "settings": {k: v for k, v in vars(s).items()},
            "void_threshold": VOID_CPU,
        },
        "targets": {},
    }
    latency_rate: float | None = args.latency_rate
    skipped: dict[str, str] = {}
    for target in args.targets:
        log(f"[{target}]")
        reason = unavailable(target)
        if reason is not None:
            log(f"  skipped: {reason}")
            skipped[target] = reason
            continue
        try:
            res = await bench_target(target, args.scenarios, s, latency_rate)
        except RuntimeError as exc:  # its server would not start, or set-up failed
            log(f"  FAILED: {exc}")
            skipped[target] = f"failed: {exc}"
            continue
        results["targets"][target] = res
        if target == "daemon" and "one_to_one" in res and args.latency_rate is None:
            latency_rate = 0.5 * res["one_to_one"]["messages_per_s"]
    if not args.no_sqlite:
        log("[sqlite reference]")
        results["sqlite"] = await asyncio.to_thread(sqlite_reference, s)
        for r in results["sqlite"]:
            log(f"  {r['mode']} batch {r['batch']} recipients {r['recipients']}: "
                f"{r['messages_per_s']} msg/s")
    if any(TARGETS[t].postgres for t in args.targets):
        log("[postgres reference]")
        results["postgres_ref"] = await asyncio.to_thread(postgres_reference, s)
        for r in results["postgres_ref"]:
            log(f"  {r['mode']} batch {r['batch']}: {r['messages_per_s']} msg/s,"
                f" {r['mean_commit_ms']} ms per transaction")
    results["skipped"] = skipped
    results["checks"] = checks(results)
    return results


# -- reporting ------------------------------------------------------------------------------


def get(d: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def cpu_ratio(reference: dict[str, Any], daemon: dict[str, Any], key: str) -> str:
    """reference CPU per op / daemon CPU per op: the throughput ratio the daemon would reach
    if both servers had a whole core; usable when a rate is noisy or VOID."""
    a, b = reference.get(key), daemon.get(key)
    return f"{a / b:.2f}" if a and b else "-"


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, judged on the plain daemon."""
    t = results["targets"]
    out: list[dict[str, Any]] = []

    def add(name: str, value: Any, goal: str, ok: bool | None, detail: str,
            void: bool = False, *runs: dict[str, Any]) -> None:
        out.append({"target": name, "value": value, "goal": goal,
                    "met": None if void else ok, "detail": detail, "void": void,
                    "noisy": any(r.get("noisy") for r in runs)})

    def versus(name: str, target: str, reference: str, key: tuple[str, ...], rate: str,
               unit: str, goal: str, passes: Callable[[float], bool],
               shown: tuple[str, str] | None = None,
               tail: Callable[[dict[str, Any], dict[str, Any]], str] | None = None) -> None:
        """``target`` against ``reference`` on one scenario: the rate ratio, both servers' CPU
        per operation, and the CPU-based ratio (or ``tail``). ``shown``: the rate's and the
        unit's words in the detail, when not ``rate`` and ``unit``."""
        d, r = get(t, target, *key), get(t, reference, *key)
        if not (d and r):
            return
        per_s, cpu = f"{rate}_per_s", f"server_cpu_us_per_{unit}"
        rate_word, unit_word = shown or (rate, unit)
        ratio = d[per_s] / r[per_s]
        add(name, round(ratio, 3), goal, passes(ratio),
            f"{d[per_s]:.0f} vs {r[per_s]:.0f} {rate_word}/s; server CPU {d[cpu]} vs {r[cpu]}"
            f" us/{unit_word}"
            + (tail(d, r) if tail else f" (CPU-based ratio {cpu_ratio(r, d, cpu)})"),
            d["void"] or r["void"], d, r)

    one, fan = ("one_to_one",), ("fanout", "100")
    versus("1:1 persisted vs bare relay", "daemon", "relay", one, "messages", "message",
           ">= 0.75x", lambda x: x >= 0.75, ("msg", "msg"))
    versus("1:1 on PostgreSQL vs bare relay", "daemon+postgres", "relay", one, "messages",
           "message", ">= 0.5x", lambda x: x >= 0.5, ("msg", "msg"),
           lambda d, _: f", PostgreSQL {d.get('postgres_cpu_us_per_message')} us/msg")
    versus("fan-out 100 members vs bare relay", "daemon", "relay", fan, "deliveries",
           "delivery", ">= 0.95x", lambda x: x >= 0.95)
    for label, key, rate, unit in (("1:1", one, "messages", "message"),
                                   ("fan-out 100 members", fan, "deliveries", "delivery")):
        versus(f"{label} vs python-socketio relay", "daemon", "relay-socketio", key, rate, unit,
               "> 1x (ahead)", lambda x: x > 1)
    st = get(t, "daemon", "storm")
    if st:
        kib = st["kib_per_connection"]
        add("idle memory per connection", kib, "<= 20 KiB", kib is not None and kib <= 20,
            f"RSS {st['rss_before_kib']} -> {st['rss_after_kib']} KiB over {st['ok']} conns")
        add(f"{st['connections']}-connection storm failures", st["failures"], "0",
            st["failures"] == 0, f"{st['handshakes_per_s']:.0f} handshakes/s, all"
            f" {st['concurrency']} in flight at once; {st['failure_kinds'] or 'no failures'}",
            False, st)
    lt = get(t, "daemon", "latency")
    if lt:
        add("p99 latency at half load", lt["p99_ms"], "<= 10 ms",
            lt["p99_ms"] <= 10 and lt["lost"] == 0,
            f"p50 {lt['p50_ms']} ms at {lt['offered_per_s']:.0f} msg/s offered", lt["void"], lt)
    return out


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def mark(r: dict[str, Any] | None) -> str:
    if not r:
        return ""
    return (" VOID" if r.get("void") else "") + (" ~" if r.get("noisy") else "")


def table(results: dict[str, Any]) -> str:
    t = results["targets"]
    sizes = [str(x) for x in results["meta"]["settings"]["fan_sizes"]]
    head = ["target", "1:1 msg/s"] + [f"fan {x} deliv/s" for x in sizes] + [
        "storm hs/s", "storm fail", "KiB/conn", "p50 ms", "p99 ms"]
    rows = [head]
    for name, res in t.items():
        o, st, lt = res.get("one_to_one"), res.get("storm"), res.get("latency")
        row = [name, (fmt(o["messages_per_s"]) + mark(o)) if o else "-"]
        for x in sizes:
            f = get(res, "fanout", x)
            row.append((fmt(f["deliveries_per_s"]) + mark(f)) if f else "-")
        row += [
            fmt(st["handshakes_per_s"]) + mark(st) if st else "-",
            fmt(st["failures"]) if st else "-",
            fmt(st["kib_per_connection"], 1) if st else "-",
            fmt(lt["p50_ms"], 2) if lt else "-",
            (fmt(lt["p99_ms"], 2) + mark(lt)) if lt else "-",
        ]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                        enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_figures(results: dict[str, Any]) -> str:
    """The generated part of docs/benchmarks.md: this run's figures, ratios and verdicts."""
    meta, t = results["meta"], results["targets"]
    m = meta["machine"]
    sizes = [str(x) for x in meta["settings"]["fan_sizes"]]
    out = [
        f"Run of {meta['date']}{' (QUICK smoke run: not representative)' if meta['quick'] else ''}"
        f" of commit {m.get('commit', 'unknown')}"
        f" on {m['nproc']} cores, {m['cpu_model']}, Python {m['python']}, SQLite {m['sqlite']},"
        f" kernel {m['kernel']}; "
        + ", ".join(f"{k} {v}" for k, v in m["packages"].items())
        + f". Driver event loop: {meta['driver']['loop']}; server pinned to core"
        f" {meta['driver']['server_core']}, driver to core {meta['driver']['core']}"
        f" (pinned: {meta['driver']['pinned']}). `synchronous={meta['settings']['synchronous']}`.",
        "",
        "`VOID`: the driver used more than 90% of its core (the figure measures the driver);"
        " `~`: noisy, other processes or the hypervisor took more than 10% of the server's or"
        " the driver's core during that window.",
        "",
        "### Targets from the issue (plain daemon)",
        "",
        "| target | goal | measured | met? | detail |",
        "|---|---|---|---|---|",
    ]
    for c in results.get("checks", []):
        met = "VOID (driver saturated)" if c["void"] else ("**met**" if c["met"] else "**missed**")
        met += " (noisy)" if c.get("noisy") else ""
        out.append(f"| {c['target']} | {c['goal']} | {c['value']} | {met} | {c['detail']} |")
    out += ["", "### Throughput", "",
            "| target | 1:1 msg/s | " + " | ".join(f"fan-out {x}: deliveries/s" for x in sizes)
            + " | server CPU (1:1) | driver CPU (1:1) | server µs/msg (1:1) | server µs/delivery"
            + "".join(f" ({x})" for x in sizes[1:2]) + " |",
            "|---|---:|" + "---:|" * len(sizes) + "---:|---:|---:|---:|"]
    for name, res in t.items():
        o = res.get("one_to_one")
        cells = [name, fmt(o["messages_per_s"]) + mark(o) if o else "-"]
        for x in sizes:
            f = get(res, "fanout", x)
            cells.append(fmt(f["deliveries_per_s"]) + mark(f) if f else "-")
        cells += [f"{o['server_cpu']:.0%}" if o else "-", f"{o['driver_cpu']:.0%}" if o else "-",
                  fmt(o["server_cpu_us_per_message"]) if o else "-",
                  fmt(get(res, "fanout", sizes[1], "server_cpu_us_per_delivery"), 1)
                  if len(sizes) > 1 else "-"]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "### Connections and latency", "",
            "| target | storm handshakes/s | failures | handshake p99 ms | idle KiB/conn"
            " | latency offered msg/s | p50 ms | p99 ms | max ms | lost |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, res in t.items():
        st, lt = res.get("storm"), res.get("latency")
        cells = [name]
        cells += ([fmt(st["handshakes_per_s"]) + mark(st), fmt(st["failures"]),
                   fmt(st["handshake_p99_ms"], 1), fmt(st["kib_per_connection"], 1)]
                  if st else ["-"] * 4)
        cells += ([fmt(lt["offered_per_s"]), fmt(lt["p50_ms"], 2), fmt(lt["p99_ms"], 2)
                   + mark(lt), fmt(lt["max_ms"], 1), fmt(lt["lost"])] if lt else ["-"] * 5)
        out.append("| " + " | ".join(cells) + " |")
    out += reference_figures(results)
    d = t.get("daemon", {})
    variants = [n for n in t if n.startswith("daemon+")]
    if d and variants:
        out += ["", "### Variants against the plain daemon (ratio; > 1 is better)", "",
                "| variant | 1:1 | " + " | ".join(f"fan-out {x}" for x in sizes)
                + " | storm hs/s | p99 latency (lower is better) |",
                "|---|---:|" + "---:|" * len(sizes) + "---:|---:|"]
        for name in variants:
            v = t[name]
            cells = [name, ratio(get(v, "one_to_one", "messages_per_s"),
                                 get(d, "one_to_one", "messages_per_s"))]
            for x in sizes:
                cells.append(ratio(get(v, "fanout", x, "deliveries_per_s"),
                                   get(d, "fanout", x, "deliveries_per_s")))
            cells.append(ratio(get(v, "storm", "handshakes_per_s"),
                               get(d, "storm", "handshakes_per_s")))
            cells.append(ratio(get(v, "latency", "p99_ms"), get(d, "latency", "p99_ms")))
            out.append("| " + " | ".join(cells) + " |")
    if results.get("sqlite"):
        out += ["", "### Storage reference (raw SQLite, same schema, one core)", "",
                "| mode | recipients/message | batch | messages/s | receipts/s |",
                "|---|---:|---:|---:|---:|"]
        for r in results["sqlite"]:
            out.append(f"| {r['mode']} | {r['recipients']} | {r['batch']} | "
                       f"{fmt(r['messages_per_s'])} | {fmt(r['receipts_per_s'])} |")
    for name, reason in results.get("skipped", {}).items():
        out += ["", f"`{name}` has no figures: {reason}."]
    o = get(t, "daemon", "one_to_one", "commits")
    if o:
        out += ["", f"Daemon group commit during 1:1: {o['commits']:.0f} commits, mean batch"
                f" {o['mean_batch']} writes, mean commit {o['mean_commit_ms']} ms."]
    return "\n".join(out)


def socketio_verdict(results: dict[str, Any]) -> str | None:
    """One line: is the daemon ahead of the python-socketio relay on 1:1 and on fan-out at 100
    members in this run (the issue's target), with both ratios; None without both targets."""
    t = results["targets"]
    pairs = [(get(t, "daemon", "one_to_one"), get(t, "relay-socketio", "one_to_one"),
              "messages_per_s", "1:1"),
             (get(t, "daemon", "fanout", "100"), get(t, "relay-socketio", "fanout", "100"),
              "deliveries_per_s", "fan-out 100")]
    if not all(d and r for d, r, _, _ in pairs):
        return None
    ratios = [(label, d[key] / r[key], d["void"] or r["void"], d.get("noisy") or r.get("noisy"))
              for d, r, key, label in pairs]
    if any(void for _, _, void, _ in ratios):
        answer = "VOID (driver saturated)"
    else:
        answer = "yes" if all(x > 1 for _, x, _, _ in ratios) else "no"
    noisy = " (noisy)" if any(n for *_, n in ratios) else ""
    detail = ", ".join(f"{label} {x:.2f}x" for label, x, _, _ in ratios)
    return f"Ahead of python-socketio on 1:1 and fan-out at 100: **{answer}**{noisy} ({detail})."


def reference_figures(results: dict[str, Any]) -> list[str]:
    """The reference relays side by side, with the daemon's figure as a share of each."""
    t = results["targets"]
    refs = [n for n in REFERENCES if n in t]
    out: list[str] = []
    if refs:
        out += ["", "### Reference relays (no persistence) and the daemon against each", "",
                "| reference | 1:1 msg/s | fan-out 100 deliveries/s | server µs/msg (1:1)"
                " | server µs/delivery (100) | idle KiB/conn | latency p99 ms"
                " | daemon/reference 1:1 | daemon/reference fan-out 100 |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    d = t.get("daemon", {})
    for name in refs:
        res = t[name]
        o, f = res.get("one_to_one"), get(res, "fanout", "100")
        st, lt = res.get("storm"), res.get("latency")
        out.append("| " + " | ".join([
            name,
            fmt(o["messages_per_s"]) + mark(o) if o else "-",
            fmt(f["deliveries_per_s"]) + mark(f) if f else "-",
            fmt(o["server_cpu_us_per_message"]) if o else "-",
            fmt(f["server_cpu_us_per_delivery"], 1) if f else "-",
            fmt(st["kib_per_connection"], 1) if st else "-",
            fmt(lt["p99_ms"], 2) + mark(lt) if lt else "-",
            ratio(get(d, "one_to_one", "messages_per_s"), get(res, "one_to_one", "messages_per_s")),
            ratio(get(d, "fanout", "100", "deliveries_per_s"), get(f, "deliveries_per_s")),
        ]) + " |")
    verdict_line = socketio_verdict(results)
    if verdict_line:
        out += ["", verdict_line]
    return out


def ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "-"
    return f"{a / b:.2f}x"


def chart(results: dict[str, Any], path: Path) -> None:
    """docs/benchmarks.png: four panels; hatched bars are noisy or VOID figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = results["targets"]
    palette = ["#1f77b4", "#7f7f7f", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
               "#17becf", "#bcbd22", "#d62728"]
    colors = {n: palette[i % len(palette)] for i, n in enumerate(t)}
    sizes = [str(x) for x in results["meta"]["settings"]["fan_sizes"]]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    title = "pitchey-ws benchmark" + (" (QUICK run)" if results["meta"]["quick"] else "")
    fig.suptitle(f"{title}: {results['meta']['date']}, {results['meta']['machine']['nproc']}"
                 " cores; server and driver pinned to one core each; hatched = noisy or VOID")

    def hatch(r: dict[str, Any] | None) -> str:
        return "//" if r and (r.get("noisy") or r.get("void")) else ""

    def bars(ax: Any, key: str, field: str) -> list[str]:
        names = [n for n in t if get(t, n, key, field) is not None]
        for i, n in enumerate(names):
            r = t[n][key]
            ax.bar(i, r[field], color=colors[n], hatch=hatch(r), edgecolor="white")
            ax.text(i, r[field], f"{r[field]:,.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, fontsize=8)
        return names

    ax = axes[0][0]
    bars(ax, "one_to_one", "messages_per_s")
    ax.set_yscale("log")
    refs = {r["batch"]: r["messages_per_s"] for r in results.get("sqlite", [])
            if r["recipients"] == 1 and r["mode"] == "daemon"}
    for (batch, rate), style in zip(sorted(refs.items()), [":", "-.", "--"], strict=False):
        ax.axhline(rate, color="red", linestyle=style, linewidth=1,
                   label=f"raw SQLite, daemon's writes, batch {batch}: {rate:,.0f}/s")
    if refs:
        ax.legend(fontsize=7, loc="center left")
    ax.set_title("1:1 persisted, closed loop: messages/s (log)")

    ax = axes[0][1]
    names = [n for n in t if get(t, n, "fanout")]
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        for j, x in enumerate(sizes):
            r = get(t, n, "fanout", x)
            if r:
                ax.bar(j + i * width, r["deliveries_per_s"], width, color=colors[n],
                       hatch=hatch(r), edgecolor="white", label=n if j == 0 else None)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))])
    ax.set_xticklabels([f"{x} members" for x in sizes])
    ax.set_yscale("log")
    ax.set_title("Group fan-out: deliveries/s (log)")
    ax.legend(fontsize=7)

    ax = axes[1][0]
    names = [n for n in t if get(t, n, "latency")]
    for i, n in enumerate(names):
        r = t[n]["latency"]
        ax.bar(i - 0.2, r["p50_ms"], 0.4, color="#1f77b4", hatch=hatch(r), edgecolor="white",
               label="p50" if i == 0 else None)
        ax.bar(i + 0.2, r["p99_ms"], 0.4, color="#ff7f0e", hatch=hatch(r), edgecolor="white",
               label="p99" if i == 0 else None)
        ax.text(i + 0.2, r["p99_ms"], f"{r['p99_ms']:,.1f}", ha="center", va="bottom",
                fontsize=7)
    ax.axhline(10, color="red", linestyle="--", label="p99 goal 10 ms")
    ax.set_yscale("log")
    rate = get(t, "daemon", "latency", "offered_per_s")
    ax.set_title(f"Delivery latency at {rate:,.0f} msg/s offered (ms, log)" if rate
                 else "Delivery latency (ms, log)")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, fontsize=8)
    ax.legend(fontsize=8)

    ax = axes[1][1]
    names = [n for n in t if get(t, n, "storm")]
    top = 20.0
    for i, n in enumerate(names):
        r = t[n]["storm"]
        kib = r["kib_per_connection"] or 0
        top = max(top, kib)
        ax.bar(i, kib, color=colors[n], hatch=hatch(r), edgecolor="white")
        ax.text(i, kib, f"{kib:.1f} KiB\n{r['handshakes_per_s']:,.0f} hs/s\n"
                f"{r['failures']} failed", ha="center", va="bottom", fontsize=7)
    ax.axhline(20, color="red", linestyle="--", label="goal 20 KiB")
    ax.set_ylim(0, top * 1.35)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, fontsize=8)
    n_conn = results["meta"]["settings"]["storm_connections"]
    ax.set_title(f"Idle memory per connection (KiB) after a {n_conn:,}-handshake storm")
    ax.legend(fontsize=8, loc="lower right")

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


BEGIN, END = "<!-- bench:figures:begin -->", "<!-- bench:figures:end -->"


def write_doc(results: dict[str, Any]) -> bool:
    """Replace the generated block of docs/benchmarks.md; the prose around it is kept."""
    if not DOC.exists():
        return False
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{markdown_figures(results)}\n{END}{tail}")
    return True


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="pitchey-ws benchmark (see docs/benchmarks.md)")
    parser.add_argument("--quick", action="store_true",
                        help="short smoke run (~2-3 minutes); never touches docs/")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help=f"comma list from {', '.join(TARGETS)}")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma list from {', '.join(SCENARIOS)}")
    parser.add_argument("--synchronous", default="FULL", choices=("FULL", "NORMAL", "OFF"),
                        help="database.synchronous for the daemon and the SQLite reference")
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite reference")
    parser.add_argument("--latency-rate", type=float, metavar="MSG_PER_S",
                        help="offer this load in the latency scenario (default: half the"
                             " daemon's 1:1 maximum measured in the same run)")
    parser.add_argument("--no-docs", action="store_true",
                        help="do not touch docs/ (a --quick run never does)")
    parser.add_argument("--pairs", type=int, help="sender/receiver pairs in scenarios 1 and 5"
                        " (default 50)")
    parser.add_argument("--storm-connections", type=int, help="override the storm size")
    parser.add_argument("--storm-concurrency", type=int, help="handshakes in flight at once")
    parser.add_argument("--results", default=str(RESULTS), help="where to write the JSON")
    parser.add_argument("--render", metavar="RESULTS",
                        help="run nothing: redraw the chart and the doc block from a results file")
    parser.add_argument("--postgres-core", choices=sorted(POSTGRES_PLACES), default=postgres_place,
                        help="where the PostgreSQL server of the daemon+postgres target runs:"
                             " the daemon's core, the driver's, or either (default: %(default)s)")
    parser.add_argument("--profile", metavar="TARGET",
                        help="sample TARGET (e.g. daemon) with py-spy during each measured window;"
                             " summaries in bench/out/profile-*.txt (figures are then perturbed)")
    args = parser.parse_args(argv)
    args.targets = [x for x in args.targets.split(",") if x]
    args.scenarios = [x for x in args.scenarios.split(",") if x]
    for x in args.targets:
        if x not in TARGETS:
            parser.error(f"unknown target {x}")
    for x in args.scenarios:
        if x not in SCENARIOS:
            parser.error(f"unknown scenario {x}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
        results["checks"] = checks(results)
        print(table(results))
        chart(results, CHART)
        print(f"wrote {CHART}" + (f"; updated {DOC}" if write_doc(results) else ""))
        return 0
    s = Settings.make(args.quick, args.synchronous)
    if args.pairs:
        s.pairs = args.pairs
    if args.storm_connections:
        s.storm_connections = args.storm_connections
    if args.storm_concurrency:
        s.storm_concurrency = args.storm_concurrency
    OUT.mkdir(parents=True, exist_ok=True)
    Window.profile_target = args.profile
    global postgres_place
    postgres_place = args.postgres_core
    notes = setup_driver()

    def on_signal(signum: int, _: Any) -> None:
        # Outside the event loop (start-up, drawing): stop the children and leave at once.
        Proc.stop_all()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    try:
        try:
            import uvloop

            notes["loop"] = f"uvloop {uvloop.__version__}"
            results = uvloop.run(bench(args, s, notes))
        except ImportError:
            notes["loop"] = "asyncio"
            results = asyncio.run(bench(args, s, notes))
    finally:
        Proc.stop_all()
        shutil.rmtree(OUT / "work", ignore_errors=True)
    results["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table(results))
    print()
    for c in results["checks"]:
        met = "VOID" if c["void"] else ("met" if c["met"] else "MISSED")
        met += "*" if c.get("noisy") else ""
        print(f"{c['target']:<46} goal {c['goal']:<14} got {c['value']!s:<10} {met:<7}"
              f" ({c['detail']})")
    verdict_line = socketio_verdict(results)
    if verdict_line:
        print(verdict_line.replace("**", ""))
    for name, reason in results.get("skipped", {}).items():
        print(f"{name}: no figures: {reason}")
    void = [f"{n}/{k}" for n, res in results["targets"].items() for k, r in flat(res)
            if r.get("void")]
    if void:
        print(f"VOID (driver core > {VOID_CPU:.0%}; the figure measures the driver): "
              + ", ".join(void))
    print(f"\nwrote {args.results} in {results['meta']['elapsed_s']} s")
    if not args.quick and not args.no_docs:
        chart(results, CHART)
        print(f"wrote {CHART}")
        if write_doc(results):
            print(f"updated the figures in {DOC}")
    return 0


def flat(res: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for key, value in res.items():
        if key == "fanout":
            out += [(f"fanout-{size}", r) for size, r in value.items()]
        else:
            out.append((key, value))
    return out


if __name__ == "__main__":
    sys.exit(main())
