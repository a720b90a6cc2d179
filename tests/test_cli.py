"""Section 1: the command line, the config file and startup refusals."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jwt
from conftest import ROOT, SECRET, Connector, Daemon, write_config

SCRIPT = str(ROOT / "pitchey_ws.py")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "JWT_SECRET"}
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=30,
        env={**environ, **(env or {})},
    )


def test_help_lists_every_option() -> None:
    """serve --help and token --help explain every option."""
    serve = run("serve", "--help").stdout
    for option in ("--config", "--host", "--port", "--db", "--demo"):
        assert option in serve
    token = run("token", "--help").stdout
    for option in ("--user-id", "--username", "--ttl"):
        assert option in token


def test_no_secret_refuses(tmp_path: Path) -> None:
    """Without JWT_SECRET or auth.jwt_secret, serve exits with a clear message."""
    result = run("serve", "--db", str(tmp_path / "x.db"), "--port", "0")
    assert result.returncode == 2
    assert "JWT_SECRET" in result.stderr


def test_unknown_key_names_it(tmp_path: Path) -> None:
    """An unknown config key stops the daemon and the message names it."""
    config = tmp_path / "c.toml"
    write_config(config, {"limits.frames_per_secnd": 5})
    result = run("serve", "--config", str(config), env={"JWT_SECRET": SECRET})
    assert result.returncode == 2 and "limits.frames_per_secnd" in result.stderr
    write_config(config, {"typo.key": 1})
    result = run("serve", "--config", str(config), env={"JWT_SECRET": SECRET})
    assert result.returncode == 2 and "typo" in result.stderr


def test_wrong_type_names_key(tmp_path: Path) -> None:
    """A value of the wrong type (or a bad value) is a startup error naming the key."""
    config = tmp_path / "c.toml"
    write_config(config, {"history.page_size": "fifty"})
    result = run("serve", "--config", str(config), env={"JWT_SECRET": SECRET})
    assert result.returncode == 2 and "history.page_size" in result.stderr
    write_config(config, {"auth.algorithms": ["none"]})
    result = run("serve", "--config", str(config), env={"JWT_SECRET": SECRET})
    assert result.returncode == 2 and "auth.algorithms" in result.stderr
    config.write_text("[server\nport = 1")
    result = run("serve", "--config", str(config), env={"JWT_SECRET": SECRET})
    assert result.returncode == 2 and "TOML" in result.stderr


def test_shipped_config_loads() -> None:
    """config.toml beside the script holds every key and loads cleanly."""
    sys.path.insert(0, str(ROOT))
    import config as cfg

    loaded = cfg.load(ROOT / "config.toml", environ={})
    assert loaded == cfg.Config()  # the file documents exactly the defaults
    assert loaded.limits.max_connections_per_user == 10
    assert loaded.presence.offline_grace_seconds == 2


def test_token_command_signs_with_secret() -> None:
    """token prints a JWT for the user, signed with JWT_SECRET."""
    result = run("token", "--user-id", "77", "--username", "Dev", "--ttl", "60",
                 env={"JWT_SECRET": SECRET})
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["userId"] == 77 and claims["username"] == "Dev"


def test_token_command_rejects_bad_id() -> None:
    """token refuses a non-positive user id."""
    assert run("token", "--user-id", "0", env={"JWT_SECRET": SECRET}).returncode == 2


async def test_demo_mode_without_secret(fresh_daemon: Daemon) -> None:
    """serve --demo starts without a secret, keeps its own, and mints demo tokens."""
    fresh_daemon.start("--demo", env={"JWT_SECRET": ""})
    status, _, body = fresh_daemon.get("/demo/token?userId=2")
    assert status == 200
    import json

    token = json.loads(body)["token"]
    assert fresh_daemon.get("/demo/token?userId=99")[0] == 400
    connector = Connector(fresh_daemon)
    try:
        client = await connector(2, token=token, wait_connected=False)
        hello = await client.expect("connected")
        assert hello["username"].startswith("Victor")
        joined = await client.request({"type": "join_conversation", "conversationId": 1},
                                      "conversation_joined")
        assert joined["messages"]
    finally:
        await connector.close_all()
    # The generated secret is kept: the token still works after a restart, and the token
    # command can sign with it.
    await fresh_daemon.astop()
    fresh_daemon.start("--demo", env={"JWT_SECRET": ""})
    minted = run("token", "--user-id", "1", "--db", str(fresh_daemon.db)).stdout.strip()
    connector = Connector(fresh_daemon)
    try:
        again = await connector(2, token=token, wait_connected=False)
        await again.expect("connected")
        mine = await connector(1, token=minted, wait_connected=False)
        await mine.expect("connected")
    finally:
        await connector.close_all()


def test_taken_port_exits_with_a_clear_message(tmp_path: Path) -> None:
    """serve on a port another process holds exits 1 at once, naming the address."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run("serve", "--db", str(tmp_path / "x.db"), "--port", str(port),
                     env={"JWT_SECRET": SECRET})
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_token_only_for_loopback_hosts(fresh_daemon: Daemon) -> None:
    """/demo/token refuses a foreign Host (DNS rebinding) or Origin with 403, answers loopback
    names, and names in server.demo_hosts."""
    import http.client
    import json

    write_config(fresh_daemon.config, {"presence.offline_grace_seconds": 0,
                                       "server.demo_hosts": ["demo.test"]})
    fresh_daemon.start("--demo", env={"JWT_SECRET": ""})

    def get(headers: dict[str, str], method: str = "GET",
            path: str = "/demo/token?userId=1") -> tuple[int, dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", fresh_daemon.port, timeout=10)
        conn.putrequest(method, path, skip_host=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        body = json.loads(response.read())
        conn.close()
        return response.status, body

    port = fresh_daemon.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "demo.test"):
        status, body = get({"Host": host})
        assert status == 200 and body["token"], (host, body)
    for headers in ({"Host": "attacker.example"}, {"Host": f"evil.test:{port}"},
                    {"Host": f"127.0.0.1:{port}", "Origin": "http://attacker.example"}):
        status, body = get(headers)
        assert (status, body["error"]) == (403, "host_not_allowed"), (headers, body)
    status, body = get({"Host": f"127.0.0.1:{port}", "Origin": f"http://localhost:{port}"})
    assert status == 200
    # The demo's sign-NDA button (a publish) is guarded the same way.
    status, body = get({"Host": "attacker.example", "Content-Length": "0"}, "POST",
                       "/demo/sign-nda")
    assert (status, body["error"]) == (403, "host_not_allowed"), body
