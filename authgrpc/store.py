"""The session store contract, its records, and the in-process store for dev mode.

A store keeps users, sessions and failed-login counters. Two implementations
exist: :class:`authgrpc.redis_store.RedisStore` for every real deployment,
and :class:`MemoryStore` for ``authgrpc serve --dev`` and unit tests. Both
pass the same contract tests. All times are Unix milliseconds.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from authgrpc.errors import AuthError, StoreUnavailable

Clock = Callable[[], int]


def wall_clock_ms() -> int:
    """Return the current Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


# Maximum UTF-8 bytes of the peer and the user agent that a store keeps. In
# Redis a longer hash value converts the session hash to the larger hashtable
# encoding, and both stores keep the same cut so that they report the same.
MAX_STORED_TEXT_BYTES = 64


def cut_stored_text(text: str) -> str:
    """Cut ``text`` to MAX_STORED_TEXT_BYTES of UTF-8 without splitting a character."""
    data = text.encode()
    if len(data) <= MAX_STORED_TEXT_BYTES:
        return text
    return data[:MAX_STORED_TEXT_BYTES].decode(errors="ignore")


def new_user_id() -> str:
    """Return a random 96-bit user id, base64url-encoded (16 characters)."""
    return _random_id(12)


def new_session_id() -> str:
    """Return a random 64-bit session id, base64url-encoded (11 characters).

    A session id only names a session among its user's sessions and grants
    nothing: access tokens are signed, and a refresh token carries a 256-bit
    secret. Stores make a new id when one clashes with a live session of the
    same user. The short ids keep a session's Redis key within 48 bytes.
    """
    return _random_id(8)


def _random_id(size: int) -> str:
    # An id that starts with "-" reads as an option on a command line, as in
    # `authgrpc session revoke NAME <id>`, so such draws are discarded.
    while True:
        text = secrets.token_urlsafe(size)
        if not text.startswith("-"):
            return text


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A stored user. ``generation`` changes whenever all its sessions end."""

    user_id: str
    username: str
    password_hash: str = field(repr=False)
    roles: tuple[str, ...] = ()
    disabled: bool = False
    generation: int = 0
    created_ms: int = 0


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A live session as the store returned it."""

    session_id: str
    user_id: str
    username: str
    roles: tuple[str, ...]
    created_ms: int
    absolute_expiry_ms: int
    idle_expiry_ms: int
    last_seen_ms: int
    peer: str = ""
    user_agent: str = ""


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """How long sessions live and how often a validation writes to the store."""

    idle_ms: int
    absolute_ms: int
    touch_interval_ms: int = 0
    max_per_user: int = 0


@dataclass(frozen=True, slots=True)
class NewSession:
    """The fields that Login stores with a new session, beside its user."""

    refresh_hash: bytes = field(repr=False)
    rotation_key: bytes = field(repr=False)
    peer: str = ""
    user_agent: str = ""


# The store keeps this many bytes of the previous refresh hash. It only
# recognizes a rotated-away token, and a replay within the grace window must
# also match the current hash in full, so 64 bits are enough.
PREVIOUS_HASH_BYTES = 8


@dataclass(frozen=True, slots=True)
class RefreshState:
    """The refresh-token fields of a session, for deciding what a Refresh means."""

    rotation_key: bytes = field(repr=False)
    current_hash: bytes = field(repr=False)
    previous_hash: bytes = field(repr=False)
    grace_until_ms: int


class RefreshOutcome(enum.Enum):
    """The result of committing a refresh."""

    ROTATED = "rotated"
    REPLAYED = "replayed"
    REUSED = "reused"
    INVALID = "invalid"
    ENDED = "ended"


class UserChanged(AuthError):
    """The user was disabled or had all sessions ended while a login was in progress."""


class UsernameTaken(AuthError):
    """A user with that normalized username already exists."""


