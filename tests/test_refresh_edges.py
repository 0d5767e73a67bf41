"""Edges of refresh rotation, session ids, session peers and `user unlock`.

Each sequence runs on the in-memory store and on real Redis, and both must
give the same results. Grace-window boundaries on Redis run COMMIT_REFRESH
itself with its clock pinned, since the server's TIME cannot be set.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import argon2
import grpc
import pytest
import redis

from authgrpc import redis_store, refresh
from authgrpc import store as store_module
from authgrpc.authenticator import peer_throttle_key, username_throttle_key
from authgrpc.config import Settings
from authgrpc.errors import StoreUnavailable, error_info
from authgrpc.keys import KeySet
from authgrpc.passwords import PasswordHasher
from authgrpc.redis_store import (
    _NOW,
    COMMIT_REFRESH,
    KeyLayout,
    RedisStore,
    SyncSessionChecker,
    connect,
)
from authgrpc.server import AuthServer, start_server
from authgrpc.store import (
    PREVIOUS_HASH_BYTES,
    MemoryStore,
    NewSession,
    RefreshOutcome,
    SessionLimits,
    SessionRecord,
    SessionStore,
    ThrottlePolicy,
    wall_clock_ms,
)
from authgrpc.v1 import auth_pb2, auth_pb2_grpc

LIMITS = SessionLimits(idle_ms=60_000, absolute_ms=120_000)
ROTATION_KEY = b"k" * 16
PASSWORD = "correct horse battery"
FAST_HASHER = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
AUTHGRPC = str(Path(sys.executable).parent / "authgrpc")
LOCKING = ThrottlePolicy(max_failures=2)

ROTATED, REPLAYED = RefreshOutcome.ROTATED, RefreshOutcome.REPLAYED
REUSED, INVALID = RefreshOutcome.REUSED, RefreshOutcome.INVALID

# COMMIT_REFRESH without the line that reads the clock from TIME.
_COMMIT_BODY = COMMIT_REFRESH.removeprefix(_NOW)


def stored_hash(secret: bytes) -> bytes:
    return refresh.RefreshToken("u", "s", secret).stored_hash


class Chain:
    """The secrets a session's refresh token goes through, and their hashes."""

    def __init__(self, rotation_key: bytes):
        self.rotation_key = rotation_key
        self.secrets = [os.urandom(32)]

    def __getitem__(self, index: int) -> bytes:
        while len(self.secrets) <= index:
            token = refresh.RefreshToken("u", "s", self.secrets[-1])
            self.secrets.append(token.next(self.rotation_key).secret)
        return self.secrets[index]

    def presented(self, index: int) -> tuple[bytes, bytes]:
        """Return the stored hash of token ``index`` and of the token after it."""
        return stored_hash(self[index]), stored_hash(self[index + 1])


class ManualClock:
    def __init__(self) -> None:
        self.now = wall_clock_ms()

    def __call__(self) -> int:
        return self.now


@dataclass
class Subject:
    store: SessionStore
    kind: str
    clock: ManualClock | None = None

    async def sleep(self, milliseconds: int) -> None:
        if self.clock is not None:
            self.clock.now += milliseconds
        else:
            await asyncio.sleep(milliseconds / 1000)

    async def commit_at(
        self,
        now: int,
        session: SessionRecord,
        presented: bytes,
        new: bytes,
        grace_ms: int,
    ) -> RefreshOutcome:
        """Commit a refresh as if the store's clock read ``now``."""
        if self.clock is not None:
            self.clock.now = now
            outcome, _ = await self.store.commit_refresh(
                session.user_id, session.session_id, presented, new, grace_ms, LIMITS
            )
            return outcome
        assert isinstance(self.store, RedisStore)
        assert _COMMIT_BODY != COMMIT_REFRESH, (
            "COMMIT_REFRESH no longer starts with _NOW"
        )
        keys = self.store.keys
        user_id, session_id = session.user_id, session.session_id
        result = await self.store.client.eval(
            f"local now = {now}\n{_COMMIT_BODY}",
            2,
            keys.session(user_id, session_id),
            keys.user(user_id),
            presented,
            new,
            grace_ms,
            LIMITS.idle_ms,
            keys.channel,
            user_id,
            session_id,
            presented[:PREVIOUS_HASH_BYTES],
        )
        return RefreshOutcome(result[0].decode())


