"""ScriptConnection, the pipelined hiredis connection for session checks.

Every test runs against a real redis-server on a loopback address. Tests
that freeze, kill, restart or reconfigure Redis start their own server, and
the rest use the test session's Redis with a key prefix of their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis

from authgrpc.errors import StoreUnavailable
from authgrpc.redis_store import (
    VALIDATE_SESSION,
    KeyLayout,
    RedisStore,
    connect,
)
from authgrpc.resp import Script, ScriptConnection
from authgrpc.store import NewSession, SessionLimits, SessionRecord, UserRecord
from tests.conftest import RedisProcess, free_port
from tests.topology import Server

# A touch interval longer than any test, so that validations do not write.
LIMITS = SessionLimits(idle_ms=60_000, absolute_ms=120_000, touch_interval_ms=600_000)
TOUCHING = SessionLimits(idle_ms=60_000, absolute_ms=120_000, touch_interval_ms=0)
NEW_SESSION = NewSession(
    refresh_hash=b"r" * 32,
    rotation_key=b"k" * 16,
    peer="ipv4:127.0.0.1:50500",
    user_agent="grpc-python/1.85",
)

ECHO = Script("return ARGV[1]")
# Spins for ARGV[2] Lua iterations (20000 took about 0.2 ms on redis-server
# 7.0.15, an estimate), so that replies lag behind the commands and many stay
# in flight at once.
SPIN_ECHO = Script(
    "local x = 0 for i = 1, tonumber(ARGV[2]) do x = x + i end return ARGV[1]"
)

# The timeout, in seconds, of tests that freeze Redis. Elapsed-time bounds
# below are multiples of it with a margin for a loaded machine.
SHORT_TIMEOUT = 0.3


def admin_client(port: int, password: str | None = None) -> redis.Redis:
    """Return a synchronous client for a test's own Redis on 127.0.0.1."""
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        password=password,
        socket_timeout=2,
        socket_connect_timeout=2,
    )


def other_connections(admin: redis.Redis) -> int:
    """Return how many clients other than ``admin`` are connected to its server."""
    own_id = admin.client_id()
    return sum(1 for client in admin.client_list() if int(client["id"]) != own_id)


def script_connections(admin: redis.Redis) -> int:
    """Return how many clients of ``admin``'s server last ran a script."""
    return sum(1 for client in admin.client_list() if client["cmd"] in SCRIPT_COMMANDS)


SCRIPT_COMMANDS = {"eval", "evalsha"}


def wait_connections(admin: redis.Redis, expected: int, timeout: float = 0.5) -> int:
    """Poll until ``expected`` other clients are connected, and return the last count.

    Redis drops a closed client on its next event-loop turn, so a count can
    lag a close by a few milliseconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        count = other_connections(admin)
        if count == expected or time.monotonic() > deadline:
            return count
        time.sleep(0.01)


async def flushed() -> None:
    """Wait until the calls started so far are written, before any reply is read.

    The first turn runs the calls up to their send, the second runs the
    write that the first scheduled.
    """
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def connections_received(admin: redis.Redis) -> int:
    return int(admin.info("stats")["total_connections_received"])


async def add_session(
    store: RedisStore, username: str, roles: tuple[str, ...] = ("reader",)
) -> tuple[UserRecord, SessionRecord]:
    user = await store.create_user(username, "hash", roles)
    session = await store.create_session(user, NEW_SESSION, LIMITS)
    return user, session


def pipelined_store(url: str, prefix: str, timeout: float = 1.0) -> RedisStore:
    """Return a store whose session checks go over a ScriptConnection."""
    store = RedisStore.from_url(url, prefix=prefix, timeout=timeout)
    assert isinstance(store._checks, ScriptConnection)
    return store


def redis_py_store(url: str, prefix: str, timeout: float = 1.0) -> RedisStore:
    """Return a store whose session checks go through redis-py."""
    return RedisStore(connect(url, timeout=timeout), KeyLayout(prefix))


async def delete_prefix(url: str, prefix: str) -> None:
    client = connect(url)
    async for key in client.scan_iter(match=f"{prefix}:*"):
        await client.delete(key)
    await client.aclose(close_connection_pool=True)


def same_session(left: SessionRecord | None, right: SessionRecord | None) -> None:
    """Assert that two validations of one untouched session returned the same record.

    The idle expiry is the server's clock plus PTTL, so it may differ by the
    milliseconds between the two calls.
    """
    assert left is not None
    assert right is not None
    assert abs(left.idle_expiry_ms - right.idle_expiry_ms) <= 50
    assert dataclasses.replace(left, idle_expiry_ms=0) == dataclasses.replace(
        right, idle_expiry_ms=0
    )


@pytest.fixture
async def stores(
    redis_url: str, prefix: str
) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """A pipelined store and a redis-py store on the test session's Redis."""
    pipelined = pipelined_store(redis_url, prefix)
    plain = redis_py_store(redis_url, prefix)
    yield pipelined, plain
    await pipelined.close()
    await plain.close()
    await delete_prefix(redis_url, prefix)


@pytest.fixture
def admin(redis_process: RedisProcess) -> Iterator[redis.Redis]:
    """A client of the test's own Redis, connected before any test sets a password."""
    client = admin_client(redis_process.port)
    client.ping()
    yield client
    client.close()


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[Server]:
    """A Redis of this test's own that the test may SIGKILL and start again."""
    server = Server(
        tmp_path / "restartable",
        free_port(),
        ["--save", "", "--appendonly", "no"],
    )
    server.start()
    yield server
    server.stop()


# Replies are the same as redis-py returns for the same script.


