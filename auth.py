"""JWT verification and minting.

The accepted algorithms are pinned by configuration; PyJWT is always given that list, so
``alg: none`` and algorithm confusion (an HS256 token signed with a public key) are rejected.

PyJWT checks the signature and the claims' presence; the time claims (``exp``, ``nbf``, ``iat``)
are checked here, because PyJWT reads them as seconds and Pitchey mints them in milliseconds
(``auth.exp_unit``). Whatever a signed token holds, :meth:`Verifier.verify` returns an
:class:`Identity` or raises :class:`AuthError`, nothing else.
"""

from __future__ import annotations

import math
import time
import unicodedata
from dataclasses import dataclass
from typing import Any

import jwt

from config import AuthConfig

MAX_TOKEN_CHARS = 8192
MAX_PROFILE_CHARS = 200
# exp_unit "auto": a time claim above this is milliseconds (10^11 s is the year 5138; 10^11 ms
# is 1973, before any token in use was minted).
AUTO_MS_ABOVE = 10**11
# The latest instant a datetime (and so an ISO timestamp on the wire) can hold: 9999-12-31.
MAX_EPOCH_SECONDS = 253402300799
USER_TYPE_ROLES = ("creator", "investor", "production", "viewer")
_BAD_CATEGORIES = ("Cc", "Cs")  # control characters; lone surrogates (not encodable as UTF-8)


class AuthError(Exception):
    """The token is unusable. ``code`` goes into the 401 body; the message never holds the token."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Identity:
    """Who a valid token names. The profile fields are None when the token gives no valid one."""

    user_id: int
    username: str | None  # display name: the first valid claim of auth.name_claims
    user_type: str | None  # userType, else a known role, lower-cased
    expires_at: float | None  # epoch seconds, from exp in whatever unit it was minted


class Verifier:
    """Checks tokens against one auth configuration."""

    def __init__(self, config: AuthConfig) -> None:
        self.algorithms = list(config.algorithms)
        self.hmac = self.algorithms[0].startswith("HS")
        self.key: str = config.jwt_secret if self.hmac else config.public_key
        self.require_exp = config.require_exp
        self.leeway = config.leeway_seconds
        self.exp_unit = config.exp_unit
        self.name_claims = tuple(config.name_claims)

    def verify(self, token: str | None, *, leeway: bool = True) -> Identity:
        """Return who the token names. Raises AuthError for anything else.

        ``leeway=False`` is used for tokens presented on a live connection (refresh_token).
        """
        if not token:
            raise AuthError("missing_token", "Authentication token required")
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthError("invalid_token", "Token is too long")
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=self.algorithms,
                options={
                    "require": ["exp"] if self.require_exp else [],
                    # Times are checked below (exp in seconds or milliseconds, the leeway).
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    # The identity is userId or sub, read below (PyJWT wants sub a string);
                    # an audience or token id the app adds does not concern the daemon.
                    "verify_sub": False,
                    "verify_aud": False,
                    "verify_jti": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise AuthError("invalid_token", "Token signature is invalid") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("invalid_token", "Token algorithm is not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("invalid_token", f"Token lacks the {exc.claim} claim") from None
        except jwt.InvalidTokenError:
            raise AuthError("invalid_token", "Token is malformed or invalid") from None
        slack = self.leeway if leeway else 0
        now = time.time()
        expires_at = self._instant(claims, "exp")
        # A token not yet valid (nbf) is invalid, an expired one is expired. iat only says
        # when the token was made: checked as a time, but one a little ahead of this clock
        # (the app's server runs ahead) does not refuse the token.
        self._instant(claims, "iat")
        not_before = self._instant(claims, "nbf")
        if not_before is not None and not_before > now + slack:
            raise AuthError("invalid_token", "Token is not yet valid (nbf)")
        if expires_at is not None and expires_at <= now - slack:
            raise AuthError("token_expired", "Token has expired")
        return Identity(
            user_id=_user_id(claims),
            username=self._display_name(claims),
            user_type=_user_type(claims),
            expires_at=expires_at,
        )

    def _instant(self, claims: dict[str, Any], name: str) -> float | None:
        """A time claim as epoch seconds (None when absent); AuthError when not a sane time."""
        value = claims.get(name)
        if value is None:
            return None
        # bool is an int; a string is not a NumericDate (RFC 7519), whatever it spells.
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise AuthError("invalid_token", f"Token {name} is not a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise AuthError("invalid_token", f"Token {name} is not a finite number")
        if value < 0:
            raise AuthError("invalid_token", f"Token {name} is negative")
        milliseconds = self.exp_unit == "milliseconds" or (
            self.exp_unit == "auto" and value > AUTO_MS_ABOVE
        )
        # Compared before any float conversion: 10**400 is an int that float() cannot hold.
        if value > (MAX_EPOCH_SECONDS * 1000 + 999 if milliseconds else MAX_EPOCH_SECONDS):
            raise AuthError("invalid_token", f"Token {name} is out of range")
        return value / 1000 if milliseconds else float(value)

    def _display_name(self, claims: dict[str, Any]) -> str | None:
        for name in self.name_claims:
            value = _profile_text(claims.get(name))
            if value is not None and name == "email":
                value = _profile_text(value.rpartition("@")[0] if "@" in value else value)
            if value is not None:
                return value
        return None

    def mint(
        self, user_id: int, username: str | None = None, user_type: str | None = None,
        ttl_seconds: float = 3600,
    ) -> str:
        """Sign a token for ``user_id`` (the `token` command and demo mode). HS* only."""
        if not self.hmac:
            raise AuthError("invalid_config", "Tokens can only be minted with an HS* secret")
        claims: dict[str, Any] = {
            "userId": user_id,
            "sub": str(user_id),
            "iat": int(time.time()),
            "exp": int(time.time() + ttl_seconds),
        }
        if username is not None:
            claims["username"] = username
        if user_type is not None:
            claims["userType"] = user_type
        return jwt.encode(claims, self.key, algorithm=self.algorithms[0])


def _user_id(claims: dict[str, Any]) -> int:
    value = claims.get("userId")
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**63:
        return value
    # Otherwise sub holding a decimal integer (PROTOCOL.md 2): sub is text (RFC 7519).
    sub = claims.get("sub")
    # Length first: int() refuses strings of more than 4300 digits with a ValueError.
    if isinstance(sub, str) and len(sub) <= 19 and sub.isdecimal() and sub.isascii():
        number = int(sub)
        if 0 < number < 2**63:
            return number
    raise AuthError("invalid_token", "Token names no user (userId or numeric sub)")


def _user_type(claims: dict[str, Any]) -> str | None:
    user_type = _profile_text(claims.get("userType"))
    if user_type is not None:
        return user_type
    role = _profile_text(claims.get("role"))
    if role is not None and role.lower() in USER_TYPE_ROLES:
        return role.lower()
    return None


def _profile_text(value: Any) -> str | None:
    """``value`` when it is text fit to display and store, else None (the claim is ignored).

    Fit: a non-blank string of at most MAX_PROFILE_CHARS characters, with no control character
    and no lone surrogate (which UTF-8, and so SQLite and the JSON encoder, cannot hold).
    """
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_PROFILE_CHARS:
        return None
    if any(unicodedata.category(char) in _BAD_CATEGORIES for char in value):
        return None
    return value
