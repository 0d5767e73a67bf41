"""The session life cycle against a plain Python model, as a hypothesis state machine.

The machine logs in, refreshes with current and stale refresh tokens,
validates, logs out, ends all sessions of a user and moves the clock, all
through :class:`authgrpc.authenticator.Authenticator`. After every step the
store's list of live sessions must equal the model's.

Against MemoryStore the store clock is fake, so idle and absolute expiry and
the refresh grace window are exercised exactly. Access tokens carry a
wall-clock ``exp``, so the access-token lifetime is set far beyond the test's
run time and only session expiry is modeled. Against Redis the clock is the
Redis server's own, so that run leaves the clock alone and checks the
rotation, reuse and logout rules only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import argon2
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from authgrpc.authenticator import Authenticator
from authgrpc.config import Settings
from authgrpc.errors import Reason, Unauthenticated
from authgrpc.passwords import PasswordHasher
from authgrpc.redis_store import RedisStore
from authgrpc.store import MemoryStore, SessionStore, wall_clock_ms
from authgrpc.tokens import TokenIssuer, TokenVerifier
from tests.conftest import make_keys

T = TypeVar("T")

PASSWORD = "correct horse battery"
USERNAMES = ("alice", "bob")
IDLE_MS = 600_000
ABSOLUTE_MS = 3_600_000
TOUCH_MS = 60_000
GRACE_MS = 30_000
# Steps that land just before, on and just after each limit, and a few others.
CLOCK_STEPS_MS = sorted(
    {
        1,
        TOUCH_MS - 1,
        TOUCH_MS,
        GRACE_MS - 1,
        GRACE_MS,
        IDLE_MS - 1,
        IDLE_MS,
        IDLE_MS + 1,
        IDLE_MS // 2,
        ABSOLUTE_MS,
        ABSOLUTE_MS + 1,
    }
)

HASHER = PasswordHasher(
    argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1), workers=1
)
KEYS = make_keys()


def model_settings() -> Settings:
    return Settings(
        dev=True,
        listen="127.0.0.1:0",
        idle_timeout=IDLE_MS / 1000,
        absolute_timeout=ABSOLUTE_MS / 1000,
        touch_interval=TOUCH_MS / 1000,
        refresh_grace=GRACE_MS / 1000,
        # exp is checked against wall time, which this machine does not move.
        access_token_ttl=10**7,
    )


@dataclass
class ModelSession:
    """What the model expects of one session."""

    username: str
    user_id: str
    session_id: str
    absolute_ms: int
    expires_ms: int
    last_seen_ms: int
    access_tokens: list[str]
    refresh_tokens: list[str]
    grace_until_ms: int = 0
    ended: bool = False

    def live(self, now: int) -> bool:
        return not self.ended and self.expires_ms > now

    def touch(self, now: int) -> None:
        self.expires_ms = min(now + IDLE_MS, self.absolute_ms)
        self.last_seen_ms = now


@dataclass
class FakeClock:
    """A millisecond clock that starts at the wall time and moves only in rules."""

    now_ms: int = field(default_factory=wall_clock_ms)

    def __call__(self) -> int:
        return self.now_ms


class LifecycleMachine(RuleBasedStateMachine):
    """Drives an Authenticator and a model side by side. Subclasses choose the store."""

    sessions = Bundle("sessions")
    exact_clock = True

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.store = self.run(self.open_store())
        settings = model_settings()
        issuer = TokenIssuer(
            KEYS,
            issuer=settings.issuer,
            audience=settings.audience,
            lifetime_seconds=settings.access_token_ttl,
        )
        verifier = TokenVerifier(
            KEYS, issuer=settings.issuer, audience=settings.audience
        )
        self.auth = Authenticator(settings, self.store, issuer, verifier, HASHER)
        self.model: dict[str, ModelSession] = {}
        self.user_ids: dict[str, str] = {}

    async def open_store(self) -> SessionStore:
        return MemoryStore(clock=self.clock)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def now(self) -> int:
        return self.clock()

    def expect_unauthenticated(
        self, call: Callable[[], Coroutine[Any, Any, Any]], reason: Reason
    ) -> None:
        with pytest.raises(Unauthenticated) as caught:
            self.run(call())
        assert caught.value.reason == reason

    def teardown(self) -> None:
        self.run(self.close_store())
        self.loop.close()

    async def close_store(self) -> None:
        await self.store.close()

    @initialize()
    def create_users(self) -> None:
        password_hash = HASHER.hash_sync(PASSWORD)
        for name in USERNAMES:
            user = self.run(self.store.create_user(name, password_hash, ("reader",)))
            self.user_ids[name] = user.user_id

    @rule(target=sessions, username=st.sampled_from(USERNAMES))
    def login(self, username: str) -> str:
        result = self.run(
            self.auth.login(username, PASSWORD, peer="127.0.0.1", user_agent="model")
        )
        now = self.now()
        session = result.session
        absolute = now + ABSOLUTE_MS
        model = ModelSession(
            username=username,
            user_id=self.user_ids[username],
            session_id=session.session_id,
            absolute_ms=absolute,
            expires_ms=min(now + IDLE_MS, absolute),
            last_seen_ms=now,
            access_tokens=[result.access.token],
            refresh_tokens=[result.refresh_token],
        )
        self.model[session.session_id] = model

        assert session.user_id == model.user_id
        assert session.username == username
        if self.exact_clock:
            assert session.absolute_expiry_ms == model.absolute_ms
            assert session.idle_expiry_ms == model.expires_ms
        return session.session_id

    @rule(session_id=sessions, pick=st.integers(min_value=0))
    def validate(self, session_id: str, pick: int) -> None:
        model = self.model[session_id]
        token = model.access_tokens[pick % len(model.access_tokens)]
        now = self.now()
        if not model.live(now):
            model.ended = True
            self.expect_unauthenticated(
                lambda: self.auth.validate(token), Reason.SESSION_ENDED
            )
            return
        validation = self.run(self.auth.validate(token))
        if now - model.last_seen_ms >= TOUCH_MS:
            model.touch(now)

        assert validation.session.session_id == session_id
        assert validation.principal.username == model.username
        if self.exact_clock:
            assert validation.session.idle_expiry_ms == model.expires_ms
            assert validation.session.last_seen_ms == model.last_seen_ms

    @rule(
        session_id=sessions,
        retry_after_ms=st.none()
        | st.sampled_from([0, GRACE_MS - 1, GRACE_MS, GRACE_MS + 1]),
    )
    def refresh_current(self, session_id: str, retry_after_ms: int | None) -> None:
        """Refresh with the current token, then with ``retry_after_ms`` retry it later.

        The retry is what a client does when the response to its refresh got lost.
        """
        model = self.model[session_id]
        token = model.refresh_tokens[-1]
        now = self.now()
        if not model.live(now):
            model.ended = True
            self.expect_unauthenticated(
                lambda: self.auth.refresh(token), Reason.SESSION_ENDED
            )
            return
        result = self.run(self.auth.refresh(token))
        model.refresh_tokens.append(result.refresh_token)
        model.access_tokens.append(result.access.token)
        model.grace_until_ms = now + GRACE_MS
        model.touch(now)

        assert result.session.session_id == session_id
        assert result.refresh_token != token
        if self.exact_clock:
            assert result.session.idle_expiry_ms == model.expires_ms
        if retry_after_ms is not None:
            self.refresh_stale(session_id, 1, retry_after_ms)

    @rule(
        session_id=sessions,
        back=st.integers(min_value=1, max_value=3),
        delay_ms=st.sampled_from([0, GRACE_MS - 1, GRACE_MS, GRACE_MS + 1]),
    )
    def refresh_stale(self, session_id: str, back: int, delay_ms: int) -> None:
        """Present a refresh token that ``back`` rotations have replaced.

        With ``delay_ms``, the clock first moves to that long after the last
        rotation, as for a client that retries a lost response late.
        """
        model = self.model[session_id]
        if len(model.refresh_tokens) <= back:
            return
        if self.exact_clock and model.grace_until_ms:
            rotated_at = model.grace_until_ms - GRACE_MS
            self.clock.now_ms = max(self.clock.now_ms, rotated_at + delay_ms)
        token = model.refresh_tokens[-1 - back]
        now = self.now()
        if not model.live(now):
            model.ended = True
            self.expect_unauthenticated(
                lambda: self.auth.refresh(token), Reason.SESSION_ENDED
            )
        elif back > 1:
            # Only the one previous token is kept, so older ones are unknown.
            self.expect_unauthenticated(
                lambda: self.auth.refresh(token), Reason.REFRESH_TOKEN_INVALID
            )
        elif now < model.grace_until_ms or not self.exact_clock:
            # A retry within the grace window returns the same next token.
            result = self.run(self.auth.refresh(token))
            model.access_tokens.append(result.access.token)
            model.touch(now)

            assert result.refresh_token == model.refresh_tokens[-1]
        else:
            model.ended = True
            self.expect_unauthenticated(
                lambda: self.auth.refresh(token), Reason.REFRESH_TOKEN_REUSED
            )

    @rule(session_id=sessions, pick=st.integers(min_value=0))
    def logout(self, session_id: str, pick: int) -> None:
        model = self.model[session_id]
        token = model.access_tokens[pick % len(model.access_tokens)]
        was_live = model.live(self.now())

        ended = self.run(self.auth.logout(token))
        model.ended = True

        assert ended == was_live

    @rule(session_id=sessions, keep_current=st.booleans())
    def logout_all(self, session_id: str, keep_current: bool) -> None:
        current = self.model[session_id]
        keep = session_id if keep_current else None
        now = self.now()
        ending = [
            model
            for model in self.model.values()
            if model.user_id == current.user_id
            and model.session_id != keep
            and model.live(now)
        ]

        ended = self.run(self.auth.logout_all(current.user_id, keep))
        for model in ending:
            model.ended = True

        assert ended == len(ending)

    @precondition(lambda self: self.exact_clock)
    @rule(step_ms=st.sampled_from(CLOCK_STEPS_MS) | st.integers(1, ABSOLUTE_MS))
    def advance_clock(self, step_ms: int) -> None:
        self.clock.now_ms += step_ms

    @precondition(lambda self: self.exact_clock)
    @rule(
        session_id=sessions,
        limit=st.sampled_from(["touch", "grace", "idle", "absolute"]),
        offset_ms=st.sampled_from([-1, 0, 1]),
    )
    def advance_to_limit(self, session_id: str, limit: str, offset_ms: int) -> None:
        """Move the clock to one millisecond before, on or after a session's limit."""
        model = self.model[session_id]
        target = {
            "touch": model.last_seen_ms + TOUCH_MS,
            "grace": model.grace_until_ms,
            "idle": model.expires_ms,
            "absolute": model.absolute_ms,
        }[limit] + offset_ms
        if target > self.clock.now_ms:
            self.clock.now_ms = target

    @invariant()
    def live_sessions_match(self) -> None:
        now = self.now()
        for username, user_id in self.user_ids.items():
            listed = {
                s.session_id: s for s in self.run(self.auth.list_sessions(user_id))
            }
            expected = {
                model.session_id: model
                for model in self.model.values()
                if model.username == username and model.live(now)
            }

            assert set(listed) == set(expected)
            if self.exact_clock:
                for session_id, record in listed.items():
                    assert record.idle_expiry_ms == expected[session_id].expires_ms


class RedisLifecycleMachine(LifecycleMachine):
    """The same machine on a RedisStore, whose clock is the Redis server's."""

    exact_clock = False
    redis_url = ""
    prefix = ""

    async def open_store(self) -> SessionStore:
        return RedisStore.from_url(self.redis_url, prefix=self.prefix)

    async def close_store(self) -> None:
        assert isinstance(self.store, RedisStore)
        async for key in self.store.client.scan_iter(match=f"{self.prefix}:*"):
            await self.store.client.delete(key)
        await self.store.close()


def test_lifecycle_model_memory() -> None:
    run_state_machine_as_test(
        LifecycleMachine,
        settings=settings(
            max_examples=250,
            stateful_step_count=40,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


@pytest.mark.slow
def test_lifecycle_model_redis(redis_url: str, prefix: str) -> None:
    RedisLifecycleMachine.redis_url = redis_url
    RedisLifecycleMachine.prefix = prefix
    run_state_machine_as_test(
        RedisLifecycleMachine,
        settings=settings(
            max_examples=40,
            stateful_step_count=30,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
