"""config.load and config validation, in-process: keys, types, the environment, crypto."""

from __future__ import annotations

from pathlib import Path

import jwt.algorithms
import pytest

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
