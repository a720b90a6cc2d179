"""1:1 throughput with 1, 2 and 3 daemons on one PostgreSQL database and one Redis server.

    python bench/nodes.py [--nodes 1,2,3] [--seconds 4] [--warmup 1] [--pairs 50]

In one run, each configuration measured by ``bench/run.py``'s ``one_to_one`` scenario (N pairs,
closed loop, every message acknowledged by ``message_sent`` before the next goes out):

* ``relay``: the bare relay (``bench/relay.py``), the reference;
* ``daemon+postgres``: one daemon on PostgreSQL without ``backplane.url`` (in-process backplane);
* ``nodes=N``: N daemons with ``backplane.url`` set to one Redis server and ``database.url`` to
  one PostgreSQL database; pair k's sender is on node k mod N and its receiver on node
  (k + 1) mod N, so with more than one node every message crosses Redis.

Every daemon is pinned to core 0 (together: they share it), the driver to core 1; PostgreSQL
and Redis are not pinned, as in bench/run.py. Server CPU is all daemon processes together; Redis
and PostgreSQL CPU (postmaster and its children) are reported beside it. A functional check,
not a scaling figure: on 2 cores, more nodes only share the same core. Prints a markdown table
and writes bench/out/nodes.json. See docs/benchmarks.md, "More than one node".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import run  # bench/run.py: processes, pinning, tokens, config, the 1:1 scenario
import wsclient

NOTE = ("functional check, not scaling: this machine has {cores} cores; every daemon is pinned"
        " to core 0 and the driver to core 1, so 2 or 3 nodes share one core")


def pid_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and its direct children still alive (PostgreSQL's backends)."""
    total = pid_cpu(root)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == root:
            total += pid_cpu(int(stat.parent.name))
    return total


class Procs:
    """Several daemon processes seen as one by ``run.Window``: CPU summed over all of them."""

    def __init__(self, procs: list[run.Proc]) -> None:
        self.procs = procs

    def cpu_seconds(self) -> float:
        return sum(p.cpu_seconds() for p in self.procs)

    def thread_cpu(self) -> dict[str, float]:
        out = dict.fromkeys(("main_user", "main_sys", "others_user", "others_sys"), 0.0)
        for p in self.procs:
            for k, v in p.thread_cpu().items():
                out[k] += v
        return out


@dataclass
class Nodes:
    """N daemons on one database and one Redis, shaped like ``run.Server`` for ``one_to_one``."""

    target: str
    ports: list[int]
    procs: list[run.Proc]
    kind: str = "nodes"  # not "daemon": run.commit_stats() reads one daemon's /metrics only
    spec: run.Target = run.TARGETS["daemon+postgres"]

    @property
    def proc(self) -> Procs:
        return Procs(self.procs)

    @property
    def port(self) -> int:
        return self.ports[0]

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


async def start_nodes(n: int, redis_url: str, s: run.Settings) -> Nodes:
    label = f"nodes{n}"
    url = run.postgres_url(label)
    work = run.OUT / "work"
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, JWT_SECRET=run.SECRET)
    group = Nodes(f"nodes={n}", [], [])
    try:
        for i in range(n):  # one after the other: the first creates the schema
            config = work / f"{label}-node{i}.toml"
            run.bench_config(config, s.synchronous, url=url)
            with config.open("a") as f:
                f.write(f'[backplane]\nurl = "{redis_url}"\n')
            port = run.free_port()
            argv = [sys.executable, str(run.ROOT / "pitchey_ws.py"), "serve", "--config",
                    str(config), "--host", run.HOST, "--port", str(port)]
            proc = run.Proc(f"{label}-node{i}", argv, run.OUT / f"{label}-node{i}.log",
                            run.SERVER_CORE, env)
            group.ports.append(port)
            group.procs.append(proc)
            await wait_healthy(proc, port)
        await asyncio.sleep(0.3)
    except BaseException:
        group.stop()
        raise
    return group


async def wait_healthy(proc: run.Proc, port: int, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while True:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited at start; see {proc.log_path}")
        try:
            status, _ = await run.http_get(port, "/api/health", 2)
            if status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} not healthy after {limit}s")
        await asyncio.sleep(0.1)


async def cross_pairs(group: Nodes, s: run.Settings) -> run.Pairs:
    """Pair k: sender (user 1 + k) on node k mod N, receiver (10,001 + k) on the next node."""
    n = len(group.ports)
    a_ids = list(range(1, s.pairs + 1))
    b_ids = list(range(10_001, 10_001 + s.pairs))
    senders: list[wsclient.Conn | None] = [None] * s.pairs
    receivers: list[wsclient.Conn | None] = [None] * s.pairs
    try:
        for node, port in enumerate(group.ports):
            mine = [k for k in range(s.pairs) if k % n == node]
            theirs = [k for k in range(s.pairs) if (k + 1) % n == node]
            conns = await run.open_all(port, [a_ids[k] for k in mine] + [b_ids[k] for k in theirs],
                                       200, s.handshake_timeout)
            for k, c in zip(mine + theirs, conns, strict=True):
                if k in mine and senders[k] is None:
                    senders[k] = c
                else:
                    receivers[k] = c
    except BaseException:
        run.abort_all([c for c in senders + receivers if c is not None])
        raise
    ss = [c for c in senders if c is not None]
    rs = [c for c in receivers if c is not None]
    assert len(ss) == len(rs) == s.pairs
    cids = await asyncio.gather(*(
        run.create_conversation(a, [b], f"pair-{b}") for a, b in zip(ss, b_ids, strict=True)))
    return run.Pairs(ss, rs, list(cids))


