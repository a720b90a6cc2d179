"""Run the daemon unchanged but for optional speed-ups, so the benchmark can measure them.

    python bench/serve_variant.py [--uvloop] [--stdjson] [--setwise]
        [--switchinterval=S] serve --config F ...

``--uvloop``: the daemon's ``asyncio.run`` runs on a uvloop event loop (uvloop 0.23 has no
``install()``; ``uvloop.run`` is the supported entry point).
``--stdjson``: ``protocol``'s JSON codec is the standard library's, as on a machine without
orjson (the daemon uses orjson when it is installed, which ``requirements.txt`` makes the case).
``--setwise``: a prototype of a proposed store.py change: each message's receipt rows are
inserted by ONE statement over a JSON array of the recipients (``json_each``) instead of one
``executemany`` row per recipient. Same rows, same transaction. (The daemon already marks
deliveries this way since commit 1334113.)
``--switchinterval=S``: ``sys.setswitchinterval(S)`` (default 0.005): how long the event loop
thread may keep the GIL while the SQLite worker threads wait for it.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


RECEIPTS_SETWISE = (
    "INSERT INTO message_read_receipts (message_id, user_id) SELECT ?, value FROM json_each(?)"
)


def _install_setwise() -> None:
    import json

    import store as st

    plain_insert = st.insert_message

    def insert_message(write: Any, message_id: int, conversation_id: int, sender_id: int,
                       receiver_id: Any, recipients: Any, *rest: Any) -> Any:
        # The original with no recipients, then every receipt row in one statement.
        ids = list(recipients)
        write = plain_insert(write, message_id, conversation_id, sender_id, receiver_id, [],
                             *rest)
        if ids:
            last = write.statements.pop()  # keep the conversation UPDATE last, as before
            write.add(RECEIPTS_SETWISE, (message_id, json.dumps(ids)))
            write.statements.append(last)
        return write

    st.insert_message = insert_message


def main(argv: list[str]) -> int:
    use_uvloop = "--uvloop" in argv
    use_stdjson = "--stdjson" in argv
    switch = [float(a.split("=", 1)[1]) for a in argv if a.startswith("--switchinterval=")]
    use_setwise = "--setwise" in argv
    rest = [a for a in argv if a not in ("--uvloop", "--stdjson", "--setwise")
            and not a.startswith("--switchinterval=")]
    if switch:
        sys.setswitchinterval(switch[0])
    sys.path.insert(0, str(ROOT))
    import protocol

    if use_stdjson:
        protocol.loads, protocol.dumps = protocol.std_loads, protocol.std_dumps
    if use_setwise:
        _install_setwise()
    if use_uvloop:
        import uvloop

        asyncio.run = uvloop.run  # type: ignore[assignment]
    import pitchey_ws
    return pitchey_ws.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
