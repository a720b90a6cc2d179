"""The server harness (tests/servers.py): real PostgreSQL and Redis, reached by the real clients."""

from __future__ import annotations

import asyncio
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

if TYPE_CHECKING:
    from servers import PostgresServer, RedisServer

# The harness's fixtures; imported by pytest (with assertion rewriting), not by this module.


def refuses(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


# -- PostgreSQL ------------------------------------------------------------------------------


async def test_postgres_query(postgres_server: PostgresServer, postgres_db: str) -> None:
    """asyncpg connects to the fresh database over TCP on loopback and runs real statements."""
    conn = await asyncpg.connect(postgres_db, timeout=10)
    try:
        row = await conn.fetchrow(
            "SELECT current_database() AS db, current_user AS who,"
            " host(inet_server_addr()) AS addr, inet_server_port() AS port"
        )
        assert row is not None
        assert row["db"] == postgres_db.rsplit("/", 1)[1]
        assert row["who"] == "postgres"
        assert (row["addr"], row["port"]) == ("127.0.0.1", postgres_server.port)
        await conn.execute("CREATE TABLE t (id bigserial PRIMARY KEY, body text NOT NULL)")
        await conn.executemany("INSERT INTO t (body) VALUES ($1)", [("a",), ("b",), ("c",)])
        rows = await conn.fetch("SELECT id, body FROM t ORDER BY id")
        assert [(r["id"], r["body"]) for r in rows] == [(1, "a"), (2, "b"), (3, "c")]
    finally:
        await conn.close()


async def test_postgres_fresh_databases_are_isolated(postgres_server: PostgresServer) -> None:
    """Two databases made by create_database share nothing; drop_database removes one."""
    first, second = postgres_server.create_database(), postgres_server.create_database()
    assert first != second
    a = await asyncpg.connect(first, timeout=10)
    b = await asyncpg.connect(second, timeout=10)
    try:
        await a.execute("CREATE TABLE only_here (v int)")
        await a.execute("INSERT INTO only_here VALUES (42)")
        assert await a.fetchval("SELECT v FROM only_here") == 42
        assert await b.fetchval("SELECT to_regclass('only_here')") is None
        assert await a.fetchval("SELECT to_regclass('only_here')::text") == "only_here"
    finally:
        await a.close()
        await b.close()
    name = second.rsplit("/", 1)[1]
    postgres_server.drop_database(name)
    assert postgres_server.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{name}'") == "0"
    postgres_server.drop_database(first.rsplit("/", 1)[1])


async def test_postgres_is_local_and_temporary(
    postgres_server: PostgresServer, postgres_db: str
) -> None:
    """It listens on 127.0.0.1 only, its socket and data live in the harness's temp dir."""
    conn = await asyncpg.connect(postgres_db, timeout=10)
    try:
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
        assert await conn.fetchval("SHOW unix_socket_directories") == str(postgres_server.dir)
        data = Path(await conn.fetchval("SHOW data_directory"))
    finally:
        await conn.close()
    assert data == postgres_server.data
    assert postgres_server.dir.parent == Path(tempfile.gettempdir())
    assert (data / "PG_VERSION").exists()


# -- Redis -----------------------------------------------------------------------------------


async def test_redis_ping_and_data(redis_server: RedisServer) -> None:
    """redis.asyncio reaches it; it has no persistence and its dir is the temp dir."""
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await client.ping() is True
        await client.set("greeting", "hello")
        assert await client.get("greeting") == b"hello"
        assert await client.config_get("dir") == {"dir": str(redis_server.dir)}
        assert await client.config_get("save") == {"save": ""}
        assert await client.config_get("appendonly") == {"appendonly": "no"}
        assert await client.config_get("bind") == {"bind": "127.0.0.1"}
    finally:
        await client.aclose()


async def test_redis_server_fixture_starts_empty(redis_server: RedisServer) -> None:
    """Each test gets the session's Redis flushed (the test above left a key)."""
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await client.dbsize() == 0
    finally:
        await client.aclose()


async def test_redis_stop_and_start_on_the_same_port(fresh_redis_server: RedisServer) -> None:
    """Mid-conversation: stop() refuses connections, start() comes back on the same port, empty."""
    server = fresh_redis_server
    port = server.port
    client = aioredis.Redis.from_url(server.url)
    try:
        await client.set("k", "v")
        assert await client.get("k") == b"v"
        await asyncio.to_thread(server.stop)
        assert not server.running and refuses(port)
        with pytest.raises(RedisConnectionError):
            await client.ping()
        await asyncio.to_thread(server.start)
        assert server.port == port and server.running
        # The same client reconnects by itself; nothing was saved across the restart.
        assert await client.ping() is True
        assert await client.get("k") is None
    finally:
        await client.aclose()


def test_redis_kill_and_cleanup(fresh_redis_server: RedisServer) -> None:
    """kill() is a crash (SIGKILL); cleanup() removes the temporary directory."""
    server = fresh_redis_server
    assert server.dir.is_dir() and server.dir.parent == Path(tempfile.gettempdir())
    assert server.command("SET", "x", "1") == b"+OK"
    assert server.proc is not None
    proc = server.proc
    server.kill()
    assert proc.returncode == -9 and refuses(server.port)
    server.cleanup()
    assert not server.dir.exists()