async def wipe(store: RedisStore, prefix: str) -> None:
    async for key in store.client.scan_iter(match=f"{prefix}:*"):
        await store.client.delete(key)


@pytest.fixture(params=["memory", "redis"])
async def subject(
    request: pytest.FixtureRequest, prefix: str
) -> AsyncIterator[Subject]:
    if request.param == "memory":
        clock = ManualClock()
        yield Subject(MemoryStore(clock=clock), "memory", clock)
        return
    store = RedisStore.from_url(request.getfixturevalue("redis_url"), prefix=prefix)
    yield Subject(store, "redis")
    await wipe(store, prefix)
    await store.close()


async def start_chain(
    store: SessionStore, peer: str = "127.0.0.1", agent: str = "test-agent"
) -> tuple[SessionRecord, Chain]:
    user = await store.create_user("alice", "hash", ())
    chain = Chain(ROTATION_KEY)
    new = NewSession(stored_hash(chain[0]), ROTATION_KEY, peer, agent)
    session = await store.create_session(user, new, LIMITS)
    state = await store.get_refresh_state(user.user_id, session.session_id)
    assert state is not None
    # Redis keeps one rotation key per user, not the one the login passed.
    chain.rotation_key = state.rotation_key
    return session, chain


async def commit(
    store: SessionStore,
    session: SessionRecord,
    presented: tuple[bytes, bytes],
    grace_ms: int,
) -> RefreshOutcome:
    outcome, _ = await store.commit_refresh(
        session.user_id, session.session_id, *presented, grace_ms, LIMITS
    )
    return outcome


# Rotation and grace on the store API.


async def test_rotation_chain_outcomes(subject: Subject) -> None:
    store = subject.store
    session, chain = await start_chain(store)
    grace = 200

    outcomes = [
        await commit(store, session, chain.presented(0), grace),  # A -> B
        await commit(store, session, chain.presented(0), grace),  # A again
        await commit(store, session, chain.presented(1), grace),  # B -> C
        await commit(store, session, chain.presented(0), grace),  # A, two back
        await commit(store, session, chain.presented(1), grace),  # B again
        await commit(store, session, (stored_hash(os.urandom(32)),) * 2, grace),
        await commit(store, session, chain.presented(3), grace),  # D, not yet
    ]
    await subject.sleep(grace + 50)
    after_grace = await commit(store, session, chain.presented(1), grace)
    ended = await commit(store, session, chain.presented(2), grace)

    assert outcomes == [ROTATED, REPLAYED, ROTATED, INVALID, REPLAYED, INVALID, INVALID]
    assert after_grace is REUSED
    assert ended is RefreshOutcome.ENDED
    live = await store.validate_session(session.user_id, session.session_id, LIMITS)
    assert live is None


async def test_state_after_rotation_is_exact(subject: Subject) -> None:
    store = subject.store
    session, chain = await start_chain(store)

    outcome, rotated = await store.commit_refresh(
        session.user_id, session.session_id, *chain.presented(0), 10_000, LIMITS
    )
    state = await store.get_refresh_state(session.user_id, session.session_id)

    assert outcome is ROTATED
    assert rotated is not None
    assert state is not None
    assert state.current_hash == stored_hash(chain[1])
    assert state.previous_hash == stored_hash(chain[0])[:PREVIOUS_HASH_BYTES]
    # The script's own clock reading comes back as last_seen.
    assert state.grace_until_ms == rotated.last_seen_ms + 10_000


async def test_grace_boundary_ignores_replays(subject: Subject) -> None:
    session, chain = await start_chain(subject.store)
    rotation_ms = session.created_ms + 1_000
    first = chain.presented(0)

    outcomes = [
        await subject.commit_at(rotation_ms, session, *first, 500),
        await subject.commit_at(rotation_ms, session, *first, 500),
        await subject.commit_at(rotation_ms + 499, session, *first, 500),
        await subject.commit_at(rotation_ms + 500, session, *first, 500),
    ]

    assert outcomes == [ROTATED, REPLAYED, REPLAYED, REUSED]


