"""Sections 2 and 12: handshake authentication over real sockets, and auth.Verifier in-process."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from typing import Any

import jwt
import jwt.algorithms
import pytest
from conftest import (
    SECRET,
    TIMEOUT,
    Connector,
    Daemon,
    conversation,
    eventually_db,
    make_token,
    new_user,
    write_config,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from auth import AuthError, Verifier
from config import AuthConfig


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


# -- auth.Verifier in-process: section 12 and claims that must never escape as errors ----------

HUGE_SUB = "9" * 5000


def verifier(**auth: Any) -> Verifier:
    return Verifier(AuthConfig(jwt_secret=SECRET, **auth))


def signed(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


def refusal(claims: dict[str, Any], **auth: Any) -> AuthError:
    with pytest.raises(AuthError) as info:
        verifier(**auth).verify(signed(claims))
    return info.value


def in_ms(seconds_from_now: float) -> int:
    return int((time.time() + seconds_from_now) * 1000)


def test_verify_ms_exp_auto() -> None:
    """In auto, an exp above 10^11 is milliseconds; expires_at is epoch seconds."""
    exp = in_ms(600)
    identity = verifier().verify(signed({"userId": 7, "exp": exp}))
    assert identity.expires_at == exp / 1000


def test_verify_ms_exp_expired_on_time() -> None:
    """A millisecond exp in the past is token_expired (PyJWT alone would take it as year 50000)."""
    assert refusal({"userId": 7, "exp": in_ms(-5)}).code == "token_expired"


def test_verify_seconds_exp_auto() -> None:
    """In auto, an exp in seconds is still seconds, and a past one is expired."""
    exp = int(time.time()) + 600
    assert verifier().verify(signed({"userId": 7, "exp": exp})).expires_at == exp
    assert refusal({"userId": 7, "exp": int(time.time()) - 5}).code == "token_expired"


def test_verify_exp_unit_forced() -> None:
    """exp_unit seconds or milliseconds reads every exp in that unit."""
    ms = verifier(exp_unit="milliseconds").verify(signed({"userId": 7, "exp": 4 * 10**12}))
    assert ms.expires_at == 4 * 10**9
    # 4e12 seconds is past year 9999: no usable instant.
    assert refusal({"userId": 7, "exp": 4 * 10**12}, exp_unit="seconds").code == "invalid_token"
    assert refusal({"userId": 7, "exp": int(time.time()) + 600},
                   exp_unit="milliseconds").code == "token_expired"


def test_verify_leeway_applies_to_ms_exp() -> None:
    """Handshake leeway covers a just-expired ms token; leeway=False (refresh) does not."""
    token = signed({"userId": 7, "exp": in_ms(-2)})
    assert verifier(leeway_seconds=30).verify(token).user_id == 7
    with pytest.raises(AuthError) as info:
        verifier(leeway_seconds=30).verify(token, leeway=False)
    assert info.value.code == "token_expired"


@pytest.mark.parametrize(
    "exp",
    ["1900000000", "1900000000000", "soon", True, False, float("nan"), float("inf"),
     float("-inf"), 10**400, -1, -(10**400), [1900000000], {"at": 1}],
    ids=repr,
)
def test_verify_bad_exp(exp: object) -> None:
    """exp as a string, bool, NaN, inf, huge, negative or list is invalid_token."""
    error = refusal({"userId": 7, "exp": exp})
    assert error.code == "invalid_token" and "exp" in error.message


@pytest.mark.parametrize("claim", ["iat", "nbf"])
@pytest.mark.parametrize(
    "value", ["123", "x", True, float("nan"), float("inf"), 10**400, -5, [1]], ids=repr
)
def test_verify_bad_iat_nbf(claim: str, value: object) -> None:
    """Weird iat or nbf is invalid_token, never another exception."""
    assert refusal({"userId": 7, "exp": in_ms(600), claim: value}).code == "invalid_token"


def test_verify_iat_nbf_units() -> None:
    """iat and nbf follow exp_unit too, so a Pitchey iat in ms is not 'issued in the future'."""
    now_ms = in_ms(0)
    assert verifier().verify(signed({"userId": 7, "exp": in_ms(600), "iat": now_ms})).user_id == 7
    future = {"userId": 7, "exp": in_ms(600), "nbf": in_ms(300)}
    assert refusal(future).code == "invalid_token"


@pytest.mark.parametrize(("claims", "user_id"), [
    ({"userId": 7, "sub": 7}, 7),  # PyJWT would refuse a sub that is not a string
    ({"userId": 7, "aud": "pitchey-app"}, 7),  # an audience the app adds
    ({"userId": 7, "aud": ["a", "b"], "iss": "pitchey", "jti": 12}, 7),
    ({"userId": 7, "iat": int(time.time()) + 5}, 7),  # the app's clock a little ahead
    ({"userId": 7, "iat": in_ms(5)}, 7),
    ({"userId": "x", "sub": "8"}, 8),  # userId not an integer: otherwise sub
])
def test_verify_accepts_what_the_app_may_add(claims: dict[str, Any], user_id: int) -> None:
    """Claims the contract does not use do not refuse a token; iat ahead of this clock
    neither (only nbf says "not yet")."""
    token = signed({**claims, "exp": int(time.time()) + 600})
    assert verifier().verify(token).user_id == user_id


@pytest.mark.parametrize(
    "claims",
    [{"sub": HUGE_SUB}, {"sub": "1" * 20}, {"sub": "0"}, {"userId": 2**63}, {"userId": 0},
     {"userId": -3}, {"userId": 10**400}, {"userId": 7.0}, {"userId": True}, {"userId": "7"},
     {"sub": "٧"}, {"sub": 7}],
    ids=lambda c: repr(c)[:40],
)
def test_verify_bad_user_claims(claims: dict[str, Any]) -> None:
    """A user claim that is out of range, mistyped or 5,000 digits long is invalid_token."""
    assert refusal({**claims, "exp": in_ms(600)}).code == "invalid_token"


def test_verify_max_sub() -> None:
    """The largest 64-bit id as sub is accepted."""
    identity = verifier().verify(signed({"sub": str(2**63 - 1), "exp": in_ms(600)}))
    assert identity.user_id == 2**63 - 1


def test_verify_pitchey_shaped_token() -> None:
    """{userId, email, role, exp in ms}: name is the email's local part, type the role."""
    claims = {"userId": 7, "email": "ada.l@pitchey.example", "role": "Investor", "exp": in_ms(60)}
    identity = verifier().verify(signed(claims))
    assert (identity.username, identity.user_type) == ("ada.l", "investor")