class Others:
    """CPU of Redis and PostgreSQL over the same window as the daemons'."""

    def __init__(self, redis_pid: int | None, pg_pid: int | None) -> None:
        self.redis_pid, self.pg_pid = redis_pid, pg_pid

    def sample(self) -> tuple[float, float]:
        return (pid_cpu(self.redis_pid) if self.redis_pid else 0.0,
                tree_cpu(self.pg_pid) if self.pg_pid else 0.0)


async def measure(name: str, server: Any, pairs: run.Pairs, s: run.Settings,
                  others: Others) -> dict[str, Any]:
    # one_to_one warms up for o2o_warmup, then measures o2o_seconds; the Redis and PostgreSQL
    # samples span both (their share per message is an upper bound by the warm-up's messages).
    r0, p0 = others.sample()
    t0 = time.perf_counter()
    result = await run.one_to_one(server, pairs, s)
    wall = time.perf_counter() - t0
    r1, p1 = others.sample()
    total = result["messages_per_s"] * wall  # approximate: rate over the whole span
    result["redis_cpu_us_per_message"] = round(1e6 * (r1 - r0) / total, 1) if total else None
    result["postgres_cpu_us_per_message"] = round(1e6 * (p1 - p0) / total, 1) if total else None
    result["configuration"] = name
    run.log(f"  {name}: {result['messages_per_s']} msg/s, "
            f"{result['server_cpu_us_per_message']} us server CPU/msg (all nodes), "
            f"redis {result['redis_cpu_us_per_message']} us/msg, "
            f"postgres {result['postgres_cpu_us_per_message']} us/msg, "
            f"errors {result['errors']}, drained {result['drained']}{run.flags(result)}")
    return result


async def bench(args: argparse.Namespace, s: run.Settings) -> dict[str, Any]:
    sys.path.insert(0, str(run.ROOT / "tests"))
    import servers

    redis = servers.RedisServer()
    redis.start()
    results: list[dict[str, Any]] = []
    try:
        run.postgres_url("nodes_probe")  # start PostgreSQL before anything is measured
        pg = run._postgres_server
        pg_pid = pg.proc.pid if pg is not None and pg.proc is not None else None
        others = Others(redis.proc.pid if redis.proc is not None else None, pg_pid)
        for target in ("relay", "daemon+postgres"):
            run.log(f"[{target}]")
            async with run.running(target, f"nodes-{target.replace('+', '-')}", s) as server:
                pairs = await run.setup_pairs(server, s)
                try:
                    results.append(await measure(target, server, pairs, s, others))
                finally:
                    pairs.close()
        for n in args.nodes:
            run.log(f"[nodes={n}] backplane.url = {redis.url}")
            group = await start_nodes(n, redis.url, s)
            try:
                pairs = await cross_pairs(group, s)
                try:
                    results.append(await measure(group.target, group, pairs, s, others))
                finally:
                    pairs.close()
            finally:
                group.stop()
            redis.command("FLUSHALL")
    finally:
        redis.stop()
    return {
        "meta": {
            "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": run.machine_info(),
            "note": NOTE.format(cores=os.cpu_count()),
            "settings": {"pairs": s.pairs, "warmup": s.o2o_warmup, "seconds": s.o2o_seconds,
                         "content_chars": s.content_chars, "synchronous": s.synchronous},
        },
        "results": results,
    }


def table(out: dict[str, Any]) -> str:
    m = out["meta"]
    relay = next((r["messages_per_s"] for r in out["results"]
                  if r["configuration"] == "relay"), None)
    lines = [
        f"Run of {m['date']}, commit {m['machine']['commit']}, {m['machine']['nproc']} cores"
        f" ({m['machine']['cpu_model']}); {m['settings']['pairs']} pairs,"
        f" {m['settings']['seconds']} s measured after {m['settings']['warmup']} s warm-up,"
        f" synchronous={m['settings']['synchronous']}. {m['note'][0].upper()}{m['note'][1:]}.",
        "",
        "| configuration | msg/s | vs relay | server CPU (all nodes) | server µs/msg"
        " | Redis µs/msg | PostgreSQL µs/msg | driver CPU | errors | drained |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in out["results"]:
        mark = " VOID" if r.get("void") else (" ~" if r.get("noisy") else "")
        vs = f"{r['messages_per_s'] / relay:.2f}x" if relay else "-"
        lines.append(
            f"| {r['configuration']} | {r['messages_per_s']:,.0f}{mark} | {vs}"
            f" | {r['server_cpu']:.0%} | {r['server_cpu_us_per_message']}"
            f" | {r['redis_cpu_us_per_message']} | {r['postgres_cpu_us_per_message']}"
            f" | {r['driver_cpu']:.0%} | {r['errors']} | {r['drained']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--nodes", default="1,2,3", help="comma list of node counts")
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--results", default=str(run.OUT / "nodes.json"))
    args = parser.parse_args(argv)
    args.nodes = [int(x) for x in args.nodes.split(",") if x]
    s = run.Settings.make(False, "FULL")
    s.pairs, s.o2o_warmup, s.o2o_seconds = args.pairs, args.warmup, args.seconds
    run.OUT.mkdir(parents=True, exist_ok=True)
    run.setup_driver()
    try:
        try:
            import uvloop

            out = uvloop.run(bench(args, s))
        except ImportError:
            out = asyncio.run(bench(args, s))
    finally:
        run.Proc.stop_all()
    Path(args.results).write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(table(out))
    print(f"\nwrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