async def test_zero_grace_replay_is_reuse(subject: Subject) -> None:
    session, chain = await start_chain(subject.store)
    rotation_ms = session.created_ms + 1_000
    first = chain.presented(0)

    rotated = await subject.commit_at(rotation_ms, session, *first, 0)
    replayed = await subject.commit_at(rotation_ms, session, *first, 0)

    assert (rotated, replayed) == (ROTATED, REUSED)


async def test_clock_step_back_same_window(subject: Subject) -> None:
    # A clock that reads before the session's creation makes Redis store a
    # negative grace offset. Both stores still end the window at rotation
    # time plus grace.
    store = subject.store
    session, chain = await start_chain(store)
    rotation_ms = session.created_ms - 5_000
    first = chain.presented(0)

    rotated = await subject.commit_at(rotation_ms, session, *first, 500)
    state = await store.get_refresh_state(session.user_id, session.session_id)
    inside = await subject.commit_at(rotation_ms + 499, session, *first, 500)
    outside = await subject.commit_at(rotation_ms + 500, session, *first, 500)

    assert rotated is ROTATED
    assert state is not None
    assert state.grace_until_ms == rotation_ms + 500
    assert (inside, outside) == (REPLAYED, REUSED)


async def test_previous_token_wrong_successor_reuse(
    subject: Subject,
) -> None:
    store = subject.store
    session, chain = await start_chain(store)
    await commit(store, session, chain.presented(0), 10_000)

    outcome = await commit(store, session, (stored_hash(chain[0]), b"x" * 12), 10_000)

    assert outcome is REUSED
    assert await store.get_refresh_state(session.user_id, session.session_id) is None


async def test_invalid_refresh_changes_nothing(subject: Subject) -> None:
    store = subject.store
    session, chain = await start_chain(store)
    await commit(store, session, chain.presented(0), 10_000)
    before = await store.get_refresh_state(session.user_id, session.session_id)
    seen = (await store.list_sessions(session.user_id))[0].last_seen_ms
    await subject.sleep(20)

    outcomes = [
        await commit(store, session, (stored_hash(os.urandom(32)), b"y" * 12), 1)
        for _ in range(3)
    ]

    assert outcomes == [INVALID] * 3
    assert await store.get_refresh_state(session.user_id, session.session_id) == before
    assert (await store.list_sessions(session.user_id))[0].last_seen_ms == seen


async def test_concurrent_rotations_one_token(subject: Subject) -> None:
    store = subject.store
    session, chain = await start_chain(store)

    results = await asyncio.gather(
        *(
            store.commit_refresh(
                session.user_id, session.session_id, *chain.presented(0), 10_000, LIMITS
            )
            for _ in range(20)
        )
    )

    outcomes = sorted(outcome.value for outcome, _ in results)
    assert outcomes == ["replayed"] * 19 + ["rotated"]
    state = await store.get_refresh_state(session.user_id, session.session_id)
    assert state is not None
    assert state.current_hash == stored_hash(chain[1])


async def test_reuse_publishes_session_end(redis_url: str, prefix: str) -> None:
    ended: list[tuple[str, str]] = []
    memory = MemoryStore(on_session_end=lambda *ids: ended.append(ids))
    redis_subject = RedisStore.from_url(redis_url, prefix=prefix)
    listener = redis_subject.client.pubsub()
    await listener.subscribe(redis_subject.keys.channel)
    try:
        assert (await listener.get_message(timeout=2))["type"] == "subscribe"
        for store in (memory, redis_subject):
            session, chain = await start_chain(store)
            await commit(store, session, chain.presented(0), 0)
            await commit(store, session, (b"z" * 12, b"y" * 12), 0)
            await commit(store, session, chain.presented(0), 0)
            ended.append((session.user_id, session.session_id))
        message = await listener.get_message(ignore_subscribe_messages=True, timeout=2)
        extra = await listener.get_message(ignore_subscribe_messages=True, timeout=0.2)
    finally:
        await listener.aclose()
        await wipe(redis_subject, prefix)
        await redis_subject.close()

    # The memory store's listener ran once, before the line this test added.
    assert ended[0] == ended[1]
    assert message is not None
    assert extra is None
    assert message["data"].decode() == " ".join(ended[2])


# Session ids.


