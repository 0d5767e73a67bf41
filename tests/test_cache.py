"""The validation cache and its invalidation channel, against real redis-server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis

from authgrpc.cache import InvalidationListener, ValidationCache
from authgrpc.store import SessionRecord, wall_clock_ms

CHANNEL = "authgrpc:ended"


def record(
    user_id: str = "u1", session_id: str = "s1", lifetime_ms: int = 60_000
) -> SessionRecord:
    now = wall_clock_ms()
    return SessionRecord(
        session_id, user_id, "alice", (), now, now + lifetime_ms, now + lifetime_ms, now
    )


def wait_until(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def listener_for(port: int, cache: ValidationCache) -> InvalidationListener:
    def factory() -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)

    return InvalidationListener(
        factory, CHANNEL, cache, ping_interval=0.1, ping_timeout=0.5
    ).start()


def test_cache_off_until_subscribed() -> None:
    cache = ValidationCache()

    cache.store(record(), cache.epoch())

    assert cache.enabled is False
    assert cache.lookup("u1", "s1") is None


def test_cache_hit_after_store() -> None:
    cache = ValidationCache()
    cache.clear(enable=True)

    session = record()

    cache.store(session, cache.epoch())

    assert cache.lookup("u1", "s1") == session
    assert cache.lookup("u1", "other") is None


def test_tombstone_blocks_late_store() -> None:
    cache = ValidationCache()
    cache.clear(enable=True)
    epoch = cache.epoch()

    cache.invalidate("u1", "s1")
    cache.store(record(), epoch)

    assert cache.lookup("u1", "s1") is None


def test_clear_voids_inflight_store() -> None:
    cache = ValidationCache()
    cache.clear(enable=True)
    epoch = cache.epoch()

    cache.clear(enable=True)
    cache.store(record(), epoch)

    assert cache.lookup("u1", "s1") is None


def test_entry_rechecked_after_interval() -> None:
    cache = ValidationCache(recheck_after=0.05)
    cache.clear(enable=True)
    cache.store(record(), cache.epoch())

    time.sleep(0.08)

    assert cache.lookup("u1", "s1") is None


def test_entry_dropped_past_idle_expiry() -> None:
    cache = ValidationCache(recheck_after=10)
    cache.clear(enable=True)
    cache.store(record(lifetime_ms=30), cache.epoch())

    time.sleep(0.05)

    assert cache.lookup("u1", "s1") is None


def test_cache_bounded_in_entries() -> None:
    cache = ValidationCache(max_entries=3)
    cache.clear(enable=True)

    for index in range(5):
        cache.store(record(session_id=f"s{index}"), cache.epoch())

    assert len(cache) == 3
    assert cache.lookup("u1", "s0") is None
    assert cache.lookup("u1", "s4") is not None


def test_message_invalidates_entry(redis_process: Any) -> None:
    cache = ValidationCache(recheck_after=10)
    listener = listener_for(redis_process.port, cache)
    try:
        assert listener.wait_connected(5)
        cache.store(record(), cache.epoch())
        assert cache.lookup("u1", "s1") is not None

        redis_process.client().publish(CHANNEL, "u1 s1")

        assert wait_until(lambda: cache.lookup("u1", "s1") is None)
    finally:
        listener.stop()


def test_channel_drop_turns_cache_off(redis_process: Any) -> None:
    cache = ValidationCache(recheck_after=10)
    listener = listener_for(redis_process.port, cache)
    try:
        assert listener.wait_connected(5)
        cache.store(record(), cache.epoch())

        redis_process.stop()

        assert wait_until(lambda: not cache.enabled)
        assert cache.lookup("u1", "s1") is None
        redis_process.start()
        assert wait_until(lambda: cache.enabled, timeout=10)
        assert cache.lookup("u1", "s1") is None
    finally:
        listener.stop()


def test_frozen_channel_turns_cache_off(redis_process: Any) -> None:
    cache = ValidationCache(recheck_after=10)
    listener = listener_for(redis_process.port, cache)
    try:
        assert listener.wait_connected(5)
        cache.store(record(), cache.epoch())

        redis_process.freeze()
        turned_off = wait_until(lambda: not cache.enabled, timeout=3)
        redis_process.thaw()

        assert turned_off
        assert wait_until(lambda: cache.enabled, timeout=10)
    finally:
        redis_process.thaw()
        listener.stop()


async def test_cached_validator_refuses_after_logout(
    redis_url: str, prefix: str
) -> None:
    from authgrpc.errors import Reason, Unauthenticated
    from authgrpc.redis_store import RedisStore
    from authgrpc.store import NewSession, SessionLimits
    from authgrpc.tokens import TokenIssuer
    from authgrpc.validators import AsyncLocalValidator
    from tests.conftest import make_keys

    keys = make_keys()
    store = RedisStore.from_url(redis_url, prefix=prefix)
    limits = SessionLimits(idle_ms=60_000, absolute_ms=120_000)
    user = await store.create_user("alice", "hash", ())
    session = await store.create_session(user, NewSession(b"r" * 16, b"k" * 16), limits)
    issuer = TokenIssuer(
        keys, issuer="authgrpc", audience="authgrpc", lifetime_seconds=60
    )
    token = issuer.issue(user.user_id, session.session_id).token
    validator = AsyncLocalValidator.from_url(
        keys,
        issuer="authgrpc",
        audience="authgrpc",
        redis_url=redis_url,
        prefix=prefix,
        idle_timeout=60,
        touch_interval=30,
        cache=True,
    )
    try:
        assert validator.cache is not None
        assert await _wait_async(
            lambda: validator.cache is not None and validator.cache.enabled
        )
        for _ in range(5):
            await validator.validate(token)
        hits_before_logout = validator.cache.hits

        await store.end_session(user.user_id, session.session_id)
        refused = await _wait_async(
            lambda: validator.cache is not None and len(validator.cache) == 0
        )

        assert hits_before_logout == 4
        assert refused
        try:
            await validator.validate(token)
        except Unauthenticated as error:
            assert error.reason is Reason.SESSION_ENDED
        else:
            raise AssertionError("a logged-out session was accepted")
    finally:
        await validator.close()
        async for key in store.client.scan_iter(match=f"{prefix}:*"):
            await store.client.delete(key)
        await store.close()


async def _wait_async(condition: Any, timeout: float = 5.0) -> bool:
    import asyncio

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.01)
    return False


async def test_lost_message_bounded_by_recheck(redis_url: str, prefix: str) -> None:
    from authgrpc.cache import MAX_STALENESS
    from authgrpc.errors import Reason, Unauthenticated
    from authgrpc.redis_store import RedisStore
    from authgrpc.store import NewSession, SessionLimits
    from authgrpc.tokens import TokenIssuer
    from authgrpc.validators import AsyncLocalValidator
    from tests.conftest import make_keys

    keys = make_keys()
    store = RedisStore.from_url(redis_url, prefix=prefix)
    limits = SessionLimits(idle_ms=60_000, absolute_ms=120_000)
    user = await store.create_user("alice", "hash", ())
    session = await store.create_session(user, NewSession(b"r" * 16, b"k" * 16), limits)
    issuer = TokenIssuer(
        keys, issuer="authgrpc", audience="authgrpc", lifetime_seconds=60
    )
    token = issuer.issue(user.user_id, session.session_id).token
    validator = AsyncLocalValidator.from_url(
        keys,
        issuer="authgrpc",
        audience="authgrpc",
        redis_url=redis_url,
        prefix=prefix,
        idle_timeout=60,
        touch_interval=30,
        cache=True,
    )
    assert validator._listener is not None
    validator._listener._apply = lambda data: None  # type: ignore[method-assign]
    try:
        assert await _wait_async(
            lambda: validator.cache is not None and validator.cache.enabled
        )
        await validator.validate(token)

        await store.end_session(user.user_id, session.session_id)
        await asyncio.sleep(MAX_STALENESS + 0.05)

        with pytest.raises(Unauthenticated) as refused:
            await validator.validate(token)
        assert refused.value.reason is Reason.SESSION_ENDED
    finally:
        await validator.close()
        async for key in store.client.scan_iter(match=f"{prefix}:*"):
            await store.client.delete(key)
        await store.close()
