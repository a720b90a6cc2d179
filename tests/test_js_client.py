"""The JS client (client/pitchey-ws.js) under Node's test runner, against the real daemon.

Each tests/js/*.test.mjs file starts its own daemons (this interpreter, a temp dir, free ports)
so it can stop and restart them mid-test; see tests/js/helpers.mjs.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SCALE, SECRET

NODE = shutil.which("node")
JS_TESTS = sorted((ROOT / "tests" / "js").glob("*.test.mjs"))

pytestmark = pytest.mark.skipif(
    NODE is None, reason="node is not on PATH: the JS client tests need Node 20.10 or newer"
)


def node_flags() -> list[str]:
    """Node 20 has WebSocket only behind a flag; newer versions have it built in."""
    assert NODE is not None
    probe = subprocess.run(
        [NODE, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"],
        capture_output=True, timeout=30 * SCALE, check=False,
    )
    return [] if probe.returncode == 0 else ["--experimental-websocket"]


@pytest.mark.parametrize("script", JS_TESTS, ids=[p.name for p in JS_TESTS])
def test_node(script: Path, tmp_path: Path) -> None:
    """One tests/js file passes under `node --test` (its output is shown when it fails)."""
    assert NODE is not None
    env = {
        **os.environ,
        "PITCHEY_PYTHON": sys.executable,
        "PITCHEY_TMP": str(tmp_path),
        "PITCHEY_TEST_SECRET": SECRET,
        "PITCHEY_TEST_TIMEOUT_SCALE": str(SCALE),
    }
    # Its own process group, so a timeout also ends the daemons the script started.
    proc = subprocess.Popen(
        [NODE, *node_flags(), "--test", "--test-reporter=spec", str(script)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=100 * SCALE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{script.name} timed out:\n{out}\n{err}")
    assert proc.returncode == 0, f"{script.name} failed:\n{out}\n{err}"
