"""Configuration: read once from TOML into frozen dataclasses.

Every key has a default (the values in ``config.toml``). Unknown sections or keys and values of
the wrong type raise :class:`ConfigError` naming the key, so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt.algorithms

import protocol


class ConfigError(Exception):
    """The configuration cannot be used; the message names the offending key."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_message_bytes: int = 65536
    max_pending_bytes: int = 1048576
    close_timeout_seconds: float = 3
    ping_interval_seconds: float = 20
    ping_timeout_seconds: float = 20
    shutdown_timeout_seconds: float = 5
    backlog: int = 4096
    demo: bool = False
    # Host names (besides loopback ones) whose requests may get demo tokens.
    demo_hosts: tuple[str, ...] = ()
    log_level: str = "INFO"


@dataclass(frozen=True)
class DatabaseConfig:
    path: str = "pitchey-ws.db"
    # "" = SQLite at ``path``; else "sqlite:///PATH" or "postgresql://...".
    url: str = ""
    # PostgreSQL only: "create" the Pitchey tables, or use the "existing" ones of the app.
    pitchey_schema: str = "create"
    # PostgreSQL only: connections of the read pool (the writer has one more of its own).
    pool_size: int = 4

    @property
    def engine(self) -> str:
        """"sqlite" or "postgresql", from ``url``."""
        return "postgresql" if self.url.startswith(("postgresql://", "postgres://")) else "sqlite"

    @property
    def sqlite_path(self) -> str:
        """The SQLite file: ``url``'s path when it is a sqlite:/// URL, else ``path``."""
        if self.url.startswith("sqlite:///"):
            return self.url[len("sqlite:///"):]
        return self.path
    synchronous: str = "FULL"
    max_batch: int = 512
    read_connections: int = 4
    cache_conversations: int = 10000
    cache_request_ids: int = 100000
    cache_users: int = 100000


@dataclass(frozen=True)
class AuthConfig:
    jwt_secret: str = ""
    algorithms: tuple[str, ...] = ("HS256",)
    public_key: str = ""
    require_exp: bool = True
    leeway_seconds: float = 0
    exp_unit: str = "auto"
    name_claims: tuple[str, ...] = ("username", "name", "email")


@dataclass(frozen=True)
class PresenceConfig:
    offline_grace_seconds: float = 2
    # With a Redis backplane: a daemon that stops renewing its heartbeat for this long is
    # taken as dead, and its users go offline (unless connected to another daemon).
    node_ttl_seconds: float = 15
    # Seconds between two heartbeats; below node_ttl_seconds (dead daemons are looked for
    # every node_ttl_seconds / 30: backplane_redis.RedisBackplane).
    heartbeat_seconds: float = 5


@dataclass(frozen=True)
class BackplaneConfig:
    # "" = in-process (one daemon); "redis://host:port/db" joins the daemons sharing it.
    url: str = ""
    # Frames for other daemons waiting to be published; beyond this the oldest are dropped
    # and their users are told to sync.
    max_outgoing: int = 10000
    # Most frames sent to Redis in one pipeline.
    max_batch: int = 256
    # Reconnection backoff after Redis is lost: first and longest wait, in seconds.
    reconnect_min_seconds: float = 0.1
    reconnect_max_seconds: float = 5


@dataclass(frozen=True)
class TypingConfig:
    ttl_seconds: float = 10


@dataclass(frozen=True)
class LimitsConfig:
    frames_per_second: float = 30
    frames_burst: int = 60
    typing_repeat_cost: float = 0.1
    deliveries_per_second: float = 1000
    deliveries_burst: int = 10000
    flood_max_dropped: int = 50
    flood_window_seconds: float = 10
    max_connections_per_user: int = 10
    max_connections: int = 20000
    max_content_chars: int = 10000
    max_attachments: int = 10
    max_attachment_field_chars: int = 2048
    max_request_id_chars: int = 128
    max_participants: int = 1000
    max_title_chars: int = 200
    max_pitch_subscriptions: int = 50


