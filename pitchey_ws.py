"""pitchey-ws: real-time messaging for Pitchey over WebSocket, stored in SQLite.

Run ``python pitchey_ws.py serve --help`` or ``python pitchey_ws.py token --help``.

This module wires the daemon together (``App``), runs it with a fixed shutdown order, and holds
the CLI. Each concern has a module of its own; the README's layout table lists them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import re
import resource
import signal
import sys
from pathlib import Path

from websockets.asyncio.server import Server, serve

import config as cfg
import demo
import protocol as p
from auth import AuthError, Verifier
from backplane import TypingState, TypingTopic, open_backplane
from connection import Sessions
from conversations import SHARED_ROWS_SECONDS, Conversations
from delivery import DeliveryLog
from http_api import HttpApi, is_websocket
from http_front import Cors, Front, IsWebSocket, LogSummary, OpenCount, Respond
from http_routes import WS_PATH, Routes
from hub import Background, Hub
from metrics import Metrics
from rows import UserRow
from service import Service
from store import StoreError, open_store
from typing_indicators import TypingTracker

log = logging.getLogger("pitchey.server")
HERE = Path(__file__).resolve().parent


class App:
    """The daemon: one config, one store, one hub. ``start()``, then ``stop()``."""

    def __init__(self, config: cfg.Config, max_open: int | None = None) -> None:
        """``max_open``: the client connections the descriptors allow (fit_descriptors)."""
        self.config = config
        self.metrics = Metrics()
        self.store = open_store(
            config.database.sqlite_path,
            url=config.database.url,
            pitchey_schema=config.database.pitchey_schema,
            pool_size=config.database.pool_size,
            synchronous=config.database.synchronous.upper(),
            max_batch=config.database.max_batch,
            on_commit=self._observe_commit,
            read_connections=config.database.read_connections,
        )
        self.store.notifications_per_user = config.notifications.max_per_user
        self.verifier = Verifier(config.auth)
        self.background = Background()
        self.deliveries = DeliveryLog(self.store)
        bp = config.backplane
        self.backplane = open_backplane(
            bp.url, node_ttl_seconds=config.presence.node_ttl_seconds,
            heartbeat_seconds=config.presence.heartbeat_seconds,
            frames_per_second=config.limits.frames_per_second,
            frames_burst=config.limits.frames_burst, max_outgoing=bp.max_outgoing,
            max_batch=bp.max_batch, reconnect_min_seconds=bp.reconnect_min_seconds,
            reconnect_max_seconds=bp.reconnect_max_seconds,
            load_contacts=self.store.contacts, on_offline=self.store.set_last_seen_later,
            on_typing_gone=self._typing_gone,
        ) if bp.url else open_backplane("")
        self.hub = Hub(
            config.limits,
            config.server.max_pending_bytes,
            config.presence.offline_grace_seconds,
            self.background,
            self.deliveries,
            self.store.contacts,
            self.store.set_last_seen_later,
            self.backplane,
        )
        shared = self.store.shared_with_app
        self.conversations = Conversations(
            self.store, config.database.cache_conversations,
            SHARED_ROWS_SECONDS if shared else None,
            # The app's conversations made after a user connected: contacts from first use.
            self.hub.add_contacts if shared else None,
        )
        self.typing = TypingTracker(self.hub, self.store, config.typing.ttl_seconds)
        self.hub.on_last_close.append(self.typing.stop_user)
        self.service = Service(config, self.store, self.hub, self.conversations, self.typing,
                               self.deliveries, self.metrics)
        self.sessions = Sessions(config, self.store, self.hub, self.service, self.metrics,
                                 lambda: self.verifier)
        self.demo: demo.Demo | None = None
        self.routes = Routes(self.store, self.hub, self.metrics, self.sessions.admit,
                             lambda: self.demo, config.server.demo_hosts)
        self.api = HttpApi(self.routes, self.service, self.hub, lambda: self.verifier,
                           self.sessions.profile, self._cors_origins, self.sessions.limits,
                           config.api, self._forget_profile)
        # Both listeners' connections hold descriptors: one count for max_open.
        self.opened = OpenCount()
        self.front = self._front(self.api.respond, is_websocket, "pitchey.http", max_open,
                                 cors=self.api.cors_for)
        self.server: Server | None = None
        # The backend's API on a listener of its own (api.port): plain HTTP, no WebSocket.
        self.api_front = self._front(self.api.respond_backend, _no_websocket, "pitchey.api",
                                     max_open) if config.api.port else None
        self.api_server: Server | None = None

    def _front(self, respond: Respond, websocket: IsWebSocket, logger: str,
               max_open: int | None,
               cors: Cors | None = None,
               ) -> Front:
        """An HTTP front (http_front.py) with the config's bounds; ``websocket`` tells which
        requests are handed over to websockets."""
        return Front(
            respond, websocket, self.api.websocket_refusal,
            max_header_bytes=self.config.http.max_header_bytes,
            max_body_bytes=self.config.server.max_message_bytes,
            max_in_progress=self.config.http.max_in_progress,
            header_timeout=self.config.http.header_timeout_seconds,
            summary=LogSummary(logging.getLogger(logger)),
            max_open=max_open,
            opened=self.opened,
            cors=cors,
        )

    def _forget_profile(self, row: UserRow) -> None:
        # The backend registered a new profile: read it again at the user's next handshake,
        # and show an online user by it now (on every daemon).
        self.sessions.profiles.pop(row.id, None)
        self.hub.profile_changed(row.id, row.username, row.user_type)
        self.backplane.invalidate({"profile": row.id})

    async def _profile_elsewhere(self, user_id: int) -> None:
        """Another daemon stored a user's profile: shown here too if the user is online."""
        if user_id not in self.hub.users:
            return
        row = (await self.store.users([user_id])).get(user_id)
        if row is not None:
            self.hub.profile_changed(user_id, row.username, row.user_type)

    def _typing_gone(self, states: list[TypingState]) -> None:
        """A dead daemon this one claimed was typing: end its states (they need reads)."""
        self.background.spawn(self.service.typing_gone(states), name="typing-gone")

    def _invalidated(self, change: dict[str, object]) -> None:
        """Another daemon changed what this one caches."""
        profile = change.get("profile")
        if isinstance(profile, int):
            self.sessions.profiles.pop(profile, None)
            self.background.spawn(self._profile_elsewhere(profile), name="profile-elsewhere")
            return
        if "pitch" in change:
            self.service.pitch_frame_elsewhere(change)
            return
        pitch_changed = change.get("pitch_changed")
        if isinstance(pitch_changed, int):
            recheck = self.service.pitch_changed_elsewhere(pitch_changed)
            if recheck is not None:
                self.background.spawn(recheck, name="pitch-changed")
            return
        if "typing" in change:
            tracker = (self.typing if change["typing"] == TypingTopic.CONVERSATION.value
                       else self.service.pitch_typing)
            tracker.changed_elsewhere(change)
            return
        self.background.spawn(self.service.conversation_changed(change),
                              name="conversation-changed")

    def _cors_origins(self) -> tuple[str, ...]:
        # Demo mode's page and tokens are for local use; any origin may try them.
        return ("*",) if self.demo is not None else self.config.http.cors_origins

    def _observe_commit(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.commit_seconds.observe(seconds)

    async def start(self) -> Server:
        """Open the database, clear stale typing rows, start listening.

        Raises OSError when the port cannot be bound, with the store closed again."""
        await self.store.open()
        try:
            if not self.backplane.shared:
                # Other daemons' users may be typing in a shared database.
                await self.store.clear_typing()
            await self.backplane.start(self.hub, self._invalidated)
            if self.config.server.demo:
                self.demo = await demo.setup(self.store, self.config)
                self.verifier = Verifier(self.demo.auth)
            ping_interval = self.config.server.ping_interval_seconds or None
            ping_timeout = self.config.server.ping_timeout_seconds or None
            self.server = await serve(
                self.sessions.handle,
                self.config.server.host,
                self.config.server.port,
                process_request=self.routes.process_request,
                # Every connection starts at the front (http_front.py): HTTP requests with
                # bodies are answered there, WebSocket handshakes are handed to websockets.
                create_connection=self.front.connection_class(),
                server_header="pitchey-ws",
                compression=None,
                # PROTOCOL.md 6: a frame over this closes with 1009 (websockets does it).
                max_size=self.config.server.max_message_bytes,
                ping_interval=ping_interval,
                ping_timeout=ping_timeout,
                close_timeout=self.config.server.close_timeout_seconds,
                backlog=self.config.server.backlog,
                logger=logging.getLogger("pitchey.websockets"),
            )
            if self.api_front is not None:
                self.api_server = await self._serve_api(self.api_front)
        except BaseException:
            if self.server is not None:
                self.server.close()
                await self.server.wait_closed()
            await self.store.close()
            raise
        self.background.spawn(self.service.prune_loop(), name="notification-prune")
        for sock in self.server.sockets:
            name = sock.getsockname()
            log.info("listening on http://%s:%d (ws path %s)", name[0], name[1], WS_PATH)
        for sock in self.api_server.sockets if self.api_server is not None else ():
            name = sock.getsockname()
            log.info("backend API listening on http://%s:%d%s", name[0], name[1],
                     "" if self.config.api.key else " (api.key is not set: it answers 404)")
        return self.server

    async def _serve_api(self, front: Front) -> Server:
        """The backend API's listener: the same HTTP front, never handing over to
        websockets (a handshake there is an HTTP request like any, answered 404)."""
        return await serve(
            self.sessions.handle,
            self.config.api.host or self.config.server.host,
            self.config.api.port,
            create_connection=front.connection_class(),
            server_header="pitchey-ws",
            compression=None,
            backlog=self.config.server.backlog,
            logger=logging.getLogger("pitchey.websockets"),
        )

    async def stop(self) -> None:
        """Graceful shutdown, in a fixed order: stop accepting, ask every connection to close
        (1012), wait to the deadline, drop what remains with one counted ERROR line, then
        end typing and presence and close the store (which commits what is in flight)."""
        self.sessions.closing = True
        deadline = self.config.server.shutdown_timeout_seconds
        server = self.server
        if server is not None:
            # Stops accepting, refuses handshakes under way (503) and closes every open
            # connection with 1012; each close is bounded by close_timeout.
            server.close(close_connections=True, code=p.SERVER_RESTART.code,
                         reason=p.SERVER_RESTART.reason)
            self.front.abort_all()  # HTTP requests under way: the store is about to close
            try:
                await asyncio.wait_for(asyncio.shield(server.wait_closed()), deadline)
            except TimeoutError:
                remaining = [c for c in server.all_connections if c.transport is not None]
                running = [t for t in server.handler_tasks if not t.done()]
                if remaining or running:
                    log.error("%d connections still open and %d connection handlers still"
                              " running after %.1fs; dropping them", len(remaining),
                              len(running), deadline)
                    for connection in remaining:
                        connection.transport.abort()
                    for task in server.handler_tasks:
                        task.cancel()
                else:
                    # Nothing left to drop: the loop was still busy closing connections
                    # (16,000 of them take seconds) when the deadline came round.
                    log.warning("closing every connection took longer than %.1fs", deadline)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(server.wait_closed(), 1)
        if self.api_server is not None and self.api_front is not None:
            self.api_server.close()
            self.api_front.abort_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.api_server.wait_closed(), 1)
        self.sessions.flush_logs()  # the counts of lines held back in the last second
        self.typing.cancel_all()
        self.service.pitch_typing.cancel_all()
        await self.hub.settle_presence(self.config.presence.offline_grace_seconds + 1)
        self.hub.flush_presence()
        await self.background.wait(1)
        await self.backplane.stop()
        await self.store.close()
        log.info("stopped")