async def test_live_session_matches_redis_py(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    pipelined, plain = stores
    user, session = await add_session(plain, "alice", ("admin", "reader"))

    ours = await pipelined.validate_session(user.user_id, session.session_id, LIMITS)
    theirs = await plain.validate_session(user.user_id, session.session_id, LIMITS)

    same_session(ours, theirs)
    assert ours is not None
    assert ours.username == "alice"
    assert ours.roles == ("admin", "reader")
    assert ours.created_ms == session.created_ms
    assert ours.absolute_expiry_ms == session.absolute_expiry_ms
    assert ours.peer == NEW_SESSION.peer
    assert ours.user_agent == NEW_SESSION.user_agent


async def test_touching_validation_matches_redis_py(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    pipelined, plain = stores
    user, session = await add_session(plain, "bob")

    ours = await pipelined.validate_session(user.user_id, session.session_id, TOUCHING)
    theirs = await plain.validate_session(user.user_id, session.session_id, TOUCHING)

    assert ours is not None
    assert theirs is not None
    assert ours.created_ms == theirs.created_ms == session.created_ms
    assert ours.absolute_expiry_ms == theirs.absolute_expiry_ms
    assert session.last_seen_ms <= ours.last_seen_ms <= theirs.last_seen_ms
    # A touch sets the idle expiry to the touch time plus the idle timeout.
    assert ours.idle_expiry_ms == ours.last_seen_ms + TOUCHING.idle_ms
    assert theirs.idle_expiry_ms == theirs.last_seen_ms + TOUCHING.idle_ms


async def test_ended_and_missing_sessions_match(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    pipelined, plain = stores
    ended_user, ended = await add_session(plain, "ended")
    await plain.end_session(ended_user.user_id, ended.session_id)
    disabled_user, disabled = await add_session(plain, "disabled")
    await plain.set_disabled(disabled_user.user_id, True)
    live_user, _ = await add_session(plain, "live")
    cases = {
        "ended session": (ended_user.user_id, ended.session_id),
        "disabled user": (disabled_user.user_id, disabled.session_id),
        "unknown session id": (live_user.user_id, "s" * 22),
        "unknown user": ("nobody", "s" * 22),
        "one-character session id": (live_user.user_id, "n"),
    }

    for name, (user_id, session_id) in cases.items():
        ours = await pipelined.validate_session(user_id, session_id, LIMITS)
        theirs = await plain.validate_session(user_id, session_id, LIMITS)
        assert ours is None, name
        assert theirs is None, name


async def test_past_absolute_expiry_ends_session(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    pipelined, plain = stores
    user, session = await add_session(plain, "carol")
    session_key = plain.keys.session(user.user_id, session.session_id)
    # An index value of 1 ms after the epoch is an absolute expiry long past.
    await plain.client.hset(plain.keys.user(user.user_id), session.session_id, 1)

    ours = await pipelined.validate_session(user.user_id, session.session_id, LIMITS)

    assert ours is None
    assert not await plain.client.exists(session_key)
    index = await plain.client.hgetall(plain.keys.user(user.user_id))
    assert session.session_id.encode() not in index
    assert (
        await plain.validate_session(user.user_id, session.session_id, LIMITS) is None
    )


async def test_corrupt_session_raises_like_redis_py(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    pipelined, plain = stores
    user, session = await add_session(plain, "dave")
    session_key = plain.keys.session(user.user_id, session.session_id)
    await plain.client.hset(session_key, "t", "not a number")

    errors = []
    for store in (pipelined, plain):
        with pytest.raises(redis.exceptions.ResponseError) as caught:
            await store.validate_session(user.user_id, session.session_id, LIMITS)
        errors.append(caught.value)

    assert type(errors[0]) is type(errors[1])
    assert "arithmetic" in str(errors[0])


REPLY_SCRIPTS = [
    "return {1, -2, 'x', false, {3, {'y', ''}}, redis.status_reply('FINE')}",
    "return false",
    "return true",
    "return {}",
    "return 3.9",
    "return '\\0\\255'",
    "return redis.status_reply('OK')",
    "return 9007199254740993",
    "return KEYS[1] .. ARGV[1] .. ARGV[2]",
    "return redis.call('HGETALL', KEYS[2])",
]


@pytest.mark.parametrize("source", REPLY_SCRIPTS)
async def test_reply_types_match_redis_py(
    redis_url: str, prefix: str, source: str
) -> None:
    conn = ScriptConnection.for_url(redis_url)
    assert conn is not None
    client = connect(redis_url)
    keys = [f"{prefix}:string", f"{prefix}:hash"]
    args = ["é", 12]
    await client.hset(keys[1], mapping={"a": 1, "b": "two"})
    try:
        ours = await conn.run(Script(source), keys, args)
        theirs = await client.register_script(source)(keys=keys, args=args)
    finally:
        await client.delete(*keys)
        await conn.close()
        await client.aclose(close_connection_pool=True)

    assert ours == theirs
    assert type(ours) is type(theirs)


async def test_error_reply_raises_response_error(redis_url: str) -> None:
    conn = ScriptConnection.for_url(redis_url)
    assert conn is not None
    try:
        with pytest.raises(redis.exceptions.ResponseError, match="MYERR custom"):
            await conn.run(Script("return redis.error_reply('MYERR custom')"), [], [])
        with pytest.raises(redis.exceptions.ResponseError, match="boom"):
            await conn.run(Script("error('boom')"), [], [])
        # The connection stays in step after error replies.
        assert await conn.run(ECHO, [], ["after"]) == b"after"
    finally:
        await conn.close()


async def test_readonly_replica_is_store_unavailable(
    tmp_path: Path, prefix: str
) -> None:
    # Without the 5 s default delay, the replica syncs at once.
    primary = RedisProcess(
        tmp_path / "primary", None, "--repl-diskless-sync-delay", "0"
    )
    replica_dir = tmp_path / "replica"
    primary.directory.mkdir()
    replica_dir.mkdir()
    primary.start()
    replica = RedisProcess(
        replica_dir, None, "--replicaof", "127.0.0.1", str(primary.port)
    )
    try:
        replica.start()
        plain = redis_py_store(primary.url, prefix)
        user, session = await add_session(plain, "erin")
        # A past absolute expiry makes the check delete the session, a write.
        await plain.client.hset(plain.keys.user(user.user_id), session.session_id, 1)
        await plain.close()
        replica_admin = admin_client(replica.port)
        deadline = time.monotonic() + 5
        while (
            replica_admin.hget(KeyLayout(prefix).user(user.user_id), session.session_id)
            != b"1"
        ):
            assert time.monotonic() < deadline, "replica did not catch up"
            await asyncio.sleep(0.02)
        replica_admin.close()

        for store in (
            pipelined_store(replica.url, prefix),
            redis_py_store(replica.url, prefix),
        ):
            with pytest.raises(StoreUnavailable):
                await store.validate_session(user.user_id, session.session_id, LIMITS)
            await store.close()
    finally:
        replica.stop()
        primary.stop()


@pytest.mark.parametrize(
    "make_store", [pipelined_store, redis_py_store], ids=["pipelined", "redis-py"]
)
async def test_stale_replica_is_store_unavailable(
    redis_process: RedisProcess, admin: redis.Redis, prefix: str, make_store: Any
) -> None:
    # A replica of a primary that never replies, configured not to serve stale data.
    admin.config_set("replica-serve-stale-data", "no")
    admin.replicaof("127.0.0.1", free_port())
    store = make_store(redis_process.url, prefix)
    try:
        with pytest.raises(StoreUnavailable, match=r"(?i)masterdown"):
            await store.validate_session("user", "s" * 22, LIMITS)
    finally:
        await store.close()


@pytest.mark.parametrize(
    "make_store", [pipelined_store, redis_py_store], ids=["pipelined", "redis-py"]
)
async def test_busy_script_is_store_unavailable(
    redis_process: RedisProcess, admin: redis.Redis, prefix: str, make_store: Any
) -> None:
    admin.config_set("busy-reply-threshold", 20)
    store = make_store(redis_process.url, prefix)
    assert await store.validate_session("user", "s" * 22, LIMITS) is None
    blocker = admin_client(redis_process.port)
    # The script runs for far longer than the threshold. The probe below
    # waits for Redis to reply BUSY before the check runs.
    spin = "local x = 0 for i = 1, 60000000 do x = x + i end return 1"
    running = threading.Thread(target=blocker.eval, args=(spin, 0))
    running.start()
    try:
        probe = admin_client(redis_process.port)
        deadline = time.monotonic() + 2
        while True:
            assert time.monotonic() < deadline, "Redis never replied BUSY"
            try:
                probe.ping()
            except redis.exceptions.ResponseError as error:
                assert str(error).startswith("BUSY")
                break
            await asyncio.sleep(0.005)
        probe.close()

        with pytest.raises(StoreUnavailable):
            await store.validate_session("user", "s" * 22, LIMITS)
    finally:
        running.join(10)
        blocker.close()
        await store.close()


# Concurrency. Each caller gets its own reply.


async def test_concurrent_calls_get_own_replies(redis_url: str) -> None:
    conn = ScriptConnection.for_url(redis_url)
    assert conn is not None
    rng = random.Random(3)
    spins = [rng.choice([0, 100, 5000, 20000]) for _ in range(2000)]
    try:
        replies = await asyncio.gather(
            *(
                conn.run(SPIN_ECHO, [], [f"call{i}", spin])
                for i, spin in enumerate(spins)
            )
        )
    finally:
        await conn.close()

    for i, reply in enumerate(replies):
        assert reply == f"call{i}".encode()


async def test_cancelled_callers_do_not_shift_replies(
    redis_process: RedisProcess,
    admin: redis.Redis,
) -> None:
    conn = ScriptConnection.for_url(redis_process.url, timeout=5)
    assert conn is not None
    await conn.run(ECHO, [], ["warm"])
    received_before = connections_received(admin)
    rng = random.Random(11)
    outcomes: Counter[str] = Counter()

    async def call(i: int, deadline: float | None) -> None:
        expected = f"call{i}".encode()
        try:
            async with asyncio.timeout(deadline):
                reply = await conn.run(
                    SPIN_ECHO, [], [expected, rng.choice([0, 2000, 20000])]
                )
        except TimeoutError:
            outcomes["timed out"] += 1
            return
        outcomes["ok" if reply == expected else "wrong reply"] += 1

    for round_number in range(10):
        tasks = [
            asyncio.create_task(
                call(round_number * 300 + i, rng.choice([None, 0.0005, 0.002, 0.01]))
            )
            for i in range(300)
        ]
        # Cancel some tasks before they send, some while the write is
        # buffered and some while Redis works on their command.
        for step in range(6):
            for task in rng.sample(tasks, 15):
                task.cancel()
            if step % 2:
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(0.0005)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, asyncio.CancelledError):
                outcomes["cancelled"] += 1
            elif result is not None:
                raise result

    try:
        assert outcomes["wrong reply"] == 0
        assert outcomes["ok"] > 100
        assert outcomes["cancelled"] + outcomes["timed out"] > 100
        # Cancellation leaves the connection in step, so it needed no reconnect.
        assert await conn.run(ECHO, [], ["after"]) == b"after"
        assert connections_received(admin) == received_before
    finally:
        await conn.close()


async def test_store_cancellation_keeps_results(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    pipelined, plain = stores
    pairs = [await add_session(plain, f"user{i}") for i in range(20)]
    ended = {session.session_id for _, session in pairs[::3]}
    for user, session in pairs[::3]:
        await plain.end_session(user.user_id, session.session_id)
    rng = random.Random(5)
    checked = 0

    async def check(
        user: UserRecord, session: SessionRecord, deadline: float | None
    ) -> None:
        nonlocal checked
        try:
            async with asyncio.timeout(deadline):
                result = await pipelined.validate_session(
                    user.user_id, session.session_id, LIMITS
                )
        except TimeoutError:
            return
        checked += 1
        if session.session_id in ended:
            assert result is None
        else:
            assert result is not None
            assert result.session_id == session.session_id
            assert result.user_id == user.user_id
            assert result.username == user.username

    await asyncio.gather(
        *(
            check(user, session, rng.choice([None, None, 0.0002, 0.001]))
            for _ in range(25)
            for user, session in pairs
        )
    )

    assert checked > 100


async def test_timed_out_call_resends_others(redis_process: RedisProcess) -> None:
    conn = ScriptConnection.for_url(redis_process.url, timeout=SHORT_TIMEOUT)
    assert conn is not None
    await conn.run(ECHO, [], ["warm"])

    async def call(i: int) -> Any:
        # Arrivals spread over two thirds of the timeout, so the first
        # timeout aborts the connection while the later calls still wait.
        await asyncio.sleep(i * SHORT_TIMEOUT / 30)
        try:
            return await conn.run(ECHO, [], [f"call{i}"])
        except redis.exceptions.RedisError as error:
            return error

    redis_process.freeze()
    calls = asyncio.gather(*(call(i) for i in range(20)))
    await asyncio.sleep(SHORT_TIMEOUT * 1.3)
    redis_process.thaw()
    results = await calls

    try:
        timed_out = [r for r in results if isinstance(r, redis.exceptions.TimeoutError)]
        assert timed_out, "no call timed out while Redis was frozen"
        for i, result in enumerate(results):
            if not isinstance(result, redis.exceptions.TimeoutError):
                assert result == f"call{i}".encode()
        assert await conn.run(ECHO, [], ["after"]) == b"after"
    finally:
        await conn.close()


async def test_killed_connection_is_resent(
    redis_process: RedisProcess, admin: redis.Redis
) -> None:
    conn = ScriptConnection.for_url(redis_process.url)
    assert conn is not None
    try:
        assert await conn.run(ECHO, [], ["first"]) == b"first"
        admin.client_kill_filter(_type="normal", skipme=True)
        assert await conn.run(ECHO, [], ["after kill"]) == b"after kill"

        # Loads the script, so that the batch below needs no EVAL fallback.
        assert await conn.run(SPIN_ECHO, [], ["spin", 1]) == b"spin"
        received_before = connections_received(admin)
        # Redis reads a client's input in PROTO_IOBUF_LEN (16 KiB) chunks and
        # serves other clients between reads, so the kill lands inside this
        # 80 KiB batch.
        padding = "p" * 200
        calls = asyncio.gather(
            *(conn.run(SPIN_ECHO, [], [f"call{i}", 5000, padding]) for i in range(400)),
            return_exceptions=True,
        )
        await flushed()
        # A blocking call, so this loop reads no reply before the kill.
        admin.client_kill_filter(_type="normal", skipme=True)
        results = await calls
        assert connections_received(admin) > received_before
        for i, result in enumerate(results):
            if isinstance(result, BaseException):
                assert isinstance(result, redis.exceptions.ConnectionError)
            else:
                assert result == f"call{i}".encode()
    finally:
        await conn.close()


# NOSCRIPT: EVALSHA falls back to EVAL.


async def test_script_flush_falls_back_to_eval(
    redis_process: RedisProcess, admin: redis.Redis
) -> None:
    conn = ScriptConnection.for_url(redis_process.url)
    assert conn is not None
    try:
        assert await conn.run(ECHO, [], ["before"]) == b"before"
        admin.script_flush()
        assert admin.script_exists(ECHO.sha) == [False]

        assert await conn.run(ECHO, [], ["after"]) == b"after"
        assert admin.script_exists(ECHO.sha) == [True]

        admin.script_flush()
        replies = await asyncio.gather(
            *(conn.run(ECHO, [], [f"call{i}"]) for i in range(50))
        )
        assert replies == [f"call{i}".encode() for i in range(50)]
    finally:
        await conn.close()


async def test_script_flush_through_store(
    redis_process: RedisProcess, admin: redis.Redis, prefix: str
) -> None:
    plain = redis_py_store(redis_process.url, prefix)
    pipelined = pipelined_store(redis_process.url, prefix)
    user, session = await add_session(plain, "frank")
    try:
        admin.script_flush()
        assert admin.script_exists(Script(VALIDATE_SESSION).sha) == [False]
        results = await asyncio.gather(
            *(
                pipelined.validate_session(user.user_id, session.session_id, LIMITS)
                for _ in range(10)
            )
        )
        for result in results:
            assert result is not None
            assert result.session_id == session.session_id
    finally:
        await pipelined.close()
        await plain.close()


# Redis restarted, down or frozen.


async def test_restart_fails_then_recovers(restartable: Server) -> None:
    url = f"redis://127.0.0.1:{restartable.port}/0"
    conn = ScriptConnection.for_url(url)
    assert conn is not None
    try:
        assert await conn.run(ECHO, [], ["before"]) == b"before"

        restartable.kill()
        with pytest.raises(redis.exceptions.ConnectionError):
            await conn.run(ECHO, [], ["while down"])

        restartable.start()
        # The first call may still meet the old connection's loss.
        try:
            first = await conn.run(ECHO, [], ["first"])
        except redis.exceptions.ConnectionError:
            first = None
        assert first in (None, b"first")
        for i in range(5):
            assert await conn.run(ECHO, [], [f"later{i}"]) == f"later{i}".encode()
    finally:
        await conn.close()


async def test_restart_under_load_store_unavailable(
    restartable: Server, prefix: str
) -> None:
    url = f"redis://127.0.0.1:{restartable.port}/0"
    plain = redis_py_store(url, prefix)
    user, session = await add_session(plain, "grace")
    await plain.close()
    pipelined = pipelined_store(url, prefix, timeout=0.5)
    outcomes: Counter[str] = Counter()
    unexpected: list[BaseException] = []
    stopping = asyncio.Event()

    async def worker() -> None:
        for _ in range(5000):
            if stopping.is_set():
                return
            try:
                await pipelined.validate_session(
                    user.user_id, session.session_id, LIMITS
                )
                outcomes["ok"] += 1
            except StoreUnavailable:
                outcomes["unavailable"] += 1
                await asyncio.sleep(0.005)
            except BaseException as error:
                unexpected.append(error)
                return

    workers = [asyncio.create_task(worker()) for _ in range(20)]
    await asyncio.sleep(0.1)
    await asyncio.to_thread(restartable.kill)
    await asyncio.sleep(0.1)
    await asyncio.to_thread(restartable.start)
    await asyncio.sleep(0.2)
    stopping.set()
    await asyncio.gather(*workers)

    try:
        assert unexpected == []
        assert outcomes["unavailable"] > 0
        # The restarted server has no data, so the session reads as missing.
        assert (
            await pipelined.validate_session(user.user_id, session.session_id, LIMITS)
            is None
        )
    finally:
        await pipelined.close()


async def test_down_at_first_use_is_store_unavailable(prefix: str) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    store = pipelined_store(url, prefix, timeout=SHORT_TIMEOUT)
    conn = ScriptConnection.for_url(url, timeout=SHORT_TIMEOUT)
    assert conn is not None
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="unavailable") as caught:
            await store.validate_session("user", "s" * 22, LIMITS)
        assert time.monotonic() - started < SHORT_TIMEOUT + 0.5
        assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)

        with pytest.raises(redis.exceptions.ConnectionError, match="Error connecting"):
            await conn.run(ECHO, [], ["x"])
    finally:
        await store.close()
        await conn.close()


async def test_missing_unix_socket_is_connection_error(tmp_path: Path) -> None:
    conn = ScriptConnection.for_url(
        f"unix://{tmp_path}/absent.sock", timeout=SHORT_TIMEOUT
    )
    assert conn is not None
    with pytest.raises(redis.exceptions.ConnectionError, match="No such file"):
        await conn.run(ECHO, [], ["x"])


@pytest.mark.parametrize("password", [None, "pw"], ids=["no-login", "login"])
async def test_frozen_at_first_use_times_out(
    redis_process: RedisProcess, admin: redis.Redis, prefix: str, password: str | None
) -> None:
    if password is not None:
        admin.config_set("requirepass", password)
    credentials = f":{password}@" if password else ""
    url = f"redis://{credentials}127.0.0.1:{redis_process.port}/0"
    store = pipelined_store(url, prefix, timeout=SHORT_TIMEOUT)
    redis_process.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            await store.validate_session("user", "s" * 22, LIMITS)
        elapsed = time.monotonic() - started
        assert isinstance(caught.value.__cause__, redis.exceptions.TimeoutError)
        assert SHORT_TIMEOUT * 0.8 < elapsed < SHORT_TIMEOUT * 2 + 0.3
    finally:
        redis_process.thaw()
        await store.close()


async def test_frozen_call_times_out_then_recovers(
    redis_process: RedisProcess, prefix: str
) -> None:
    conn = ScriptConnection.for_url(redis_process.url, timeout=SHORT_TIMEOUT)
    assert conn is not None
    store = pipelined_store(redis_process.url, prefix, timeout=SHORT_TIMEOUT)
    assert await conn.run(ECHO, [], ["warm"]) == b"warm"
    assert await store.validate_session("user", "s" * 22, LIMITS) is None

    redis_process.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(redis.exceptions.TimeoutError):
            await conn.run(ECHO, [], ["frozen"])
        elapsed = time.monotonic() - started
        assert SHORT_TIMEOUT * 0.8 < elapsed < SHORT_TIMEOUT + 0.3

        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            await store.validate_session("user", "s" * 22, LIMITS)
        elapsed = time.monotonic() - started
        assert isinstance(caught.value.__cause__, redis.exceptions.TimeoutError)
        assert SHORT_TIMEOUT * 0.8 < elapsed < SHORT_TIMEOUT + 0.3
    finally:
        redis_process.thaw()

    try:
        assert await conn.run(ECHO, [], ["thawed"]) == b"thawed"
        assert await store.validate_session("user", "s" * 22, LIMITS) is None
    finally:
        await conn.close()
        await store.close()


async def test_frozen_concurrent_calls_bounded(
    redis_process: RedisProcess,
) -> None:
    conn = ScriptConnection.for_url(redis_process.url, timeout=SHORT_TIMEOUT)
    assert conn is not None
    await conn.run(ECHO, [], ["warm"])

    async def timed_call(i: int) -> tuple[BaseException | None, float]:
        await asyncio.sleep(i * SHORT_TIMEOUT / 10)
        started = time.monotonic()
        try:
            await conn.run(ECHO, [], [f"call{i}"])
        except redis.exceptions.RedisError as error:
            return error, time.monotonic() - started
        return None, time.monotonic() - started

    redis_process.freeze()
    try:
        results = await asyncio.gather(*(timed_call(i) for i in range(10)))
    finally:
        redis_process.thaw()

    try:
        for error, elapsed in results:
            # A call that another caller's timeout cut off is sent again on a
            # new connection, which may time out or be cut off in turn.
            assert isinstance(
                error, redis.exceptions.TimeoutError | redis.exceptions.ConnectionError
            )
            # A call in flight when another one times out is sent once more
            # and waits a second timeout, so two timeouts is the bound.
            assert elapsed < SHORT_TIMEOUT * 2 + 0.3
        assert await conn.run(ECHO, [], ["thawed"]) == b"thawed"
    finally:
        await conn.close()


# Login with passwords, ACL users and databases.


async def test_password_and_database_selection(
    redis_process: RedisProcess, admin: redis.Redis, prefix: str
) -> None:
    admin.config_set("requirepass", "pw")
    url_db5 = f"redis://:pw@127.0.0.1:{redis_process.port}/5"
    url_db0 = f"redis://:pw@127.0.0.1:{redis_process.port}/0"
    plain = redis_py_store(url_db5, prefix)
    user, session = await add_session(plain, "heidi")
    await plain.close()
    in_db5 = pipelined_store(url_db5, prefix)
    in_db0 = pipelined_store(url_db0, prefix)
    try:
        result = await in_db5.validate_session(user.user_id, session.session_id, LIMITS)
        assert result is not None
        assert result.username == "heidi"
        assert (
            await in_db0.validate_session(user.user_id, session.session_id, LIMITS)
            is None
        )
        assert admin.dbsize() == 0
    finally:
        await in_db5.close()
        await in_db0.close()


async def test_acl_user_url(
    redis_process: RedisProcess, admin: redis.Redis, prefix: str
) -> None:
    password = "p@ss:w/rd%é"
    admin.acl_setuser(
        "checker",
        enabled=True,
        passwords=[f"+{password}"],
        keys=["*"],
        commands=["+@all"],
    )
    admin.acl_setuser("default", enabled=False)
    url = f"redis://checker:{quote(password, safe='')}@127.0.0.1:{redis_process.port}/3"
    plain = redis_py_store(url, prefix)
    user, session = await add_session(plain, "ivan")
    await plain.close()
    store = pipelined_store(url, prefix)
    try:
        result = await store.validate_session(user.user_id, session.session_id, LIMITS)
        assert result is not None
        assert result.username == "ivan"
    finally:
        await store.close()


@pytest.mark.parametrize(
    "credentials",
    [":wrong@", "checker:wrong@", "nobody:pw@", "checker@", ""],
    ids=["password-only", "wrong-password", "unknown-user", "no-password", "no-login"],
)
async def test_wrong_login_is_store_unavailable(
    redis_process: RedisProcess, admin: redis.Redis, prefix: str, credentials: str
) -> None:
    admin.acl_setuser(
        "checker", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all"]
    )
    admin.config_set("requirepass", "right")
    url = f"redis://{credentials}127.0.0.1:{redis_process.port}/0"
    stores = [pipelined_store(url, prefix), redis_py_store(url, prefix)]
    try:
        for store in stores:
            started = time.monotonic()
            results = await asyncio.gather(
                *(store.validate_session("user", "s" * 22, LIMITS) for _ in range(10)),
                return_exceptions=True,
            )
            assert time.monotonic() - started < 0.5
            for result in results:
                assert isinstance(result, StoreUnavailable)
                assert isinstance(
                    result.__cause__, redis.exceptions.AuthenticationError
                )
    finally:
        for store in stores:
            await store.close()


async def test_missing_permission_is_store_unavailable(
    redis_process: RedisProcess, admin: redis.Redis, prefix: str
) -> None:
    admin.acl_setuser(
        "limited",
        enabled=True,
        passwords=["+pw"],
        keys=["*"],
        commands=["+@all", "-evalsha", "-eval"],
    )
    store = pipelined_store(
        f"redis://limited:pw@127.0.0.1:{redis_process.port}/0", prefix
    )
    try:
        # NOTE: redis-py raises NoPermissionError here, a ResponseError that
        # guarded() passes on, while the pipelined path reports the store as down.
        with pytest.raises(StoreUnavailable):
            await store.validate_session("user", "s" * 22, LIMITS)
    finally:
        await store.close()


async def test_password_without_server_password(
    redis_process: RedisProcess, prefix: str
) -> None:
    url = f"redis://:secret@127.0.0.1:{redis_process.port}/0"
    plain = redis_py_store(url, prefix)
    assert await plain.validate_session("user", "s" * 22, LIMITS) is None
    await plain.close()
    store = pipelined_store(url, prefix)
    try:
        assert await store.validate_session("user", "s" * 22, LIMITS) is None
    finally:
        await store.close()


async def test_username_without_password(
    redis_process: RedisProcess, admin: redis.Redis, prefix: str
) -> None:
    admin.acl_setuser(
        "nopass-user", enabled=True, nopass=True, keys=["*"], commands=["+@all"]
    )
    admin.acl_setuser("default", enabled=False)
    url = f"redis://nopass-user@127.0.0.1:{redis_process.port}/0"
    plain = redis_py_store(url, prefix)
    assert await plain.validate_session("user", "s" * 22, LIMITS) is None
    await plain.close()
    store = pipelined_store(url, prefix)
    try:
        assert await store.validate_session("user", "s" * 22, LIMITS) is None
    finally:
        await store.close()


async def test_max_clients_is_store_unavailable(tmp_path: Path, prefix: str) -> None:
    server = RedisProcess(tmp_path, None, "--maxclients", "1")
    server.start()
    admin = admin_client(server.port)
    admin.config_set("requirepass", "pw")
    admin.close()
    holder = admin_client(server.port, password="pw")
    holder.ping()
    url = f"redis://:pw@127.0.0.1:{server.port}/0"
    plain = redis_py_store(url, prefix)
    store = pipelined_store(url, prefix)
    try:
        with pytest.raises(StoreUnavailable):
            await plain.validate_session("user", "s" * 22, LIMITS)
        with pytest.raises(StoreUnavailable):
            await store.validate_session("user", "s" * 22, LIMITS)
    finally:
        await plain.close()
        await store.close()
        holder.close()
        server.stop()


# Which URLs for_url gives a ScriptConnection.


@pytest.mark.parametrize(
    "url",
    [
        "rediss://127.0.0.1:6390/0",
        "redis+cluster://127.0.0.1:7000",
        "rediss+cluster://127.0.0.1:7000",
        "redis+sentinel://127.0.0.1:26379/authgrpc",
        "redis://127.0.0.1:6390/0?socket_timeout=5",
        "redis://127.0.0.1:6390/0?protocol=3",
        "redis://127.0.0.1:6390/0?health_check_interval=2",
        "redis://127.0.0.1:6390/0?client_name=checker",
        "redis://127.0.0.1:6390/0?ssl_cert_reqs=none",
        "unix:///run/redis/redis.sock?socket_timeout=1",
        "REDIS://127.0.0.1:6390/0",
        "http://127.0.0.1:6390/0",
        "",
    ],
)
def test_for_url_returns_none(url: str) -> None:
    assert ScriptConnection.for_url(url) is None


@pytest.mark.parametrize(
    ("url", "host", "port", "path"),
    [
        ("redis://127.0.0.1:6390/0", "127.0.0.1", 6390, None),
        ("redis://127.0.0.1:6390", "127.0.0.1", 6390, None),
        ("redis://user:pw@127.0.0.1:6390/4", "127.0.0.1", 6390, None),
        ("redis://:pw@127.0.0.1:6390/0?db=3", "127.0.0.1", 6390, None),
        ("redis://[::1]:6390/0", "::1", 6390, None),
        ("unix:///run/redis/redis.sock", "localhost", 6379, "/run/redis/redis.sock"),
        (
            "unix:///run/redis/redis.sock?db=2",
            "localhost",
            6379,
            "/run/redis/redis.sock",
        ),
        (
            "unix://user:pw@/run/redis/redis.sock",
            "localhost",
            6379,
            "/run/redis/redis.sock",
        ),
    ],
)
def test_for_url_returns_connection(
    url: str, host: str, port: int, path: str | None
) -> None:
    conn = ScriptConnection.for_url(url, timeout=2.5)
    assert isinstance(conn, ScriptConnection)
    assert conn.host == host
    assert conn.port == port
    assert conn.path == path
    assert conn.timeout == 2.5


async def test_unix_socket_server(tmp_path: Path, prefix: str) -> None:
    socket_path = tmp_path / "redis.sock"
    server = RedisProcess(
        tmp_path, None, "--unixsocket", str(socket_path), "--unixsocketperm", "700"
    )
    server.start()
    url = f"unix://{socket_path}?db=2"
    try:
        plain = redis_py_store(url, prefix)
        user, session = await add_session(plain, "judy")
        await plain.close()
        store = pipelined_store(url, prefix)
        assert isinstance(store._checks, ScriptConnection)
        assert store._checks.path == str(socket_path)
        result = await store.validate_session(user.user_id, session.session_id, LIMITS)
        assert result is not None
        assert result.username == "judy"
        other_db = pipelined_store(f"unix://{socket_path}", prefix)
        assert (
            await other_db.validate_session(user.user_id, session.session_id, LIMITS)
            is None
        )
        await store.close()
        await other_db.close()
    finally:
        server.stop()


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback address")
async def test_ipv6_loopback_url(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path, None, "--bind", "127.0.0.1", "::1")
    server.start()
    conn = ScriptConnection.for_url(f"redis://[::1]:{server.port}/0")
    assert conn is not None
    try:
        assert await conn.run(ECHO, [], ["six"]) == b"six"
    finally:
        await conn.close()
        server.stop()


# Event loops and close().


def test_two_event_loops_in_sequence(redis_process: RedisProcess, prefix: str) -> None:
    async def setup() -> tuple[UserRecord, SessionRecord]:
        plain = redis_py_store(redis_process.url, prefix)
        pair = await add_session(plain, "kim")
        await plain.close()
        return pair

    user, session = asyncio.run(setup())
    store = pipelined_store(redis_process.url, prefix)

    async def check() -> SessionRecord | None:
        return await store.validate_session(user.user_id, session.session_id, LIMITS)

    async def check_and_close() -> SessionRecord | None:
        try:
            return await check()
        finally:
            await store.close()

    first = asyncio.run(check())
    second = asyncio.run(check())
    third = asyncio.run(check_and_close())

    for result in (first, second, third):
        assert result is not None
        assert result.session_id == session.session_id


def test_close_from_later_event_loop(redis_process: RedisProcess) -> None:
    conn = ScriptConnection.for_url(redis_process.url)
    assert conn is not None
    assert asyncio.run(conn.run(ECHO, [], ["x"])) == b"x"

    asyncio.run(conn.close())


def test_loop_switch_closes_old_connection(
    redis_process: RedisProcess, admin: redis.Redis
) -> None:
    conn = ScriptConnection.for_url(redis_process.url)
    assert conn is not None
    # The leaked transport and protocol form a reference cycle, so only the
    # cyclic collector would close the socket.
    gc.disable()
    try:
        for i in range(3):
            assert asyncio.run(conn.run(ECHO, [], [f"loop{i}"])) == f"loop{i}".encode()

        assert wait_connections(admin, 1) == 1
    finally:
        gc.enable()
        gc.collect()


def test_concurrent_loops_bound_connections(
    redis_process: RedisProcess, admin: redis.Redis
) -> None:
    conn = ScriptConnection.for_url(redis_process.url)
    assert conn is not None
    start = threading.Barrier(2)
    counts: list[int] = []
    wrong: list[bytes] = []

    def run_loop(name: str) -> None:
        async def calls() -> None:
            for i in range(100):
                reply = await conn.run(ECHO, [], [f"{name}{i}"])
                if reply != f"{name}{i}".encode():
                    wrong.append(reply)
                await asyncio.sleep(0.001)
            counts.append(script_connections(admin))

        start.wait()
        asyncio.run(calls())

    threads = [threading.Thread(target=run_loop, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert wrong == []
    assert len(counts) == 2
    assert max(counts) <= 2


async def test_close_then_reuse(
    redis_process: RedisProcess, admin: redis.Redis
) -> None:
    conn = ScriptConnection.for_url(redis_process.url)
    assert conn is not None
    try:
        assert await conn.run(ECHO, [], ["one"]) == b"one"
        assert wait_connections(admin, 1) == 1
        await conn.close()
        assert wait_connections(admin, 0) == 0
        await conn.close()

        assert await conn.run(ECHO, [], ["two"]) == b"two"
        assert wait_connections(admin, 1) == 1
    finally:
        await conn.close()


async def test_close_in_flight_does_not_hang(
    redis_process: RedisProcess,
) -> None:
    conn = ScriptConnection.for_url(redis_process.url, timeout=SHORT_TIMEOUT)
    assert conn is not None
    await conn.run(ECHO, [], ["warm"])

    calls = asyncio.gather(
        *(conn.run(SPIN_ECHO, [], [f"call{i}", 20000]) for i in range(50)),
        return_exceptions=True,
    )
    await flushed()
    async with asyncio.timeout(1):
        await conn.close()
    async with asyncio.timeout(SHORT_TIMEOUT * 3):
        results = await calls
    for i, result in enumerate(results):
        if isinstance(result, BaseException):
            assert isinstance(result, redis.exceptions.ConnectionError)
        else:
            assert result == f"call{i}".encode()

    # With Redis frozen, close() returns at once and the calls end within
    # their timeout.
    await conn.run(ECHO, [], ["warm"])
    redis_process.freeze()
    try:
        calls = asyncio.gather(
            *(conn.run(ECHO, [], [f"call{i}"]) for i in range(10)),
            return_exceptions=True,
        )
        await asyncio.sleep(0.01)
        async with asyncio.timeout(0.5):
            await conn.close()
        async with asyncio.timeout(SHORT_TIMEOUT * 2 + 0.5):
            results = await calls
        for result in results:
            assert isinstance(result, redis.exceptions.RedisError)
    finally:
        redis_process.thaw()
    try:
        assert await conn.run(ECHO, [], ["thawed"]) == b"thawed"
    finally:
        await conn.close()


async def test_close_during_connect_no_cancellation(
    redis_process: RedisProcess,
) -> None:
    conn = ScriptConnection.for_url(redis_process.url)
    assert conn is not None
    calls = [asyncio.create_task(conn.run(ECHO, [], [f"call{i}"])) for i in range(5)]
    await asyncio.sleep(0)
    await conn.close()
    results = await asyncio.gather(*calls, return_exceptions=True)
    await conn.close()

    for i, result in enumerate(results):
        assert not isinstance(result, asyncio.CancelledError)
        if isinstance(result, BaseException):
            assert isinstance(result, redis.exceptions.ConnectionError)
        else:
            assert result == f"call{i}".encode()


async def test_close_in_flight_leaks_no_connection(
    redis_process: RedisProcess,
    admin: redis.Redis,
) -> None:
    conn = ScriptConnection.for_url(redis_process.url)
    assert conn is not None
    await conn.run(ECHO, [], ["warm"])
    calls = asyncio.gather(
        *(conn.run(SPIN_ECHO, [], [f"call{i}", 20000]) for i in range(20)),
        return_exceptions=True,
    )
    await flushed()
    await conn.close()
    await calls
    try:
        assert wait_connections(admin, 0) == 0
    finally:
        await conn.close()


async def test_store_close_then_reuse(redis_process: RedisProcess, prefix: str) -> None:
    plain = redis_py_store(redis_process.url, prefix)
    user, session = await add_session(plain, "leo")
    await plain.close()
    store = pipelined_store(redis_process.url, prefix)
    try:
        assert await store.validate_session(user.user_id, session.session_id, LIMITS)
        await store.close()
        assert await store.validate_session(user.user_id, session.session_id, LIMITS)
    finally:
        await store.close()


async def test_bad_argument_keeps_replies_in_step(redis_url: str) -> None:
    conn = ScriptConnection.for_url(redis_url)
    assert conn is not None
    try:
        assert await conn.run(ECHO, [], ["before"]) == b"before"
        with pytest.raises(TypeError):
            await conn.run(ECHO, [], [object()])
        replies = await asyncio.gather(
            *(conn.run(ECHO, [], [f"call{i}"]) for i in range(10))
        )
        assert replies == [f"call{i}".encode() for i in range(10)]
    finally:
        await conn.close()
