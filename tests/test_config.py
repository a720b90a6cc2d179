"""config.load and config validation, in-process: keys, types, the environment, crypto."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jwt.algorithms
import pytest
from conftest import ROOT, SECRET, Connector, Daemon, conversation

import config
from config import AuthConfig, Config, ConfigError


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return config.load(path, environ or {})


def error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, environ)
    return str(info.value)


def test_shipped_config_is_the_defaults() -> None:
    """config.toml lists every key with its default value."""
    assert config.load(Path(__file__).parent.parent / "config.toml", {}) == Config()


def test_auth_defaults() -> None:
    """exp_unit is auto and name_claims username, name, email by default."""
    auth = config.load(None, {}).auth
    assert auth.exp_unit == "auto"
    assert auth.name_claims == ("username", "name", "email")


def test_exp_unit_values(tmp_path: Path) -> None:
    """exp_unit accepts auto, seconds, milliseconds and nothing else."""
    for unit in ("auto", "seconds", "milliseconds"):
        assert load_text(tmp_path, f'[auth]\nexp_unit = "{unit}"\n').auth.exp_unit == unit
    assert "auth.exp_unit" in error(tmp_path, '[auth]\nexp_unit = "ms"\n')


def test_name_claims_checked(tmp_path: Path) -> None:
    """name_claims is a list of non-empty claim names; an empty list is allowed."""
    assert load_text(tmp_path, '[auth]\nname_claims = ["nick"]\n').auth.name_claims == ("nick",)
    assert load_text(tmp_path, "[auth]\nname_claims = []\n").auth.name_claims == ()
    assert "auth.name_claims" in error(tmp_path, '[auth]\nname_claims = [""]\n')
    assert "auth.name_claims" in error(tmp_path, '[auth]\nname_claims = "email"\n')


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_floats_refused(tmp_path: Path, value: str) -> None:
    """TOML's nan and inf are refused (nan passes every 'must be positive' check)."""
    assert "typing.ttl_seconds" in error(tmp_path, f"[typing]\nttl_seconds = {value}\n")


def test_public_key_algorithms_need_cryptography() -> None:
    """RS*/ES* without the cryptography package is a config error saying how to install it."""
    auth = AuthConfig(algorithms=("RS256",), public_key="-----BEGIN PUBLIC KEY-----")
    with pytest.raises(ConfigError) as info:
        config._validate(Config(auth=auth), has_crypto=False)
    message = str(info.value)
    assert "cryptography" in message and "requirements-crypto.txt" in message
    assert "RS256" in message
    # HS* never needs it.
    config._validate(Config(auth=AuthConfig(jwt_secret="s" * 32)), has_crypto=False)


