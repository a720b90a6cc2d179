"""JWT verification and minting.

The accepted algorithms are pinned by configuration; PyJWT is always given that list, so
``alg: none`` and algorithm confusion (an HS256 token signed with a public key) are rejected.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt

from config import AuthConfig

MAX_TOKEN_CHARS = 8192


class AuthError(Exception):
    """The token is unusable. ``code`` goes into the 401 body; the message never holds the token."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Identity:
    user_id: int
    username: str | None
    user_type: str | None
    expires_at: float | None  # epoch seconds, from exp


class Verifier:
    """Checks tokens against one auth configuration."""

    def __init__(self, config: AuthConfig) -> None:
        self.algorithms = list(config.algorithms)
        self.hmac = self.algorithms[0].startswith("HS")
        self.key: str = config.jwt_secret if self.hmac else config.public_key
        self.require_exp = config.require_exp
        self.leeway = config.leeway_seconds

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
                options={"require": ["exp"] if self.require_exp else []},
                leeway=self.leeway if leeway else 0,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token_expired", "Token has expired") from None
        except jwt.InvalidSignatureError:
            raise AuthError("invalid_token", "Token signature is invalid") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("invalid_token", "Token algorithm is not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("invalid_token", f"Token lacks the {exc.claim} claim") from None
        except jwt.InvalidTokenError:
            raise AuthError("invalid_token", "Token is malformed or invalid") from None
        return Identity(
            user_id=_user_id(claims),
            username=_optional_str(claims.get("username")),
            user_type=_optional_str(claims.get("userType")),
            expires_at=_expiry(claims.get("exp")),
        )

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
    if value is None:
        sub = claims.get("sub")
        if isinstance(sub, str) and sub.isdecimal() and sub.isascii():
            number = int(sub)
            if 0 < number < 2**63:
                return number
    raise AuthError("invalid_token", "Token names no user (userId or numeric sub)")


def _optional_str(value: Any) -> str | None:
    if isinstance(value, str) and value and len(value) <= 200:
        return value
    return None


def _expiry(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None
