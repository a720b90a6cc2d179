"""Section 2: handshake authentication, over real sockets."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from conftest import SECRET, TIMEOUT, Connector, Daemon, eventually_db, make_token, new_user
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus


def b64(data: dict[str, object]) -> str:
    raw = json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def refused(daemon: Daemon, query: str = "", headers: dict[str, str] | None = None) -> dict:
    """Open a handshake that must fail with 401; return the JSON body."""
    with pytest.raises(InvalidStatus) as info:
        async with connect(daemon.url + query, additional_headers=headers,
                           open_timeout=TIMEOUT):
            pass
    response = info.value.response
    assert response.status_code == 401
    assert response.headers["Content-Type"] == "application/json"
    body: dict = json.loads(response.body)
    assert set(body) == {"error", "message"}
    return body


async def test_missing_token(daemon: Daemon) -> None:
    """No token at all is 401 missing_token."""
    body = await refused(daemon)
    assert body["error"] == "missing_token"


async def test_garbage_token(daemon: Daemon) -> None:
    """A token that is not a JWT is 401."""
    assert (await refused(daemon, "?token=not-a-jwt"))["error"] == "invalid_token"


async def test_bad_signature(daemon: Daemon) -> None:
    """A token signed with another secret is 401."""
    token = make_token(new_user(), secret="another-secret-entirely-0123456789")
    assert (await refused(daemon, f"?token={token}"))["error"] == "invalid_token"


async def test_expired(daemon: Daemon) -> None:
    """An expired token is 401 token_expired."""
    token = make_token(new_user(), exp=-10)
    assert (await refused(daemon, f"?token={token}"))["error"] == "token_expired"


async def test_alg_none(daemon: Daemon) -> None:
    """An unsigned alg:none token is refused."""
    claims = {"userId": new_user(), "exp": int(time.time()) + 60}
    token = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."
    await refused(daemon, f"?token={token}")


async def test_other_algorithm(daemon: Daemon) -> None:
    """A correctly signed token with an algorithm not pinned by config is refused."""
    token = make_token(new_user(), algorithm="HS512")
    assert (await refused(daemon, f"?token={token}"))["error"] == "invalid_token"


async def test_no_user_claim(daemon: Daemon) -> None:
    """A token naming no user (or a non-numeric sub) is refused."""
    await refused(daemon, f"?token={make_token(None)}")
    await refused(daemon, f"?token={make_token(None, sub='alice')}")
    await refused(daemon, f"?token={make_token(None, userId='12')}")


async def test_no_exp(daemon: Daemon) -> None:
    """exp is required by default."""
    token = jwt.encode({"userId": new_user()}, SECRET, algorithm="HS256")
    await refused(daemon, f"?token={token}")


async def test_numeric_sub_and_bearer_header(daemon: Daemon) -> None:
    """sub holding a decimal id works, and so does Authorization: Bearer."""
    uid = new_user()
    token = make_token(None, sub=str(uid), username="Sub User")
    async with connect(daemon.url, additional_headers={"Authorization": f"Bearer {token}"},
                       open_timeout=TIMEOUT) as ws:
        frame = json.loads(await ws.recv())
    assert frame["type"] == "connected"
    assert frame["userId"] == uid and frame["username"] == "Sub User"
    assert frame["timestamp"].endswith("Z")


async def test_profile_cached_in_users_table(daemon: Daemon, connect_to: Connector) -> None:
    """username and userType claims are stored in users and reused when a token lacks them."""
    uid = new_user()
    first = await connect_to(uid, token=make_token(uid, username="Ada", userType="investor"))
    await first.request({"type": "ping"}, "pong")
    await first.close()
    second = await connect_to(uid, token=make_token(uid), wait_connected=False)
    hello = await second.expect("connected")
    assert hello["username"] == "Ada"
    await eventually_db(
        daemon, "SELECT username, user_type FROM users WHERE id = ?", (uid,), [("Ada", "investor")]
    )


def test_unknown_path_is_404(daemon: Daemon) -> None:
    """Paths other than the known ones answer 404 JSON."""
    status, headers, body = daemon.get("/api/nothing")
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["error"] == "not_found"


def test_demo_routes_off_by_default(daemon: Daemon) -> None:
    """Without --demo there is no token endpoint and no demo page."""
    assert daemon.get("/demo/token?userId=1")[0] == 404
    assert daemon.get("/")[0] == 404


async def test_tokens_never_logged(daemon: Daemon, connect_to: Connector) -> None:
    """Neither a good nor a refused token appears in the log, even at DEBUG."""
    uid = new_user()
    good = make_token(uid)
    client = await connect_to(uid, token=good)
    await client.request({"type": "ping"}, "pong")
    bad = make_token(uid, secret="wrong-secret-wrong-secret-wrong-secret")
    await refused(daemon, f"?token={bad}")
    await refused(daemon, "", {"Authorization": f"Bearer {bad}"})
    log = daemon.log_text()
    assert f"user {uid} connected" in log
    assert good not in log and bad not in log
    assert good.split(".")[2] not in log and bad.split(".")[2] not in log