CREATE_POLICIES = ("any", "backend")


@dataclass(frozen=True)
class ConversationsConfig:
    create_policy: str = "any"


@dataclass(frozen=True)
class HistoryConfig:
    page_size: int = 50


@dataclass(frozen=True)
class DeliveryConfig:
    replay_limit: int = 1000


@dataclass(frozen=True)
class HttpConfig:
    cors_origins: tuple[str, ...] = ()
    max_header_bytes: int = 16384
    max_in_progress: int = 4096
    header_timeout_seconds: float = 10


@dataclass(frozen=True)
class NotificationsConfig:
    max_per_user: int = 1000
    retention_days: float = 90
    prune_interval_seconds: float = 3600
    page_size: int = 50


@dataclass(frozen=True)
class ApiConfig:
    key: str = ""
    # A listener of its own for the backend's API (0: it shares the main port), and its
    # interface ("": server.host).
    port: int = 0
    host: str = ""
    max_publish_users: int = 1000
    max_event_bytes: int = 16384
    max_allowed_users: int = 10000


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    presence: PresenceConfig = field(default_factory=PresenceConfig)
    backplane: BackplaneConfig = field(default_factory=BackplaneConfig)
    typing: TypingConfig = field(default_factory=TypingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    conversations: ConversationsConfig = field(default_factory=ConversationsConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    notifications: NotificationsConfig = field(default_factory=NotificationsConfig)
    api: ApiConfig = field(default_factory=ApiConfig)

    def replace(self, section: str, **changes: Any) -> Config:
        """Return a copy with some keys of one section changed (used for CLI overrides)."""
        return dataclasses.replace(
            self, **{section: dataclasses.replace(getattr(self, section), **changes)}
        )


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_SYNCHRONOUS = ("FULL", "NORMAL", "EXTRA")
_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512")
EXP_UNITS = ("auto", "seconds", "milliseconds")
CRYPTO_HINT = "pip install -r requirements-crypto.txt (or pip install 'pitchey-ws[crypto]')"


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """Check one value against its dataclass field type; ints are accepted for floats."""
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # TOML has inf and nan; nan passes every "must be positive" check.
            if not math.isfinite(value):
                raise ConfigError(f"{name}: must be a finite number, got {value!r}")
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(kind) is tuple:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
    kind_name = getattr(kind, "__name__", str(kind))
    raise ConfigError(f"{name}: expected {kind_name}, got {type(value).__name__} {value!r}")


def _section(name: str, cls: type[Any], raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"unknown config key {name}.{key}")
        values[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**values)


def _validate(config: Config, *, has_crypto: bool = jwt.algorithms.has_crypto) -> None:
    """Reject values that parse but cannot work, naming the key.

    ``has_crypto`` is whether PyJWT can use RS*/ES* (its backend, ``cryptography``, imports).
    """
    positive = {
        "server.max_message_bytes": config.server.max_message_bytes,
        "server.max_pending_bytes": config.server.max_pending_bytes,
        "server.close_timeout_seconds": config.server.close_timeout_seconds,
        "server.shutdown_timeout_seconds": config.server.shutdown_timeout_seconds,
        "server.backlog": config.server.backlog,
        "database.max_batch": config.database.max_batch,
        "database.pool_size": config.database.pool_size,
        "database.read_connections": config.database.read_connections,
        "database.cache_conversations": config.database.cache_conversations,
        "database.cache_request_ids": config.database.cache_request_ids,
        "database.cache_users": config.database.cache_users,
        "typing.ttl_seconds": config.typing.ttl_seconds,
        "presence.node_ttl_seconds": config.presence.node_ttl_seconds,
        "presence.heartbeat_seconds": config.presence.heartbeat_seconds,
        "backplane.max_outgoing": config.backplane.max_outgoing,
        "backplane.max_batch": config.backplane.max_batch,
        "backplane.reconnect_min_seconds": config.backplane.reconnect_min_seconds,
        "backplane.reconnect_max_seconds": config.backplane.reconnect_max_seconds,
        "limits.frames_per_second": config.limits.frames_per_second,
        "limits.frames_burst": config.limits.frames_burst,
        "limits.deliveries_per_second": config.limits.deliveries_per_second,
        "limits.deliveries_burst": config.limits.deliveries_burst,
        "limits.flood_max_dropped": config.limits.flood_max_dropped,
        "limits.flood_window_seconds": config.limits.flood_window_seconds,
        "limits.max_connections_per_user": config.limits.max_connections_per_user,
        "limits.max_connections": config.limits.max_connections,
        "limits.max_content_chars": config.limits.max_content_chars,
        "limits.max_attachment_field_chars": config.limits.max_attachment_field_chars,
        "limits.max_request_id_chars": config.limits.max_request_id_chars,
        "limits.max_title_chars": config.limits.max_title_chars,
        "history.page_size": config.history.page_size,
        "delivery.replay_limit": config.delivery.replay_limit,
        "http.max_header_bytes": config.http.max_header_bytes,
        "http.max_in_progress": config.http.max_in_progress,
        "http.header_timeout_seconds": config.http.header_timeout_seconds,
        "limits.max_pitch_subscriptions": config.limits.max_pitch_subscriptions,
        "notifications.max_per_user": config.notifications.max_per_user,
        "notifications.retention_days": config.notifications.retention_days,
        "notifications.prune_interval_seconds": config.notifications.prune_interval_seconds,
        "notifications.page_size": config.notifications.page_size,
        "api.max_publish_users": config.api.max_publish_users,
        "api.max_event_bytes": config.api.max_event_bytes,
        "api.max_allowed_users": config.api.max_allowed_users,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name}: must be positive, got {value}")
    non_negative = {
        "server.ping_interval_seconds": config.server.ping_interval_seconds,
        "server.ping_timeout_seconds": config.server.ping_timeout_seconds,
        "presence.offline_grace_seconds": config.presence.offline_grace_seconds,
        "limits.max_attachments": config.limits.max_attachments,
        "auth.leeway_seconds": config.auth.leeway_seconds,
    }
    for name, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{name}: must not be negative, got {value}")
    _check_frame_limit(config)
    if config.conversations.create_policy not in CREATE_POLICIES:
        raise ConfigError(
            f"conversations.create_policy: one of {', '.join(CREATE_POLICIES)},"
            f" got {config.conversations.create_policy!r}"
        )
    if not 0 < config.limits.typing_repeat_cost <= 1:
        raise ConfigError(
            "limits.typing_repeat_cost: must be above 0 (no frame is free) and at most 1,"
            f" got {config.limits.typing_repeat_cost}"
        )
    if config.limits.max_participants < 2:
        raise ConfigError("limits.max_participants: must be at least 2")
    if config.limits.deliveries_burst < config.limits.max_participants - 1:
        # One message to a full conversation costs max_participants - 1 deliveries at once.
        raise ConfigError(
            f"limits.deliveries_burst ({config.limits.deliveries_burst}) must be at least"
            f" limits.max_participants - 1 ({config.limits.max_participants - 1}), or a"
            " message to a full conversation could never be sent"
        )
    if not 0 <= config.server.port <= 65535:
        raise ConfigError(f"server.port: out of range: {config.server.port}")
    if not 0 <= config.api.port <= 65535:
        raise ConfigError(f"api.port: out of range: {config.api.port}")
    if config.server.log_level.upper() not in _LOG_LEVELS:
        raise ConfigError(f"server.log_level: one of {', '.join(_LOG_LEVELS)}")
    if config.database.synchronous.upper() not in _SYNCHRONOUS:
        raise ConfigError(f"database.synchronous: one of {', '.join(_SYNCHRONOUS)}")
    url = config.database.url
    if url and not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ConfigError(
            f"database.url: sqlite:///PATH or postgresql://..., got {url.split('://')[0]!r}"
        )
    if config.presence.heartbeat_seconds >= config.presence.node_ttl_seconds:
        raise ConfigError(
            "presence.heartbeat_seconds: must be below presence.node_ttl_seconds"
            f" ({config.presence.heartbeat_seconds} >= {config.presence.node_ttl_seconds})"
        )
    burl = config.backplane.url
    if burl and not burl.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"backplane.url: redis://... or empty, got {burl.split('://')[0]!r}")
    if burl and config.database.engine != "postgresql":
        raise ConfigError("backplane.url: several daemons need a shared database"
                          " (database.url = \"postgresql://...\")")
    if config.database.pitchey_schema not in ("create", "existing"):
        raise ConfigError(
            "database.pitchey_schema: one of create, existing,"
            f" got {config.database.pitchey_schema!r}"
        )
    if not config.auth.algorithms:
        raise ConfigError("auth.algorithms: at least one algorithm is required")
    for alg in config.auth.algorithms:
        if alg not in _ALGORITHMS:
            raise ConfigError(f"auth.algorithms: {alg!r} is not accepted (one of {_ALGORITHMS})")
    hmac = [a for a in config.auth.algorithms if a.startswith("HS")]
    if hmac and len(hmac) != len(config.auth.algorithms):
        # Mixing HMAC and public-key algorithms invites algorithm confusion.
        raise ConfigError("auth.algorithms: do not mix HS* with RS*/ES* algorithms")
    if not hmac and not has_crypto:
        # Without its backend PyJWT knows no RS*/ES* algorithm and would refuse every token.
        raise ConfigError(
            f"auth.algorithms: {', '.join(config.auth.algorithms)} requires the 'cryptography'"
            f" package (PyJWT's RS*/ES* backend), which is not installed; install it with"
            f" {CRYPTO_HINT}"
        )
    if not hmac and not config.auth.public_key:
        raise ConfigError("auth.public_key: required for RS*/ES* algorithms")
    if not hmac:
        _check_public_key(config.auth)
    if config.auth.exp_unit not in EXP_UNITS:
        raise ConfigError(f"auth.exp_unit: one of {', '.join(EXP_UNITS)}")
    for claim in config.auth.name_claims:
        if not claim:
            raise ConfigError("auth.name_claims: claim names must not be empty")


# The largest server.max_message_bytes (the largest incoming frame read): each connection may
# buffer websockets' 16 frames of this size.
MAX_FRAME_BYTES = 16 * 1024 * 1024


def parser_limits(config: Config) -> protocol.Limits:
    """The field limits ``protocol.parse`` enforces (every door's parser uses these)."""
    limits = config.limits
    return protocol.Limits(
        max_content_chars=limits.max_content_chars,
        max_attachments=limits.max_attachments,
        max_attachment_field_chars=limits.max_attachment_field_chars,
        max_request_id_chars=limits.max_request_id_chars,
        max_participants=limits.max_participants,
        max_title_chars=limits.max_title_chars,
        max_notification_ids=config.notifications.max_per_user,
    )


def _check_frame_limit(config: Config) -> None:
    if config.server.max_message_bytes > MAX_FRAME_BYTES:
        raise ConfigError(
            f"server.max_message_bytes: at most {MAX_FRAME_BYTES}, got"
            f" {config.server.max_message_bytes}"
        )


def _check_public_key(auth: AuthConfig) -> None:
    """A key PyJWT cannot load would fail every handshake with an error that is no 401."""
    algorithms = jwt.algorithms.get_default_algorithms()
    for alg in auth.algorithms:
        try:
            algorithms[alg].prepare_key(auth.public_key)
        except (jwt.exceptions.PyJWTError, ValueError, TypeError):
            family = "an RSA" if alg.startswith("RS") else "an EC"
            raise ConfigError(
                f"auth.public_key: not {family} public key in PEM, as {alg} needs"
            ) from None


ENV_PREFIX = "PITCHEY_WS_"
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def _env_value(var: str, key: str, text: str, kind: Any) -> Any:
    """Parse one environment variable as its field's type; errors name the variable."""
    where = f"{var} ({key})"
    if kind is bool:
        if text.strip().lower() in _TRUE:
            return True
        if text.strip().lower() in _FALSE:
            return False
        raise ConfigError(f"{where}: expected true/false/1/0/yes/no, got {text!r}")
    if kind is int:
        # ASCII digits, bounded, so a huge value never reaches int()'s digit limit.
        if not re.fullmatch(r"[+-]?[0-9]{1,30}", text.strip()):
            raise ConfigError(f"{where}: expected an integer, got {text[:50]!r}")
        return int(text.strip())
    if kind is float:
        try:
            number = float(text.strip()) if len(text.strip()) <= 50 else math.nan
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {text[:50]!r}")
        return number
    if typing.get_origin(kind) is tuple:
        return _env_list(where, text)
    return text


def _env_list(where: str, text: str) -> list[str]:
    """A TOML/JSON array of strings (``["a", "b"]``), or comma-separated words (``a, b``)."""
    if text.lstrip().startswith("["):
        try:
            # One key only, so a newline in the value cannot smuggle in other TOML.
            parsed = tomllib.loads(f"v = {text}")
        except tomllib.TOMLDecodeError:
            parsed = {}
        items = parsed.get("v") if set(parsed) == {"v"} else None
        if isinstance(items, list) and all(isinstance(item, str) for item in items):
            return items
        try:
            items = json.loads(text)
        except ValueError:
            items = None
        if isinstance(items, list) and all(isinstance(item, str) for item in items):
            return items
        raise ConfigError(f"{where}: expected an array of strings, got {text!r}")
    if not text.strip():
        return []
    words = [word.strip() for word in text.split(",")]
    if not all(words):
        raise ConfigError(f"{where}: empty item in comma-separated list {text!r}")
    return words


def _from_environment(environ: typing.Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``PITCHEY_WS_<SECTION>_<KEY>`` variables as {section: {key: value}}.

    Section names have no underscore, so the section ends at the first one. A variable with the
    prefix that names no key is an error, like an unknown key in the file.
    """
    hints = typing.get_type_hints(Config)
    found: dict[str, dict[str, Any]] = {}
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX):
            continue
        section, _, key = var[len(ENV_PREFIX):].partition("_")
        section, key = section.lower(), key.lower()
        cls = hints.get(section)
        fields = typing.get_type_hints(cls) if cls is not None else {}
        if key not in fields or var != f"{ENV_PREFIX}{section}_{key}".upper():
            raise ConfigError(f"unknown environment variable {var} (no such config key)")
        value = _env_value(var, f"{section}.{key}", environ[var], fields[key])
        found.setdefault(section, {})[key] = value
    return found


def load(path: Path | None, environ: typing.Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (or use every default when None), apply the environment, validate.

    ``environ`` (default ``os.environ``) overrides the file: ``PITCHEY_WS_<SECTION>_<KEY>`` for
    any key, and ``JWT_SECRET`` (when not empty) for ``auth.jwt_secret``.
    Raises ConfigError for an unreadable file, bad TOML, unknown keys or variables, wrong types
    or values.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    env = os.environ if environ is None else environ
    for name, values in _from_environment(env).items():
        table = raw.get(name, {})
        # A non-table in the file is reported by _section below, as without the environment.
        raw[name] = {**table, **values} if isinstance(table, dict) else table
    hints = typing.get_type_hints(Config)
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in hints:
            raise ConfigError(f"unknown config section [{name}]")
        sections[name] = _section(name, hints[name], value)
    config = Config(**sections)
    secret = env.get("JWT_SECRET")
    if secret:
        other = env.get(f"{ENV_PREFIX}AUTH_JWT_SECRET")
        if other and other != secret:
            raise ConfigError(
                f"JWT_SECRET and {ENV_PREFIX}AUTH_JWT_SECRET are both set, to different values"
            )
        config = config.replace("auth", jwt_secret=secret)
    _validate(config)
    return config