def _no_websocket(method: str, target: str, headers: list[tuple[str, str]]) -> bool:
    return False


# -- logging --------------------------------------------------------------------------------

_SECRET_PATTERNS = (
    re.compile(r"(token=)[^&\s\"']+", re.IGNORECASE),
    re.compile(r"(authorization:\s*bearer\s+)\S+", re.IGNORECASE),
    re.compile(r"(eyJ[A-Za-z0-9_-]{4,}\.)[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"),
)


class RedactTokens(logging.Filter):
    """Remove anything that looks like a token from every log line, whoever logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = message
        for pattern in _SECRET_PATTERNS:
            redacted = pattern.sub(r"\1[redacted]", redacted)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactTokens())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Their DEBUG lines carry frame payloads and SQL parameters (message bodies), and their
    # INFO lines repeat our own per-connection lines: keep only their warnings.
    logging.getLogger("pitchey.websockets").setLevel(logging.WARNING)
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)


# -- CLI ------------------------------------------------------------------------------------


def load_config(args: argparse.Namespace) -> cfg.Config:
    path = Path(args.config) if args.config else HERE / "config.toml"
    config = cfg.load(path if path.exists() or args.config else None)
    # PORT and HOST as hosting platforms set them; the CLI's flags win.
    if os.environ.get("HOST"):
        config = config.replace("server", host=os.environ["HOST"])
    if os.environ.get("PORT"):
        try:
            port = int(os.environ["PORT"])
        except ValueError:
            raise cfg.ConfigError(f"PORT must be a port number, got {os.environ['PORT']!r}"
                                  ) from None
        if not 0 <= port <= 65535:
            raise cfg.ConfigError(f"PORT must be 0-65535, got {port}")
        config = config.replace("server", port=port)
    if getattr(args, "host", None):
        config = config.replace("server", host=args.host)
    if getattr(args, "port", None) is not None:
        config = config.replace("server", port=args.port)
    if getattr(args, "db", None):
        config = config.replace("database", path=args.db, url="")  # --db is SQLite
    if getattr(args, "demo", False):
        config = config.replace("server", demo=True)
    return config


# Descriptors kept for everything that is not a connection: the listeners, the database (the
# writer and the default 4 readers, with their WAL and shared-memory files, the health
# check's), the event loop. Each read connection beyond 4 adds READER_FDS.
RESERVED_FDS = 32
READER_FDS = 3


def fit_descriptors(config: cfg.Config) -> tuple[cfg.Config, int, str]:
    """Raise the soft RLIMIT_NOFILE to the hard limit, and keep ``limits.max_connections``
    and ``http.max_in_progress`` within what the descriptors allow, so that the daemon
    refuses clients (503 server_full) before it runs out of descriptors. Returns the config,
    the descriptors left for client connections, and a line saying what it got (logged once
    the daemon listens)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    raised = ""
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            raised, soft = f" (raised from {soft})", wanted
        except (ValueError, OSError) as exc:
            raised = f" (could not raise it to {wanted}: {exc})"
    reserved = RESERVED_FDS + READER_FDS * max(config.database.read_connections - 4, 0)
    available = max(soft - reserved, 3)
    # Connections in progress hold a descriptor each, and at the cap as many again are left
    # for connections to be refused at once or to wait for a turn (http_front): both come out
    # of what the WebSocket connections may use.
    in_progress = min(config.http.max_in_progress, max(available // 10, 1))
    connections = min(config.limits.max_connections, available - 2 * in_progress)
    lowered = ""
    if connections < config.limits.max_connections:
        lowered = f" (limits.max_connections {config.limits.max_connections} lowered to fit)"
        config = config.replace("limits", max_connections=connections)
    if in_progress < config.http.max_in_progress:
        config = config.replace("http", max_in_progress=in_progress)
    line = (f"file descriptors: {soft}{raised}; up to {connections} connections{lowered} and"
            f" {in_progress} requests in progress, {reserved} descriptors kept for the"
            " database and listeners")
    return config, available, line


class LoopErrors:
    """The event loop's exception handler: what asyncio reports itself, summarised.

    At the descriptor limit asyncio's accept loop reports ``accept() out of system resource``
    once per queued connection (up to the listen backlog) and again at every retry: hundreds of
    thousands of tracebacks a minute. Each kind of report is logged at most once a second,
    that line counting the rest; descriptor exhaustion in one line, no traceback."""

    def __init__(self) -> None:
        # One line a second of each kind (the count of the rest included).
        self.summary = LogSummary(logging.getLogger("pitchey.loop"), per_second=1,
                                  level=logging.ERROR)

    def handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        message = str(context.get("message", "event loop error"))
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            self.summary.note("descriptors", "%s: %s (at the descriptor limit; new"
                              " connections wait)", message, exc.strerror)
            return
        if isinstance(exc, BaseException):
            self.summary.note(message, "%s: %s: %s", message, type(exc).__name__, exc)
        else:
            self.summary.note(message, "%s", message)


async def serve_until_signal(config: cfg.Config) -> int:
    config, max_open, descriptors = fit_descriptors(config)
    app = App(config, max_open)
    try:
        await app.start()
    except StoreError as exc:
        # Not a usable database (its text names the file and why): a setup error, like a
        # bad config, so exit 2 with one line and no traceback.
        log.error("cannot use the database: %s", exc)
        return 2
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.server.host, config.server.port,
                  exc.strerror or exc)
        return 1
    log.info("%s", descriptors)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(LoopErrors().handle)
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal: exiting at once")
            os._exit(1)
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await stop.wait()
    await app.stop()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args)
    except cfg.ConfigError as exc:
        print(f"pitchey-ws: config error: {exc}", file=sys.stderr)
        return 2
    hmac = config.auth.algorithms[0].startswith("HS")
    if hmac and not config.auth.jwt_secret and not config.server.demo:
        print(
            "pitchey-ws: no JWT secret. Set the JWT_SECRET environment variable or"
            " auth.jwt_secret in the config file (or run `serve --demo` to try it locally).",
            file=sys.stderr,
        )
        return 2
    setup_logging(config.server.log_level)
    if hmac and config.auth.jwt_secret and len(config.auth.jwt_secret.encode()) < 32:
        log.warning("the JWT secret is shorter than 32 bytes; use a longer random secret")
    if config.server.demo:
        log.warning("demo mode: demo users, demo page and /demo/token are enabled")
    return asyncio.run(serve_until_signal(config))