@pytest.fixture
def scripted_ids(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[str]], None]:
    def script(ids: list[str]) -> None:
        source = iter(ids)

        def next_id() -> str:
            try:
                return next(source)
            except StopIteration:
                raise AssertionError("the store asked for too many ids") from None

        monkeypatch.setattr(store_module, "new_session_id", next_id)
        monkeypatch.setattr(redis_store, "new_session_id", next_id)

    return script


async def test_clashing_session_id_is_replaced(
    subject: Subject, scripted_ids: Callable[[list[str]], None]
) -> None:
    store = subject.store
    user = await store.create_user("alice", "hash", ())
    other = await store.create_user("bob", "hash", ())
    scripted_ids(["AAAAAAAAAAA", "AAAAAAAAAAA", "BBBBBBBBBBB", "AAAAAAAAAAA"])

    first = await store.create_session(user, NewSession(b"1" * 12, b"k" * 16), LIMITS)
    second = await store.create_session(user, NewSession(b"2" * 12, b"k" * 16), LIMITS)
    # Another user's sessions may share an id: ids name a session per user.
    bobs = await store.create_session(other, NewSession(b"3" * 12, b"k" * 16), LIMITS)

    assert (first.session_id, second.session_id) == ("AAAAAAAAAAA", "BBBBBBBBBBB")
    assert bobs.session_id == "AAAAAAAAAAA"
    first_state = await store.get_refresh_state(user.user_id, "AAAAAAAAAAA")
    assert first_state is not None
    assert first_state.current_hash == b"1" * 12
    listed = [s.session_id for s in await store.list_sessions(user.user_id)]
    assert sorted(listed) == ["AAAAAAAAAAA", "BBBBBBBBBBB"]


async def test_ended_session_id_may_come_back(
    subject: Subject, scripted_ids: Callable[[list[str]], None]
) -> None:
    store = subject.store
    user = await store.create_user("alice", "hash", ())
    scripted_ids(["AAAAAAAAAAA", "AAAAAAAAAAA"])

    first = await store.create_session(user, NewSession(b"1" * 12, b"k" * 16), LIMITS)
    await store.end_session(user.user_id, first.session_id)
    again = await store.create_session(user, NewSession(b"2" * 12, b"k" * 16), LIMITS)

    assert again.session_id == first.session_id
    state = await store.get_refresh_state(user.user_id, again.session_id)
    assert state is not None
    assert state.current_hash == b"2" * 12


async def test_every_id_clashing_fails_alike(
    scripted_ids: Callable[[list[str]], None], redis_url: str, prefix: str
) -> None:
    results = []
    redis_subject = RedisStore.from_url(redis_url, prefix=prefix)
    try:
        for store in (redis_subject, MemoryStore()):
            user = await store.create_user("alice", "hash", ())
            scripted_ids(["AAAAAAAAAAA"] * 20)
            await store.create_session(user, NewSession(b"1" * 12, b"k" * 16), LIMITS)
            try:
                await store.create_session(
                    user, NewSession(b"2" * 12, b"k" * 16), LIMITS
                )
                results.append("created")
            except StoreUnavailable:
                results.append("unavailable")
            except AssertionError:
                results.append("kept drawing ids")
    finally:
        await wipe(redis_subject, prefix)
        await redis_subject.close()

    assert results == ["unavailable", "unavailable"]


# Peer and user agent.


async def test_redis_paths_report_peer_agent(redis_url: str, prefix: str) -> None:
    pipelined = RedisStore.from_url(redis_url, prefix=prefix)
    plain = RedisStore(connect(redis_url), KeyLayout(prefix))
    checker = SyncSessionChecker(redis.Redis.from_url(redis_url), KeyLayout(prefix))
    try:
        user = await pipelined.create_user("alice", "hash", ())
        sessions = [
            await pipelined.create_session(
                user, NewSession(b"1" * 12, b"k" * 16, peer, agent), LIMITS
            )
            for peer, agent in (("::1", "agent/1.0 (é)"), ("", ""))
        ]
        for session in sessions:
            args = (user.user_id, session.session_id)
            seen = [
                await pipelined.validate_session(*args, LIMITS),
                await plain.validate_session(*args, LIMITS),
                await asyncio.to_thread(checker.validate_session, *args, LIMITS),
            ]
            for validated in seen:
                assert validated is not None
                assert (validated.peer, validated.user_agent) == (
                    session.peer,
                    session.user_agent,
                )
        _, rotated = await pipelined.commit_refresh(
            user.user_id, sessions[0].session_id, b"1" * 12, b"2" * 12, 10_000, LIMITS
        )
        outcome, again = await plain.commit_refresh(
            user.user_id, sessions[0].session_id, b"1" * 12, b"2" * 12, 10_000, LIMITS
        )
        assert outcome is REPLAYED
        for record in (rotated, again):
            assert record is not None
            assert (record.peer, record.user_agent) == ("::1", "agent/1.0 (é)")
    finally:
        checker.close()
        await wipe(pipelined, prefix)
        await plain.close()
        await pipelined.close()


