"""Redis-specific behaviour of the store: batched validations and script reloads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from authgrpc.redis_store import RedisStore
from authgrpc.store import NewSession, SessionLimits

LIMITS = SessionLimits(idle_ms=60_000, absolute_ms=120_000)


@pytest.fixture
async def store(redis_url: str, prefix: str) -> AsyncIterator[RedisStore]:
    subject = RedisStore.from_url(redis_url, prefix=prefix)
    yield subject
    async for key in subject.client.scan_iter(match=f"{prefix}:*"):
        await subject.client.delete(key)
    await subject.close()


async def test_concurrent_validations_keep_results(store: RedisStore) -> None:
    users = [await store.create_user(f"user{i}", "hash", ()) for i in range(20)]
    sessions = [
        await store.create_session(u, NewSession(b"r" * 16, b"k" * 16), LIMITS)
        for u in users
    ]
    ended = {s.session_id for s in sessions[::2]}
    for session in sessions[::2]:
        await store.end_session(session.user_id, session.session_id)

    results = await asyncio.gather(
        *(store.validate_session(s.user_id, s.session_id, LIMITS) for s in sessions * 3)
    )

    names = {user.user_id: user.username for user in users}
    for session, result in zip(sessions * 3, results, strict=True):
        if session.session_id in ended:
            assert result is None
        else:
            assert result is not None
            assert result.session_id == session.session_id
            assert result.username == names[session.user_id]


async def test_batch_survives_script_flush(store: RedisStore) -> None:
    user = await store.create_user("alice", "hash", ())
    session = await store.create_session(user, NewSession(b"r" * 16, b"k" * 16), LIMITS)

    await store.client.script_flush()
    results = await asyncio.gather(
        *(
            store.validate_session(user.user_id, session.session_id, LIMITS)
            for _ in range(10)
        )
    )

    assert all(result is not None for result in results)


async def test_close_closes_every_connection(redis_url: str, prefix: str) -> None:
    observer = RedisStore.from_url(redis_url, prefix=prefix)
    # A client name is a URL option, so this store runs every command,
    # session checks included, on redis-py's pool.
    named = f"{redis_url}?client_name={prefix}-closing"
    subject = RedisStore.from_url(named, prefix=prefix)
    user = await subject.create_user("closing", "hash", ())
    await asyncio.gather(*(subject.get_user(user.user_id) for _ in range(8)))

    async def named_connections() -> int:
        listing = await observer.client.client_list()
        return sum(1 for client in listing if client["name"] == f"{prefix}-closing")

    assert await named_connections() > 0
    await subject.close()
    for _ in range(100):
        if await named_connections() == 0:
            break
        await asyncio.sleep(0.02)
    assert await named_connections() == 0
    await observer.client.delete(*await observer.client.keys(f"{prefix}:*"))
    await observer.close()
