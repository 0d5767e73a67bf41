"""One behaviour suite that every session store must pass: Redis and in-memory alike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from authgrpc.redis_store import RedisStore
from authgrpc.store import (
    PREVIOUS_HASH_BYTES,
    MemoryStore,
    NewSession,
    RefreshOutcome,
    SessionLimits,
    SessionStore,
    ThrottlePolicy,
    UserChanged,
    UsernameTaken,
    new_session_id,
    new_user_id,
    wall_clock_ms,
)

# Loads the shared redis_cluster and redis_sentinel fixtures.
pytest_plugins = ["tests.topology"]

LIMITS = SessionLimits(idle_ms=60_000, absolute_ms=120_000)


@dataclass
class StoreUnderTest:
    store: SessionStore
    advance: Callable[[int], Awaitable[None]]
    is_redis: bool


class ManualClock:
    def __init__(self) -> None:
        self.now = wall_clock_ms()

    def __call__(self) -> int:
        return self.now


@pytest.fixture(
    params=[
        "memory",
        "redis",
        pytest.param("cluster", marks=pytest.mark.slow),
        pytest.param("sentinel", marks=pytest.mark.slow),
    ]
)
async def subject(
    request: pytest.FixtureRequest, prefix: str
) -> AsyncIterator[StoreUnderTest]:
    if request.param == "memory":
        clock = ManualClock()

        async def advance_clock(milliseconds: int) -> None:
            clock.now += milliseconds

        yield StoreUnderTest(MemoryStore(clock=clock), advance_clock, False)
        return
    # Each topology starts on first use, so a run without slow tests starts none.
    if request.param == "cluster":
        url = request.getfixturevalue("redis_cluster").url
    elif request.param == "sentinel":
        url = request.getfixturevalue("redis_sentinel").url
    else:
        url = request.getfixturevalue("redis_url")
    store = RedisStore.from_url(url, prefix=prefix)

    async def sleep(milliseconds: int) -> None:
        await asyncio.sleep(milliseconds / 1000)

    yield StoreUnderTest(store, sleep, True)
    async for key in store.client.scan_iter(match=f"{prefix}:*"):
        await store.client.delete(key)
    await store.close()


def new_session(tag: bytes = b"1") -> NewSession:
    return NewSession(
        refresh_hash=tag * 16,
        rotation_key=b"k" * 16,
        peer="127.0.0.1",
        user_agent="test-agent",
    )


async def test_create_and_validate_session(subject: StoreUnderTest) -> None:
    user = await subject.store.create_user("alice", "hash", ("admin",))

    session = await subject.store.create_session(user, new_session(), LIMITS)
    validated = await subject.store.validate_session(
        user.user_id, session.session_id, LIMITS
    )

    assert validated is not None
    assert validated.username == "alice"
    assert validated.roles == ("admin",)
    assert validated.absolute_expiry_ms == session.created_ms + LIMITS.absolute_ms
    assert len(session.session_id) >= 11


async def test_session_ids_are_unique(subject: StoreUnderTest) -> None:
    user = await subject.store.create_user("alice", "hash", ())

    ids = {
        (await subject.store.create_session(user, new_session(), LIMITS)).session_id
        for _ in range(20)
    }

    assert len(ids) == 20


async def test_duplicate_username_rejected(subject: StoreUnderTest) -> None:
    await subject.store.create_user("alice", "hash", ())

    with pytest.raises(UsernameTaken):
        await subject.store.create_user("alice", "other", ())


async def test_end_session_is_idempotent(subject: StoreUnderTest) -> None:
    user = await subject.store.create_user("alice", "hash", ())
    session = await subject.store.create_session(user, new_session(), LIMITS)

    first = await subject.store.end_session(user.user_id, session.session_id)
    second = await subject.store.end_session(user.user_id, session.session_id)

    assert first is True
    assert second is False
    assert (
        await subject.store.validate_session(user.user_id, session.session_id, LIMITS)
        is None
    )
    assert await subject.store.list_sessions(user.user_id) == []


async def test_idle_timeout_ends_session(subject: StoreUnderTest) -> None:
    limits = SessionLimits(idle_ms=300, absolute_ms=60_000)
    user = await subject.store.create_user("alice", "hash", ())
    session = await subject.store.create_session(user, new_session(), limits)

    await subject.advance(450)

    assert (
        await subject.store.validate_session(user.user_id, session.session_id, limits)
        is None
    )
    assert await subject.store.list_sessions(user.user_id) == []


async def test_validation_extends_idle_timeout(subject: StoreUnderTest) -> None:
    limits = SessionLimits(idle_ms=400, absolute_ms=60_000)
    user = await subject.store.create_user("alice", "hash", ())
    session = await subject.store.create_session(user, new_session(), limits)

    for _ in range(4):
        await subject.advance(200)
        assert (
            await subject.store.validate_session(
                user.user_id, session.session_id, limits
            )
            is not None
        )

    assert (
        await subject.store.validate_session(user.user_id, session.session_id, limits)
        is not None
    )


async def test_absolute_timeout_is_not_extended(subject: StoreUnderTest) -> None:
    limits = SessionLimits(idle_ms=600, absolute_ms=1500)
    user = await subject.store.create_user("alice", "hash", ())
    session = await subject.store.create_session(user, new_session(), limits)

    for _ in range(3):
        await subject.advance(400)
        validated = await subject.store.validate_session(
            user.user_id, session.session_id, limits
        )
        assert validated is not None
        assert validated.idle_expiry_ms <= session.absolute_expiry_ms
    await subject.advance(450)

    assert (
        await subject.store.validate_session(user.user_id, session.session_id, limits)
        is None
    )


async def test_touch_interval_limits_writes(subject: StoreUnderTest) -> None:
    limits = SessionLimits(
        idle_ms=60_000, absolute_ms=120_000, touch_interval_ms=10_000
    )
    user = await subject.store.create_user("alice", "hash", ())
    session = await subject.store.create_session(user, new_session(), limits)

    await subject.advance(50)
    validated = await subject.store.validate_session(
        user.user_id, session.session_id, limits
    )

    assert validated is not None
    assert validated.last_seen_ms == session.last_seen_ms


async def test_disabled_user_loses_sessions(subject: StoreUnderTest) -> None:
    user = await subject.store.create_user("alice", "hash", ())
    session = await subject.store.create_session(user, new_session(), LIMITS)

    ended = await subject.store.set_disabled(user.user_id, True)

    assert ended == 1
    assert (
        await subject.store.validate_session(user.user_id, session.session_id, LIMITS)
        is None
    )
    with pytest.raises(UserChanged):
        await subject.store.create_session(user, new_session(), LIMITS)


async def test_end_all_keeps_current(subject: StoreUnderTest) -> None:
    user = await subject.store.create_user("alice", "hash", ())
    keep = await subject.store.create_session(user, new_session(), LIMITS)
    others = [
        await subject.store.create_session(user, new_session(), LIMITS)
        for _ in range(3)
    ]

    ended = await subject.store.end_all_sessions(user.user_id, keep.session_id)

    assert ended == 3
    assert (
        await subject.store.validate_session(user.user_id, keep.session_id, LIMITS)
        is not None
    )
    for other in others:
        assert (
            await subject.store.validate_session(user.user_id, other.session_id, LIMITS)
            is None
        )


async def test_end_all_refuses_login_in_progress(subject: StoreUnderTest) -> None:
    user = await subject.store.create_user("alice", "hash", ())
    read_before = await subject.store.get_user(user.user_id)
    assert read_before is not None

    await subject.store.end_all_sessions(user.user_id)

    with pytest.raises(UserChanged):
        await subject.store.create_session(read_before, new_session(), LIMITS)


async def test_session_limit_ends_oldest(subject: StoreUnderTest) -> None:
    limits = SessionLimits(idle_ms=60_000, absolute_ms=120_000, max_per_user=2)
    user = await subject.store.create_user("alice", "hash", ())
    first = await subject.store.create_session(user, new_session(), limits)
    await subject.advance(5)
    second = await subject.store.create_session(user, new_session(), limits)
    await subject.advance(5)

    third = await subject.store.create_session(user, new_session(), limits)

    live = [s.session_id for s in await subject.store.list_sessions(user.user_id)]
    assert live == [second.session_id, third.session_id]
    assert (
        await subject.store.validate_session(user.user_id, first.session_id, limits)
        is None
    )


async def test_list_sessions_has_metadata(subject: StoreUnderTest) -> None:
    user = await subject.store.create_user("alice", "hash", ())
    session = await subject.store.create_session(user, new_session(), LIMITS)

    [listed] = await subject.store.list_sessions(user.user_id)

    assert listed.session_id == session.session_id
    assert listed.peer == "127.0.0.1"
    assert listed.user_agent == "test-agent"


async def test_refresh_rotates_then_detects_reuse(subject: StoreUnderTest) -> None:
    user = await subject.store.create_user("alice", "hash", ())
    session = await subject.store.create_session(user, new_session(b"a"), LIMITS)
    args = (user.user_id, session.session_id)

    rotated, _ = await subject.store.commit_refresh(
        *args, b"a" * 16, b"b" * 16, 0, LIMITS
    )
    reused, after = await subject.store.commit_refresh(
        *args, b"a" * 16, b"c" * 16, 0, LIMITS
    )

    assert rotated is RefreshOutcome.ROTATED
    assert reused is RefreshOutcome.REUSED
    assert after is None
    assert await subject.store.validate_session(*args, LIMITS) is None


async def test_refresh_replay_within_grace(subject: StoreUnderTest) -> None:
    user = await subject.store.create_user("alice", "hash", ())
    session = await subject.store.create_session(user, new_session(b"a"), LIMITS)
    args = (user.user_id, session.session_id)

    await subject.store.commit_refresh(*args, b"a" * 16, b"b" * 16, 10_000, LIMITS)
    replayed, record = await subject.store.commit_refresh(
        *args, b"a" * 16, b"b" * 16, 10_000, LIMITS
    )
    unknown, _ = await subject.store.commit_refresh(
        *args, b"z" * 16, b"y" * 16, 10_000, LIMITS
    )

    assert replayed is RefreshOutcome.REPLAYED
    assert record is not None
    assert unknown is RefreshOutcome.INVALID
    assert await subject.store.validate_session(*args, LIMITS) is not None


async def test_refresh_state_after_rotation(subject: StoreUnderTest) -> None:
    user = await subject.store.create_user("alice", "hash", ())
    session = await subject.store.create_session(user, new_session(b"a"), LIMITS)
    args = (user.user_id, session.session_id)
    before = wall_clock_ms()

    await subject.store.commit_refresh(*args, b"a" * 16, b"b" * 16, 10_000, LIMITS)
    state = await subject.store.get_refresh_state(*args)

    assert state is not None
    assert state.current_hash == b"b" * 16
    assert state.previous_hash == b"a" * PREVIOUS_HASH_BYTES
    assert before + 9_000 <= state.grace_until_ms <= wall_clock_ms() + 11_000


async def test_concurrent_refresh_yields_one_token(subject: StoreUnderTest) -> None:
    user = await subject.store.create_user("alice", "hash", ())
    session = await subject.store.create_session(user, new_session(b"a"), LIMITS)
    args = (user.user_id, session.session_id)

    outcomes = await asyncio.gather(
        *(
            subject.store.commit_refresh(*args, b"a" * 16, b"b" * 16, 10_000, LIMITS)
            for _ in range(10)
        )
    )

    kinds = [outcome for outcome, _ in outcomes]
    assert kinds.count(RefreshOutcome.ROTATED) == 1
    assert kinds.count(RefreshOutcome.REPLAYED) == 9
    state = await subject.store.get_refresh_state(*args)
    assert state is not None
    assert state.current_hash == b"b" * 16


async def test_throttle_locks_after_limit(subject: StoreUnderTest) -> None:
    policy = ThrottlePolicy(
        max_failures=3, window_ms=60_000, lockout_ms=1_000, max_lockout_ms=8_000
    )

    results = [
        await subject.store.throttle_acquire("u:alice", policy) for _ in range(4)
    ]

    assert [r.allowed for r in results] == [True, True, True, False]
    assert 0 < results[3].retry_after_ms <= 1_000


async def test_throttle_parallel_attempts_capped(subject: StoreUnderTest) -> None:
    policy = ThrottlePolicy(
        max_failures=5, window_ms=60_000, lockout_ms=1_000, max_lockout_ms=8_000
    )

    results = await asyncio.gather(
        *(subject.store.throttle_acquire("ip:10.0.0.1", policy) for _ in range(20))
    )

    assert sum(r.allowed for r in results) == 5


async def test_throttle_lockout_doubles(subject: StoreUnderTest) -> None:
    policy = ThrottlePolicy(
        max_failures=1, window_ms=60_000, lockout_ms=200, max_lockout_ms=10_000
    )
    await subject.store.throttle_acquire("u:bob", policy)
    first = await subject.store.throttle_acquire("u:bob", policy)
    await subject.advance(250)
    await subject.store.throttle_acquire("u:bob", policy)

    second = await subject.store.throttle_acquire("u:bob", policy)

    assert first.retry_after_ms == 200
    assert second.retry_after_ms == 400


async def test_throttle_release_returns_attempt(subject: StoreUnderTest) -> None:
    policy = ThrottlePolicy(
        max_failures=2, window_ms=60_000, lockout_ms=1_000, max_lockout_ms=8_000
    )
    for _ in range(5):
        assert (await subject.store.throttle_acquire("ip:1", policy)).allowed
        await subject.store.throttle_release("ip:1")

    assert (await subject.store.throttle_acquire("ip:1", policy)).allowed


async def test_password_hash_replaced_only_if_unchanged(
    subject: StoreUnderTest,
) -> None:
    user = await subject.store.create_user("alice", "old", ())

    replaced = await subject.store.replace_password_hash(user.user_id, "old", "new")
    stale = await subject.store.replace_password_hash(user.user_id, "old", "newer")

    assert replaced is True
    assert stale is False
    fetched = await subject.store.get_user_by_name("alice")
    assert fetched is not None
    assert fetched.password_hash == "new"


async def test_validation_and_refresh_report_peer_and_agent(
    subject: StoreUnderTest,
) -> None:
    user = await subject.store.create_user("alice", "hash", ())
    session = await subject.store.create_session(user, new_session(b"a"), LIMITS)
    args = (user.user_id, session.session_id)

    validated = await subject.store.validate_session(*args, LIMITS)
    _, refreshed = await subject.store.commit_refresh(
        *args, b"a" * 16, b"b" * 16, 10_000, LIMITS
    )

    assert validated is not None and refreshed is not None
    assert (validated.peer, validated.user_agent) == ("127.0.0.1", "test-agent")
    assert (refreshed.peer, refreshed.user_agent) == ("127.0.0.1", "test-agent")


def test_ids_never_start_with_a_dash() -> None:
    ids = [new_session_id() for _ in range(3000)] + [new_user_id() for _ in range(3000)]

    assert not [value for value in ids if value.startswith("-")]