async def test_long_peer_agent_agree(redis_url: str, prefix: str) -> None:
    peer, agent = "p" * 100, "é" * 40
    reports = []
    redis_subject = RedisStore.from_url(redis_url, prefix=prefix)
    try:
        for store in (redis_subject, MemoryStore()):
            user = await store.create_user("alice", "hash", ())
            new = NewSession(b"1" * 12, b"k" * 16, peer, agent)
            created = await store.create_session(user, new, LIMITS)
            args = (user.user_id, created.session_id)
            validated = await store.validate_session(*args, LIMITS)
            assert validated is not None
            reports.append([(r.peer, r.user_agent) for r in (created, validated)])
    finally:
        await wipe(redis_subject, prefix)
        await redis_subject.close()

    assert reports[0] == [("p" * 64, "é" * 32)] * 2
    assert reports[1] == reports[0]


# The gRPC surface.


@dataclass
class Harness:
    server: AuthServer
    stub: Any
    channel: grpc.aio.Channel
    store: SessionStore

    async def login(self, password: str = PASSWORD) -> Any:
        return await self.stub.Login(
            auth_pb2.LoginRequest(username="alice", password=password), timeout=10
        )

    async def refresh(self, token: str) -> Any:
        return await self.stub.Refresh(
            auth_pb2.RefreshRequest(refresh_token=token), timeout=10
        )

    async def validate(self, token: str) -> Any:
        return await self.stub.ValidateSession(
            auth_pb2.ValidateSessionRequest(access_token=token), timeout=10
        )


async def start_harness(
    kind: str,
    redis_url: str,
    prefix: str,
    keys: KeySet,
    listen: str = "127.0.0.1:0",
    **overrides: Any,
) -> Harness:
    if kind == "memory":
        store: SessionStore = MemoryStore()
    else:
        store = RedisStore.from_url(redis_url, prefix=prefix)
        overrides |= {"redis_url": redis_url, "redis_prefix": prefix}
    settings = Settings(listen=listen, dev=True, grace_period=1, **overrides)
    hasher = PasswordHasher(FAST_HASHER)
    server = await start_server(settings, store=store, keys=keys, hasher=hasher)
    await store.create_user("alice", hasher.hash_sync(PASSWORD), ())
    options = [("grpc.primary_user_agent", "edge-test/1.0")]
    channel = grpc.aio.insecure_channel(server.address, options=options)
    return Harness(server, auth_pb2_grpc.AuthServiceStub(channel), channel, store)


async def stop_harness(harness: Harness, prefix: str) -> None:
    await harness.channel.close()
    await harness.server.stop(0)
    if isinstance(harness.store, RedisStore):
        await wipe(harness.store, prefix)
    await harness.store.close()


@pytest.fixture(params=["memory", "redis"])
async def harness(
    request: pytest.FixtureRequest, redis_url: str, prefix: str, keys: KeySet
) -> AsyncIterator[Harness]:
    running = await start_harness(
        request.param, redis_url, prefix, keys, refresh_grace=0.8
    )
    yield running
    await stop_harness(running, prefix)


async def failure(call: Awaitable[Any]) -> tuple[str, str | None]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    info = error_info(caught.value)
    return caught.value.code().name, info.reason if info else None