@dataclass(frozen=True, slots=True)
class ThrottleResult:
    """Whether an attempt may go ahead, and if not, for how many seconds to wait."""

    allowed: bool
    retry_after_ms: int = 0


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    """Login attempt limits per key (a username or a peer address).

    Each attempt is counted when it starts, so that parallel guesses cannot
    overshoot the limit, and a successful one is released again. The
    attempt after ``max_failures`` counted ones within ``window_ms`` starts
    a lockout of ``lockout_ms``, doubled for each further lockout that
    follows within ``level_memory_ms``, up to ``max_lockout_ms``.
    """

    max_failures: int = 5
    window_ms: int = 15 * 60_000
    lockout_ms: int = 60_000
    max_lockout_ms: int = 60 * 60_000
    level_memory_ms: int = 24 * 60 * 60_000


class SessionStore(Protocol):
    """The store interface of the service. Every method may raise StoreUnavailable."""

    async def ping(self) -> None: ...
    async def close(self) -> None: ...

    async def create_user(
        self, username: str, password_hash: str, roles: tuple[str, ...]
    ) -> UserRecord: ...
    async def get_user(self, user_id: str) -> UserRecord | None: ...
    async def get_user_by_name(self, username: str) -> UserRecord | None: ...
    async def list_users(self) -> list[UserRecord]: ...
    async def replace_password_hash(
        self, user_id: str, old_hash: str, new_hash: str
    ) -> bool: ...
    async def set_password_hash(self, user_id: str, new_hash: str) -> int: ...
    async def set_disabled(self, user_id: str, disabled: bool) -> int: ...
    async def set_roles(self, user_id: str, roles: tuple[str, ...]) -> None: ...

    async def create_session(
        self, user: UserRecord, new: NewSession, limits: SessionLimits
    ) -> SessionRecord: ...
    async def validate_session(
        self, user_id: str, session_id: str, limits: SessionLimits
    ) -> SessionRecord | None: ...
    async def end_session(self, user_id: str, session_id: str) -> bool: ...
    async def end_all_sessions(
        self, user_id: str, keep_session_id: str | None = None
    ) -> int: ...
    async def list_sessions(self, user_id: str) -> list[SessionRecord]: ...
    async def get_refresh_state(
        self, user_id: str, session_id: str
    ) -> RefreshState | None: ...
    async def commit_refresh(
        self,
        user_id: str,
        session_id: str,
        presented_hash: bytes,
        new_hash: bytes,
        grace_ms: int,
        limits: SessionLimits,
    ) -> tuple[RefreshOutcome, SessionRecord | None]: ...

    async def throttle_acquire(
        self, key: str, policy: ThrottlePolicy
    ) -> ThrottleResult: ...
    async def throttle_release(self, key: str) -> None: ...
    async def throttle_reset(self, key: str) -> bool:
        """Clear a failed-login counter and its lockout; return whether one existed."""
        ...


SessionEndListener = Callable[[str, str], None]


@dataclass
class _MemorySession:
    record: SessionRecord
    refresh: RefreshState
    expires_ms: int


@dataclass
class _Counter:
    expires_ms: int
    count: int = 0
    locked_until_ms: int = 0
    level: int = 0
    level_expires_ms: int = 0