def test_verify_name_claim_order() -> None:
    """The first valid claim of name_claims wins; invalid ones count as absent."""
    claims = {"userId": 7, "exp": in_ms(60), "username": "ada", "name": "Ada L",
              "email": "a@x.example"}
    assert verifier().verify(signed(claims)).username == "ada"
    assert verifier().verify(signed({**claims, "username": ""})).username == "Ada L"
    assert verifier().verify(signed({**claims, "username": 5, "name": "\x07"})).username == "a"
    only = verifier(name_claims=("name",))
    assert only.verify(signed({**claims, "name": None})).username is None
    assert verifier(name_claims=()).verify(signed(claims)).username is None


@pytest.mark.parametrize(
    "bad",
    ["\ud800", "Ada\udfff", "Ada\x00", "line\nbreak", "\x7f", "", "   ", "x" * 201, 42, True,
     ["Ada"], {"n": "Ada"}, None],
    ids=repr,
)
def test_verify_bad_profile_claims_dropped(bad: object) -> None:
    """A profile claim that is not displayable text is dropped, never an error."""
    claims = {"userId": 7, "exp": in_ms(60), "username": bad, "name": bad, "email": bad,
              "userType": bad, "role": bad}
    identity = verifier().verify(signed(claims))
    assert (identity.username, identity.user_type) == (None, None)


def test_verify_email_local_part() -> None:
    """email gives the part before the last @; an empty local part falls through."""
    def name(email: str) -> str | None:
        return verifier().verify(signed({"userId": 7, "exp": in_ms(60), "email": email})).username
    assert name("ada@pitchey.example") == "ada"
    assert name('"a@b"@pitchey.example') == '"a@b"'
    assert name("no-at-sign") == "no-at-sign"
    assert name("@pitchey.example") is None
    assert name("x" * 180 + "@pitchey.example") == "x" * 180
    assert name("x" * 190 + "@pitchey.example") is None  # the claim itself is over 200


def test_verify_user_type_and_role() -> None:
    """userType wins; else role when it is a Pitchey user type (any case), lower-cased."""
    def kind(**claims: Any) -> str | None:
        return verifier().verify(signed({"userId": 7, "exp": in_ms(60), **claims})).user_type
    assert kind(userType="creator", role="viewer") == "creator"
    assert kind(role="PRODUCTION") == "production"
    assert kind(role="admin") is None
    assert kind(userType="\ud800", role="viewer") == "viewer"


def test_verify_exp_optional() -> None:
    """With require_exp off a token without exp has no expiry; a bad exp is still refused."""
    assert verifier(require_exp=False).verify(signed({"userId": 7})).expires_at is None
    assert refusal({"userId": 7, "exp": "1"}, require_exp=False).code == "invalid_token"


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["userId", "sub", "exp", "iat", "nbf", "username", "name", "email",
                         "userType", "role"]),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
            lambda inner: st.lists(inner, max_size=3), max_leaves=5,
        ),
    )
)
def test_verify_never_raises_other_errors(claims: dict[str, Any]) -> None:
    """Whatever a signed token holds, verify returns an Identity or raises AuthError."""
    try:
        identity = verifier().verify(signed(claims))
    except AuthError as exc:
        assert exc.code in ("invalid_token", "token_expired")
    else:
        assert 0 < identity.user_id < 2**63
        for text in (identity.username, identity.user_type):
            assert text is None or text.encode("utf-8")