async def test_grpc_refresh_sequence(harness: Harness) -> None:
    login = await harness.login()
    token_a = login.refresh_token

    burst = await asyncio.gather(*(harness.refresh(token_a) for _ in range(10)))
    token_b = burst[0].refresh_token
    token_c = (await harness.refresh(token_b)).refresh_token
    two_back = await failure(harness.refresh(token_a))
    b_again = await harness.refresh(token_b)
    await asyncio.sleep(0.85)
    reused = await failure(harness.refresh(token_b))
    after = await failure(harness.refresh(token_c))
    access = await failure(harness.validate(burst[3].access_token))

    assert {response.refresh_token for response in burst} == {token_b}
    assert b_again.refresh_token == token_c
    assert two_back == ("UNAUTHENTICATED", "REFRESH_TOKEN_INVALID")
    assert reused == ("UNAUTHENTICATED", "REFRESH_TOKEN_REUSED")
    assert after == ("UNAUTHENTICATED", "SESSION_ENDED")
    assert access == ("UNAUTHENTICATED", "SESSION_ENDED")
    # The token two rotations back was rejected without ending the session,
    # since b_again still succeeded. Every reply of the burst names it.
    for response in burst:
        assert response.session.session_id == login.session.session_id


async def test_grpc_refresh_rejections_are_precise(harness: Harness) -> None:
    login = await harness.login()
    prefix, user_id, session_id, secret = login.refresh_token.split(".")
    other_secret = refresh.RefreshToken(user_id, session_id, os.urandom(32)).encode()

    def token(*parts: str) -> str:
        return ".".join(parts)

    cases = {
        "": "REFRESH_TOKEN_INVALID",
        "x" * 300: "REFRESH_TOKEN_INVALID",
        login.refresh_token + "é": "REFRESH_TOKEN_INVALID",
        login.refresh_token[:-1] + "B": "REFRESH_TOKEN_INVALID",  # unused bits
        other_secret: "REFRESH_TOKEN_INVALID",
        token(prefix, user_id, "AAAAAAAAAAA", secret): "SESSION_ENDED",
        token(prefix, "A" * 16, session_id, secret): "SESSION_ENDED",
        token(prefix, user_id, "k", secret): "SESSION_ENDED",
        token(prefix, user_id, "n", secret): "SESSION_ENDED",
        token(prefix, "U" * 64, "S" * 64, secret): "SESSION_ENDED",
    }
    seen = {text: await failure(harness.refresh(text)) for text in cases}

    assert seen == {text: ("UNAUTHENTICATED", reason) for text, reason in cases.items()}
    still = await harness.refresh(login.refresh_token)
    assert still.session.session_id == login.session.session_id


async def test_grpc_responses_report_peer_agent(
    harness: Harness,
) -> None:
    login = await harness.login()

    validated = await harness.validate(login.access_token)
    refreshed = await harness.refresh(login.refresh_token)
    replayed = await harness.refresh(login.refresh_token)

    assert login.session.peer == "127.0.0.1"
    assert login.session.user_agent.startswith("edge-test/1.0")
    for response in (validated, refreshed, replayed):
        assert response.session.peer == login.session.peer
        assert response.session.user_agent == login.session.user_agent


async def test_grpc_long_forwarded_peer_agrees(
    redis_url: str, prefix: str, keys: KeySet
) -> None:
    forwarded = [("x-forwarded-for", "fe80::1%" + "z" * 80)]
    peers = []
    for kind in ("redis", "memory"):
        running = await start_harness(
            kind, redis_url, prefix, keys, trusted_proxies=("127.0.0.1/32",)
        )
        try:
            login = await running.stub.Login(
                auth_pb2.LoginRequest(username="alice", password=PASSWORD),
                metadata=forwarded,
                timeout=10,
            )
            validated = await running.validate(login.access_token)
            refreshed = await running.refresh(login.refresh_token)
            peers.append(
                (login.session.peer, validated.session.peer, refreshed.session.peer)
            )
        finally:
            await stop_harness(running, prefix)

    assert len(peers[0][0]) == 64
    assert peers[1] == peers[0]


# user unlock.


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