class MemoryStore:
    """An in-process store that behaves as the Redis one, for dev mode and tests.

    Everything lives in this process and is lost when it exits. ``clock``
    returns the time in milliseconds, so tests can move it forward.
    ``on_session_end`` is called with ``(user_id, session_id)`` whenever a
    session ends before its time.
    """

    def __init__(
        self,
        clock: Clock = wall_clock_ms,
        on_session_end: SessionEndListener | None = None,
    ):
        self.clock = clock
        self.on_session_end = on_session_end
        self._users: dict[str, UserRecord] = {}
        self._names: dict[str, str] = {}
        self._sessions: dict[str, dict[str, _MemorySession]] = {}
        self._counters: dict[str, _Counter] = {}

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def create_user(
        self, username: str, password_hash: str, roles: tuple[str, ...]
    ) -> UserRecord:
        if username in self._names:
            raise UsernameTaken(f"user {username!r} already exists")
        user = UserRecord(
            new_user_id(),
            username,
            password_hash,
            tuple(roles),
            created_ms=self.clock(),
        )
        self._users[user.user_id] = user
        self._names[username] = user.user_id
        return user

    async def get_user(self, user_id: str) -> UserRecord | None:
        return self._users.get(user_id)

    async def get_user_by_name(self, username: str) -> UserRecord | None:
        user_id = self._names.get(username)
        return self._users.get(user_id) if user_id else None

    async def list_users(self) -> list[UserRecord]:
        return sorted(self._users.values(), key=lambda user: user.username)

    async def replace_password_hash(
        self, user_id: str, old_hash: str, new_hash: str
    ) -> bool:
        user = self._users.get(user_id)
        if user is None or user.password_hash != old_hash:
            return False
        self._users[user_id] = replace(user, password_hash=new_hash)
        return True

    async def set_password_hash(self, user_id: str, new_hash: str) -> int:
        user = self._users[user_id]
        self._users[user_id] = replace(user, password_hash=new_hash)
        return await self.end_all_sessions(user_id)

    async def set_disabled(self, user_id: str, disabled: bool) -> int:
        user = self._users[user_id]
        self._users[user_id] = replace(user, disabled=disabled)
        return await self.end_all_sessions(user_id) if disabled else 0

    async def set_roles(self, user_id: str, roles: tuple[str, ...]) -> None:
        self._users[user_id] = replace(self._users[user_id], roles=tuple(roles))

    async def create_session(
        self, user: UserRecord, new: NewSession, limits: SessionLimits
    ) -> SessionRecord:
        now = self.clock()
        current = self._users.get(user.user_id)
        if current is None or current.disabled or current.generation != user.generation:
            raise UserChanged(f"user {user.username!r} changed during login")
        sessions = self._live_sessions(user.user_id, now)
        if limits.max_per_user > 0:
            while len(sessions) >= limits.max_per_user:
                oldest = min(sessions.values(), key=lambda s: s.record.created_ms)
                self._drop(user.user_id, oldest.record.session_id)
        absolute = now + limits.absolute_ms
        idle = min(now + limits.idle_ms, absolute)
        # As in RedisStore: three tries, then give up rather than loop.
        for _ in range(3):
            session_id = new_session_id()
            if session_id not in sessions:
                break
        else:
            raise StoreUnavailable("could not allocate a unique session id")
        record = SessionRecord(
            session_id=session_id,
            user_id=user.user_id,
            username=current.username,
            roles=current.roles,
            created_ms=now,
            absolute_expiry_ms=absolute,
            idle_expiry_ms=idle,
            last_seen_ms=now,
            peer=cut_stored_text(new.peer),
            user_agent=cut_stored_text(new.user_agent),
        )
        refresh = RefreshState(new.rotation_key, new.refresh_hash, b"", 0)
        sessions[record.session_id] = _MemorySession(record, refresh, idle)
        self._sessions[user.user_id] = sessions
        return record

    async def validate_session(
        self, user_id: str, session_id: str, limits: SessionLimits
    ) -> SessionRecord | None:
        now = self.clock()
        stored = self._live_sessions(user_id, now).get(session_id)
        user = self._users.get(user_id)
        if stored is None or user is None or user.disabled:
            return None
        if now - stored.record.last_seen_ms >= limits.touch_interval_ms:
            self._touch(stored, now, limits)
        return self._view(stored, user)

    async def end_session(self, user_id: str, session_id: str) -> bool:
        stored = self._live_sessions(user_id, self.clock()).get(session_id)
        if stored is None:
            return False
        self._drop(user_id, session_id)
        return True

    async def end_all_sessions(
        self, user_id: str, keep_session_id: str | None = None
    ) -> int:
        user = self._users.get(user_id)
        if user is not None:
            self._users[user_id] = replace(user, generation=user.generation + 1)
        sessions = self._live_sessions(user_id, self.clock())
        ended = [sid for sid in sessions if sid != keep_session_id]
        for session_id in ended:
            self._drop(user_id, session_id)
        return len(ended)

    async def list_sessions(self, user_id: str) -> list[SessionRecord]:
        user = self._users.get(user_id)
        if user is None:
            return []
        sessions = self._live_sessions(user_id, self.clock()).values()
        records = [self._view(stored, user) for stored in sessions]
        return sorted(records, key=lambda record: record.created_ms)

    async def get_refresh_state(
        self, user_id: str, session_id: str
    ) -> RefreshState | None:
        stored = self._live_sessions(user_id, self.clock()).get(session_id)
        return stored.refresh if stored else None

    async def commit_refresh(
        self,
        user_id: str,
        session_id: str,
        presented_hash: bytes,
        new_hash: bytes,
        grace_ms: int,
        limits: SessionLimits,
    ) -> tuple[RefreshOutcome, SessionRecord | None]:
        now = self.clock()
        stored = self._live_sessions(user_id, now).get(session_id)
        user = self._users.get(user_id)
        if stored is None or user is None or user.disabled:
            return RefreshOutcome.ENDED, None
        state = stored.refresh
        if secrets.compare_digest(presented_hash, state.current_hash):
            stored.refresh = RefreshState(
                state.rotation_key,
                new_hash,
                presented_hash[:PREVIOUS_HASH_BYTES],
                now + grace_ms,
            )
            outcome = RefreshOutcome.ROTATED
        elif state.previous_hash and secrets.compare_digest(
            presented_hash[:PREVIOUS_HASH_BYTES], state.previous_hash
        ):
            if now >= state.grace_until_ms or not secrets.compare_digest(
                new_hash, state.current_hash
            ):
                self._drop(user_id, session_id)
                return RefreshOutcome.REUSED, None
            outcome = RefreshOutcome.REPLAYED
        else:
            return RefreshOutcome.INVALID, None
        self._touch(stored, now, limits)
        return outcome, self._view(stored, user)

    async def throttle_acquire(
        self, key: str, policy: ThrottlePolicy
    ) -> ThrottleResult:
        now = self.clock()
        counter = self._counters.get(key)
        if counter is None or counter.expires_ms <= now:
            counter = self._counters[key] = _Counter(expires_ms=now + policy.window_ms)
        if counter.level_expires_ms <= now:
            counter.level = 0
        if counter.locked_until_ms > now:
            return ThrottleResult(False, counter.locked_until_ms - now)
        if counter.count >= policy.max_failures:
            lockout = min(policy.lockout_ms << counter.level, policy.max_lockout_ms)
            counter.level += 1
            counter.level_expires_ms = now + policy.level_memory_ms
            counter.locked_until_ms = now + lockout
            counter.count = 0
            counter.expires_ms = now + policy.level_memory_ms
            return ThrottleResult(False, lockout)
        counter.count += 1
        return ThrottleResult(True)

    async def throttle_release(self, key: str) -> None:
        counter = self._counters.get(key)
        if counter is not None and counter.count > 0:
            counter.count -= 1

    async def throttle_reset(self, key: str) -> bool:
        return self._counters.pop(key, None) is not None

    def _view(self, stored: _MemorySession, user: UserRecord) -> SessionRecord:
        return replace(
            stored.record,
            username=user.username,
            roles=user.roles,
            idle_expiry_ms=stored.expires_ms,
        )

    def _touch(self, stored: _MemorySession, now: int, limits: SessionLimits) -> None:
        stored.expires_ms = min(now + limits.idle_ms, stored.record.absolute_expiry_ms)
        stored.record = replace(stored.record, last_seen_ms=now)

    def _live_sessions(self, user_id: str, now: int) -> dict[str, _MemorySession]:
        sessions = self._sessions.get(user_id, {})
        for session_id in [sid for sid, s in sessions.items() if s.expires_ms <= now]:
            del sessions[session_id]
        return sessions

    def _drop(self, user_id: str, session_id: str) -> None:
        self._sessions.get(user_id, {}).pop(session_id, None)
        if self.on_session_end is not None:
            self.on_session_end(user_id, session_id)
