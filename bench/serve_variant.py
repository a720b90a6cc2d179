"""Run the daemon unchanged but for optional speed-ups, so the benchmark can measure them.

    python bench/serve_variant.py [--uvloop] [--stdjson] [--switchinterval=S]
        serve --config F ...

``--uvloop``: the daemon's ``asyncio.run`` runs on a uvloop event loop (uvloop 0.23 has no
``install()``; ``uvloop.run`` is the supported entry point).
``--stdjson``: ``protocol``'s JSON codec is the standard library's, as on a machine without
orjson (the daemon uses orjson when it is installed, which ``requirements.txt`` makes the case).
``--switchinterval=S``: ``sys.setswitchinterval(S)`` (default 0.005): how long the event loop
thread may keep the GIL while the SQLite worker threads wait for it.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    use_uvloop = "--uvloop" in argv
    use_stdjson = "--stdjson" in argv
    switch = [float(a.split("=", 1)[1]) for a in argv if a.startswith("--switchinterval=")]
    rest = [a for a in argv if a not in ("--uvloop", "--stdjson")
            and not a.startswith("--switchinterval=")]
    if switch:
        sys.setswitchinterval(switch[0])
    sys.path.insert(0, str(ROOT))
    import protocol
    import store_sqlite

    if use_stdjson:
        protocol.loads, protocol.dumps = protocol.std_loads, protocol.std_dumps
        store_sqlite.dumps = protocol.std_dumps
    if use_uvloop:
        import uvloop

        asyncio.run = uvloop.run  # type: ignore[assignment]
    import pitchey_ws
    return pitchey_ws.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
