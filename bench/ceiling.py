"""The connection ceiling at scale: idle connections held under a descriptor limit, and the
refusal at the cap (issue 16's target: soft limit 1,024, hard 20,000; 15,000 idle connections
held; at the cap a new client gets 503 at once; the log stays under 1 MB).

    python bench/ceiling.py [--soft 1024] [--hard 20000] [--hold 15000]

Starts the daemon (pinned like bench/run.py) under ``prlimit``, opens ``--hold`` idle
authenticated connections one user each, then fills up to the cap the daemon logged, times one
more handshake (expected: 503 server_full), checks /api/health, and prints a JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import run  # bench/run.py: processes, pinning, tokens, config
import wsclient


def prepare() -> tuple[Path, Path]:
    """A fresh database path and the bench's config."""
    work = run.OUT / "work"
    work.mkdir(parents=True, exist_ok=True)
    db = work / "ceiling.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    config = work / "ceiling-config.toml"
    run.bench_config(config, "FULL")
    return db, config


async def measure(soft: int, hard: int, hold: int, db: Path, config: Path) -> dict[str, Any]:
    port = run.free_port()
    argv = ["prlimit", f"--nofile={soft}:{hard}", "--", sys.executable,
            str(run.ROOT / "pitchey_ws.py"), "serve", "--config", str(config), "--host",
            run.HOST, "--port", str(port), "--db", str(db)]
    log = run.OUT / "ceiling.log"
    proc = run.Proc("ceiling", argv, log, run.SERVER_CORE, dict(os.environ, JWT_SECRET=run.SECRET))
    conns: list[wsclient.Conn] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if (await run.http_get(port, "/api/health", 2))[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or not proc.alive():
                raise RuntimeError(f"daemon not healthy; see {log}")
            await asyncio.sleep(0.1)
        found = re.search(r"up to (\d+) connections",
                          await asyncio.to_thread(log.read_text))
        if found is None:
            raise RuntimeError(f"no descriptor line in {log}")
        cap = int(found.group(1))
        started = time.perf_counter()
        held_s = -1.0
        user = 0

        async def one() -> None:
            nonlocal user
            user += 1
            conns.append(await wsclient.connect(run.HOST, port, run.ws_path(user), 60))

        for start in range(0, cap, 200):  # 200 handshakes at a time
            await asyncio.gather(*(one() for _ in range(min(200, cap - start))))
            if len(conns) == hold:
                held_s = time.perf_counter() - started
        opened_s = time.perf_counter() - started
        refused_status, refused_ms = 0, 0.0
        t = time.perf_counter()
        try:
            conns.append(await wsclient.connect(run.HOST, port, run.ws_path(user + 1), 10))
        except wsclient.HandshakeError as exc:
            refused_status = exc.status
        refused_ms = (time.perf_counter() - t) * 1000
        health = (await run.http_get(port, "/api/health", 5))[0]
        return {"soft": soft, "hard": hard, "cap": cap, "held": len(conns),
                "hold_target": hold, "held_target_s": round(held_s, 1),
                "all_open_s": round(opened_s, 1), "beyond_cap_status": refused_status,
                "beyond_cap_ms": round(refused_ms, 1), "health": health,
                "log_bytes": (await asyncio.to_thread(log.stat)).st_size}
    finally:
        for c in conns:
            c.abort()
        proc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--soft", type=int, default=1024)
    parser.add_argument("--hard", type=int, default=20000)
    parser.add_argument("--hold", type=int, default=15000)
    args = parser.parse_args()
    if shutil.which("prlimit") is None:
        print("skipped: prlimit (util-linux) not found")
        return 0
    run.setup_driver()
    db, config = prepare()
    print(json.dumps(asyncio.run(measure(args.soft, args.hard, args.hold, db, config))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