# -- section 12 over a real daemon --------------------------------------------------------------


def hs(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


BAD_CLAIMS = {
    "exp-decimal-string": lambda uid: {"userId": uid, "exp": str(in_ms(3600))},
    "exp-10**400": lambda uid: {"userId": uid, "exp": 10**400},
    "sub-5000-digits": lambda uid: {"sub": HUGE_SUB, "exp": in_ms(3600)},
}


async def test_pitchey_token_connects(connect_to: Connector) -> None:
    """A Pitchey token {userId, email, role, exp in ms} connects; username is the local part."""
    uid = new_user()
    token = hs({"userId": uid, "email": f"ada{uid}@pitchey.example", "role": "creator",
                "exp": in_ms(3600)})
    client = await connect_to(uid, token=token, wait_connected=False)
    hello = await client.expect("connected")
    assert (hello["userId"], hello["username"]) == (uid, f"ada{uid}")


async def test_ms_token_expires_on_live_connection(connect_to: Connector) -> None:
    """A live connection whose ms-exp token expires in ~1.5 s is closed with 4001 at exp."""
    uid = new_user()
    exp = in_ms(1.5)
    client = await connect_to(uid, token=hs({"userId": uid, "exp": exp}))
    await client.request({"type": "ping"}, "pong")
    assert await client.closed(timeout=TIMEOUT + 1.5) == 4001
    assert time.time() >= exp / 1000 - 0.05


async def test_refresh_with_ms_token(connect_to: Connector) -> None:
    """refresh_token with an ms-exp token succeeds; expiresAt is that exp."""
    uid = new_user()
    client = await connect_to(uid)
    exp = (int(time.time()) + 7200) * 1000 + 500
    refresh = {"type": "refresh_token", "token": hs({"userId": uid, "exp": exp})}
    reply = await client.request(refresh, "token_refreshed")
    want = datetime.fromtimestamp(exp // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S") + ".500Z"
    assert reply["expiresAt"] == want


@pytest.mark.parametrize("name", sorted(BAD_CLAIMS))
async def test_bad_claims_refused_at_handshake(daemon: Daemon, name: str) -> None:
    """exp as a decimal string, exp 10**400 and a 5,000-digit sub are 401 invalid_token."""
    token = hs(BAD_CLAIMS[name](new_user()))
    body = await refused(daemon, "", {"Authorization": f"Bearer {token}"})
    assert body["error"] == "invalid_token"
    assert daemon.get("/api/health")[0] == 200


@pytest.mark.parametrize("name", sorted(BAD_CLAIMS))
async def test_bad_claims_forbidden_on_refresh(connect_to: Connector, name: str) -> None:
    """The same tokens in refresh_token are forbidden, and the connection stays usable."""
    client = await connect_to()
    token = hs(BAD_CLAIMS[name](client.user_id))
    reply = await client.request({"type": "refresh_token", "token": token}, "error")
    assert reply["code"] == "forbidden"
    await client.request({"type": "ping"}, "pong")


async def test_lone_surrogate_username(daemon: Daemon, connect_to: Connector) -> None:
    """A username claim with a lone surrogate is dropped: the user is 'User <id>', all works."""
    uid = new_user()
    token = hs({"userId": uid, "username": "Ada\ud800", "exp": in_ms(3600)})
    odd = await connect_to(uid, token=token, wait_connected=False)
    assert (await odd.expect("connected"))["username"] == f"User {uid}"
    contact = await connect_to()
    await conversation(contact, uid)
    reply = await contact.request({"type": "get_online_users"}, "online_users")
    assert [(u["userId"], u["username"]) for u in reply["users"]] == [(uid, f"User {uid}")]
    await odd.request({"type": "ping"}, "pong")
    assert daemon.get("/api/health")[0] == 200


@pytest.mark.skipif(not jwt.algorithms.has_crypto,
                    reason="cryptography is not installed (pip install -r requirements-crypto.txt)")
async def test_rs256_over_daemon(fresh_daemon: Daemon) -> None:
    """With cryptography and an RSA public key configured, an RS256 token connects; HS256 not."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    write_config(fresh_daemon.config, {"presence.offline_grace_seconds": 0,
                                       "auth.algorithms": ["RS256"], "auth.public_key": public})
    fresh_daemon.start()
    uid = new_user()
    token = jwt.encode({"userId": uid, "username": "Rosa", "exp": in_ms(3600)}, private,
                       algorithm="RS256")
    async with connect(f"{fresh_daemon.url}?token={token}", open_timeout=TIMEOUT) as ws:
        hello = json.loads(await ws.recv())
    assert (hello["type"], hello["userId"], hello["username"]) == ("connected", uid, "Rosa")
    # Algorithm confusion: the public key used as an HMAC secret.
    forged = jwt.encode({"userId": uid, "exp": in_ms(3600)}, "x" * 40, algorithm="HS256")
    assert (await refused(fresh_daemon, f"?token={forged}"))["error"] == "invalid_token"