def cmd_token(args: argparse.Namespace) -> int:
    try:
        config = load_config(args)
    except cfg.ConfigError as exc:
        print(f"pitchey-ws: config error: {exc}", file=sys.stderr)
        return 2
    auth = config.auth
    if not auth.jwt_secret:
        secret = demo.stored_secret(config.database.sqlite_path)
        if secret is None:
            print(
                "pitchey-ws: no JWT secret. Set JWT_SECRET or auth.jwt_secret, or point --db at"
                " a database a `serve --demo` daemon created.",
                file=sys.stderr,
            )
            return 2
        auth = cfg.AuthConfig(jwt_secret=secret, algorithms=("HS256",))
    try:
        token = Verifier(auth).mint(args.user_id, args.username, args.user_type, args.ttl)
    except AuthError as exc:
        print(f"pitchey-ws: {exc.message}", file=sys.stderr)
        return 2
    print(token)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """POST /api/publish with the key from PITCHEY_WS_API_KEY (standard library only)."""
    import json
    import urllib.error
    import urllib.request

    key = os.environ.get("PITCHEY_WS_API_KEY", "")
    if not key:
        print("pitchey-ws: set PITCHEY_WS_API_KEY to the daemon's api.key", file=sys.stderr)
        return 2
    try:
        data = json.loads(args.data)
    except ValueError as exc:
        print(f"pitchey-ws: --data is not JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(data, dict):
        print("pitchey-ws: --data must be a JSON object", file=sys.stderr)
        return 2
    body: dict[str, object] = {"event": {**data, "type": args.type}}
    if args.user:
        body["users"] = args.user
    elif args.pitch is not None:
        body["pitchId"] = args.pitch
    elif args.conversation is not None:
        body["conversationId"] = args.conversation
    else:
        print("pitchey-ws: give --user, --pitch or --conversation", file=sys.stderr)
        return 2
    if args.idempotency_key:
        body["idempotencyKey"] = args.idempotency_key
    if args.durable is not None:
        body["durable"] = args.durable == "true"
    request = urllib.request.Request(
        args.url.rstrip("/") + "/api/publish", data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            print(response.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        print(f"pitchey-ws: HTTP {exc.code}: {exc.read().decode(errors='replace')}",
              file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"pitchey-ws: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1


def positive_int(text: str) -> int:
    value = int(text)
    if not 0 < value < 2**63:
        raise argparse.ArgumentTypeError("must be a positive 64-bit integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pitchey_ws.py", description="pitchey-ws: real-time messaging daemon for Pitchey."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the daemon", description="Run the daemon until SIGTERM.")
    s.add_argument("--config", metavar="FILE",
                   help="TOML config file (default: config.toml beside this script)")
    s.add_argument("--host", help="interface to listen on (default: $HOST, else from config:"
                                  " 127.0.0.1)")
    s.add_argument("--port", type=int, help="TCP port (default: $PORT, else from config: 8000;"
                                            " 0 = any free)")
    s.add_argument("--db", metavar="PATH", help="SQLite database file (default from config)")
    s.add_argument("--demo", action="store_true",
                   help="demo mode: own generated secret, demo users, demo page at /,"
                        " tokens from /demo/token. Never use in production.")
    s.set_defaults(run=cmd_serve)
    t = sub.add_parser("token", help="print a signed token for development",
                       description="Print a JWT signed with the configured secret.")
    t.add_argument("--user-id", type=positive_int, required=True, help="the userId claim")
    t.add_argument("--username", help="the username claim (display name)")
    t.add_argument("--user-type", help="the userType claim (creator, investor, production)")
    t.add_argument("--ttl", type=float, default=3600,
                   help="seconds until the token expires (default 3600)")
    t.add_argument("--config", metavar="FILE", help="TOML config file (for auth settings)")
    t.add_argument("--db", metavar="PATH",
                   help="database of a demo daemon, to sign with its generated secret")
    t.set_defaults(run=cmd_token)
    pub = sub.add_parser(
        "publish", help="publish an event through the backend API",
        description="POST /api/publish (the API key from PITCHEY_WS_API_KEY).")
    pub.add_argument("--url", default="http://127.0.0.1:8000", help="the daemon's base URL")
    pub.add_argument("--user", type=positive_int, action="append",
                     help="a user to notify (repeat for several)")
    pub.add_argument("--pitch", type=positive_int, help="a pitch's watchers instead")
    pub.add_argument("--conversation", type=positive_int,
                     help="a conversation's participants instead")
    pub.add_argument("--type", required=True, help="the event type, e.g. nda_signed")
    pub.add_argument("--data", default="{}", help="the event's fields as a JSON object")
    pub.add_argument("--idempotency-key", help="repeat-safe key")
    pub.add_argument("--durable", choices=("true", "false"),
                     help="store as notifications (default: true for --user)")
    pub.add_argument("--timeout", type=float, default=10, help="seconds (default 10)")
    pub.set_defaults(run=cmd_publish)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