@pytest.mark.skipif(not jwt.algorithms.has_crypto, reason="cryptography is not installed")
def test_public_key_checked_at_startup() -> None:
    """A public key that does not load for the configured algorithm is a config error."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    config._validate(Config(auth=AuthConfig(algorithms=("ES256",), public_key=pem)))
    for algorithms, key in ((("RS256",), pem), (("ES256",), "not a key")):
        with pytest.raises(ConfigError, match=r"auth\.public_key"):
            config._validate(Config(auth=AuthConfig(algorithms=algorithms, public_key=key)))


# -- PITCHEY_WS_<SECTION>_<KEY> ------------------------------------------------------------------


def test_env_sets_every_type(tmp_path: Path) -> None:
    """ints, floats, bools, strings and lists are parsed from the environment like the file."""
    loaded = load_text(tmp_path, "", {
        "PITCHEY_WS_SERVER_PORT": "9001",
        "PITCHEY_WS_TYPING_TTL_SECONDS": "2.5",
        "PITCHEY_WS_PRESENCE_OFFLINE_GRACE_SECONDS": "0",
        "PITCHEY_WS_SERVER_DEMO": "yes",
        "PITCHEY_WS_AUTH_REQUIRE_EXP": "False",
        "PITCHEY_WS_SERVER_HOST": "0.0.0.0",
        "PITCHEY_WS_AUTH_EXP_UNIT": "milliseconds",
        "PITCHEY_WS_AUTH_NAME_CLAIMS": '["name", "email"]',
        "PITCHEY_WS_AUTH_JWT_SECRET": "from-env-" + "x" * 32,
    })
    assert loaded.server.port == 9001 and loaded.server.host == "0.0.0.0"
    assert loaded.typing.ttl_seconds == 2.5 and loaded.presence.offline_grace_seconds == 0.0
    assert loaded.server.demo is True and loaded.auth.require_exp is False
    assert loaded.auth.exp_unit == "milliseconds"
    assert loaded.auth.name_claims == ("name", "email")
    assert loaded.auth.jwt_secret == "from-env-" + "x" * 32


@pytest.mark.parametrize(
    ("text", "want"),
    [('["a","b"]', ("a", "b")), ("['a', 'b']", ("a", "b")), ("[]", ()), ("a,b", ("a", "b")),
     (" a , b ", ("a", "b")), ("a", ("a",)), ("", ())],
)
def test_env_lists(text: str, want: tuple[str, ...]) -> None:
    """A list is a TOML/JSON array of strings or comma-separated words."""
    loaded = config.load(None, {"PITCHEY_WS_AUTH_NAME_CLAIMS": text})
    assert loaded.auth.name_claims == want


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "0", "false", "No"])
def test_env_bools(value: str) -> None:
    """Booleans are true/false/1/0/yes/no in any case."""
    want = value.lower() in ("1", "true", "yes")
    assert config.load(None, {"PITCHEY_WS_SERVER_DEMO": value}).server.demo is want


@pytest.mark.parametrize(
    ("var", "value"),
    [("PITCHEY_WS_SERVER_PORT", "80x"), ("PITCHEY_WS_SERVER_PORT", "8.0"),
     ("PITCHEY_WS_SERVER_PORT", "9" * 5000), ("PITCHEY_WS_SERVER_PORT", ""),
     ("PITCHEY_WS_SERVER_PORT", "٨٠"), ("PITCHEY_WS_TYPING_TTL_SECONDS", "soon"),
     ("PITCHEY_WS_TYPING_TTL_SECONDS", "nan"), ("PITCHEY_WS_TYPING_TTL_SECONDS", "inf"),
     ("PITCHEY_WS_SERVER_DEMO", "maybe"), ("PITCHEY_WS_AUTH_ALGORITHMS", "[1, 2]"),
     ("PITCHEY_WS_AUTH_ALGORITHMS", '["HS256"'), ("PITCHEY_WS_AUTH_ALGORITHMS", "HS256,,"),
     ("PITCHEY_WS_AUTH_ALGORITHMS", '[]\nserver = 1')],
)
def test_env_bad_values_name_the_variable(var: str, value: str) -> None:
    """A value of the wrong type is a ConfigError naming the variable."""
    with pytest.raises(ConfigError, match=var):
        config.load(None, {var: value})


def test_env_values_are_validated() -> None:
    """Values from the environment pass the same checks as the file's."""
    with pytest.raises(ConfigError, match=r"server\.port"):
        config.load(None, {"PITCHEY_WS_SERVER_PORT": "70000"})
    with pytest.raises(ConfigError, match=r"auth\.exp_unit"):
        config.load(None, {"PITCHEY_WS_AUTH_EXP_UNIT": "minutes"})
    with pytest.raises(ConfigError, match=r"api\.port"):
        config.load(None, {"PITCHEY_WS_API_PORT": "65536"})


@pytest.mark.parametrize(
    "var",
    ["PITCHEY_WS_API_NOPE", "PITCHEY_WS_SERVER_NOPE", "PITCHEY_WS_SERVER", "PITCHEY_WS_",
     "PITCHEY_WS_server_port", "PITCHEY_WS_SERVER_Port", "PITCHEY_WS_REPLACE_X"],
)
def test_env_unknown_variable(var: str) -> None:
    """A variable with the prefix that names no config key is an error naming it."""
    with pytest.raises(ConfigError, match=f"unknown environment variable {var}"):
        config.load(None, {var: "1"})


def test_env_overrides_file(tmp_path: Path) -> None:
    """The environment wins over the file; the file's other keys in that section stay."""
    loaded = load_text(tmp_path, "[server]\nport = 1234\nbacklog = 7\n",
                       {"PITCHEY_WS_SERVER_PORT": "4321"})
    assert (loaded.server.port, loaded.server.backlog) == (4321, 7)


def test_env_file_errors_still_reported(tmp_path: Path) -> None:
    """A section that is not a table in the file is still an error with the environment set."""
    text = "server = 1\n"
    assert "server" in error(tmp_path, text, {"PITCHEY_WS_SERVER_PORT": "1"})