class Throttles:
    """The throttle keys under a test's prefix, read with a client of its own."""

    def __init__(self, redis_url: str, prefix: str):
        self.client = redis.Redis.from_url(redis_url)
        self.prefix = prefix
        self.layout = KeyLayout(prefix)

    def present(self) -> set[str]:
        pattern = f"{self.prefix}:{{t:*"
        return {name.decode() for name in self.client.scan_iter(match=pattern)}

    def key(self, key: str) -> str:
        return self.layout.throttle(key)


@pytest.fixture
def throttles(redis_url: str, prefix: str) -> Iterator[Throttles]:
    subject = Throttles(redis_url, prefix)
    yield subject
    for name in subject.client.scan_iter(match=f"{prefix}:*"):
        subject.client.delete(name)
    subject.client.close()


async def unlock(redis_url: str, prefix: str, *args: str) -> tuple[int, str, str]:
    environment = {
        **os.environ,
        "AUTHGRPC_REDIS_URL": redis_url,
        "AUTHGRPC_REDIS_PREFIX": prefix,
    }
    process = await asyncio.create_subprocess_exec(
        AUTHGRPC,
        "user",
        "unlock",
        *args,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def lock(store: RedisStore, *keys: str) -> None:
    for key in keys:
        for _ in range(LOCKING.max_failures + 1):
            await store.throttle_acquire(key, LOCKING)
        assert not (await store.throttle_acquire(key, LOCKING)).allowed


async def test_unlock_clears_named_counters_only(
    redis_url: str, prefix: str, throttles: Throttles
) -> None:
    odd = "{x}ärger}"
    store = RedisStore.from_url(redis_url, prefix=prefix)
    names = ["alice", "bob", odd, "fi"]
    peers = ["::1", "127.0.0.1"]
    try:
        await lock(
            store,
            *map(username_throttle_key, names),
            *map(peer_throttle_key, peers),
        )
        by_name = await unlock(redis_url, prefix, " ALICE ", "--peer", "::1")
        odd_name = await unlock(redis_url, prefix, "{X}ÄRGER}")
        ligature = await unlock(redis_url, prefix, "ﬁ")
    finally:
        await store.close()

    assert by_name[0] == odd_name[0] == ligature[0] == 0
    assert "username alice" in by_name[1]
    assert "peer ::1" in by_name[1]
    assert f"username {odd}" in odd_name[1]
    assert throttles.present() == {
        throttles.key(username_throttle_key("bob")),
        throttles.key(peer_throttle_key("127.0.0.1")),
    }


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback address")
async def test_unlock_logged_ipv6_peer(
    redis_url: str,
    prefix: str,
    keys: KeySet,
    caplog: pytest.LogCaptureFixture,
    throttles: Throttles,
) -> None:
    running = await start_harness(
        "redis", redis_url, prefix, keys, listen="[::1]:0", throttle=LOCKING
    )
    try:
        for _ in range(LOCKING.max_failures):
            await failure(running.login("a wrong passphrase"))
        by_name = await failure(running.login())
        cleared_name = await unlock(redis_url, prefix, "alice")
        with caplog.at_level("WARNING", logger="authgrpc.service"):
            by_peer = await failure(running.login())
        logged = [m for m in caplog.messages if "throttled by peer" in m]
        cleared_peer = await unlock(redis_url, prefix, "--peer", "::1")
        unlocked = await running.login()
    finally:
        await stop_harness(running, prefix)

    assert by_name == by_peer == ("RESOURCE_EXHAUSTED", "LOGIN_THROTTLED")
    assert len(logged) == 1
    assert "peer=::1 " in logged[0]
    assert cleared_name[0] == cleared_peer[0] == 0
    assert unlocked.session.peer == "::1"


@pytest.mark.parametrize("spelling", ["[::1]", "0:0:0:0:0:0:0:1"])
async def test_unlock_other_ipv6_spelling(
    spelling: str, redis_url: str, prefix: str, throttles: Throttles
) -> None:
    store = RedisStore.from_url(redis_url, prefix=prefix)
    try:
        await lock(store, peer_throttle_key("::1"))
        code, _, _ = await unlock(redis_url, prefix, "--peer", spelling)
        still_locked = not (
            await store.throttle_acquire(peer_throttle_key("::1"), LOCKING)
        ).allowed
    finally:
        await store.close()

    # Either the lockout is gone, or the command reported that it did nothing.
    assert code != 0 or not still_locked