def test_jwt_secret_variable() -> None:
    """JWT_SECRET overrides the file as before; agreeing with the prefixed one is fine."""
    secret = "j" * 40
    assert config.load(None, {"JWT_SECRET": secret}).auth.jwt_secret == secret
    assert config.load(None, {"JWT_SECRET": ""}).auth.jwt_secret == ""
    both = {"JWT_SECRET": secret, "PITCHEY_WS_AUTH_JWT_SECRET": secret}
    assert config.load(None, both).auth.jwt_secret == secret
    with pytest.raises(ConfigError, match="JWT_SECRET"):
        config.load(None, {**both, "PITCHEY_WS_AUTH_JWT_SECRET": "k" * 40})


def test_other_variables_ignored() -> None:
    """Variables without the prefix (PITCHEY_TEST_..., PATH) are not config."""
    assert config.load(None, {"PITCHEY_TEST_TIMEOUT_SCALE": "2", "PATH": "/bin"}) == Config()


# -- the same over `serve`, a real process ------------------------------------------------------


def serve(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `serve` with a clean PITCHEY_WS_* environment; only for runs that must refuse."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PITCHEY_WS_")}
    return subprocess.run(
        [sys.executable, str(ROOT / "pitchey_ws.py"), "serve", "--port", "0",
         "--db", str(tmp_path / "x.db")],
        capture_output=True, text=True, timeout=30, env={**environ, **env}, cwd=tmp_path,
    )


def test_serve_unknown_variable_exits_2(tmp_path: Path) -> None:
    """serve refuses an unknown PITCHEY_WS_ variable, naming it, with exit code 2."""
    result = serve(tmp_path, {"JWT_SECRET": SECRET, "PITCHEY_WS_API_NOPE": "k"})
    assert result.returncode == 2 and "PITCHEY_WS_API_NOPE" in result.stderr


def test_api_key_from_the_environment() -> None:
    """PITCHEY_WS_API_KEY is api.key (PROTOCOL.md section 11), like any other key."""
    assert config.load(None, {"PITCHEY_WS_API_KEY": "backend-key"}).api.key == "backend-key"


def test_serve_bad_variable_exits_2(tmp_path: Path) -> None:
    """serve refuses a mistyped variable, naming it."""
    result = serve(tmp_path, {"JWT_SECRET": SECRET, "PITCHEY_WS_HISTORY_PAGE_SIZE": "fifty"})
    assert result.returncode == 2 and "PITCHEY_WS_HISTORY_PAGE_SIZE" in result.stderr


@pytest.mark.skipif(jwt.algorithms.has_crypto,
                    reason="cryptography is installed; the in-process test covers its absence")
def test_serve_rs256_without_cryptography_exits_2(tmp_path: Path) -> None:
    """Without cryptography, serve with RS256 exits 2 naming the package."""
    result = serve(tmp_path, {"PITCHEY_WS_AUTH_ALGORITHMS": "RS256",
                              "PITCHEY_WS_AUTH_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----"})
    assert result.returncode == 2 and "cryptography" in result.stderr


async def test_serve_takes_config_from_environment(tmp_path: Path) -> None:
    """A daemon started with PITCHEY_WS_LIMITS_MAX_CONTENT_CHARS applies it over the file."""
    daemon = Daemon(tmp_path, {"limits.max_content_chars": 10000})
    daemon.start(env={"PITCHEY_WS_LIMITS_MAX_CONTENT_CHARS": "5"})
    connect = Connector(daemon)
    try:
        alice = await connect()
        conv = await conversation(alice, (await connect()).user_id)
        await alice.send({"type": "send_message", "conversationId": conv, "content": "123456",
                          "requestId": "too-long"})
        reply = await alice.expect("error", requestId="too-long")
        assert reply["code"] == "invalid_message"
        five = {"type": "send_message", "conversationId": conv, "content": "12345"}
        assert (await alice.request(five, "message_sent"))["content"] == "12345"
    finally:
        await connect.close_all()
        daemon.stop()


def test_shipped_config_lists_and_comments_every_key() -> None:
    """Every key of every section is in config.toml, each under a comment line."""
    lines = (Path(__file__).parent.parent / "config.toml").read_text().splitlines()
    for name, section in vars(Config()).items():
        start = lines.index(f"[{name}]")
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")),
                   len(lines))
        for key in dataclasses.fields(section):
            at = [i for i in range(start, end) if lines[i].startswith(f"{key.name} = ")]
            assert at, f"{name}.{key.name} is not in config.toml"
            # The nearest line above that is not another key is a comment.
            above = next(line for line in reversed(lines[:at[0]]) if " = " not in line)
            assert above.startswith("#"), f"{name}.{key.name} has no comment"
