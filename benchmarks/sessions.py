"""A private redis-server, and users and sessions written in the store's key layout.

Sessions are created two ways. :func:`create_sessions` goes through
``RedisStore.create_session``, the script that Login runs. :func:`populate`
writes the same keys with a Lua loop, so that a million sessions load in
seconds; :data:`POPULATE` mirrors ``CREATE_SESSION`` and
``RedisStore.create_user`` in ``authgrpc/redis_store.py`` and must follow
them when the layout changes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import redis

from authgrpc import refresh
from authgrpc.config import Settings
from authgrpc.redis_store import KeyLayout, RedisStore
from authgrpc.store import (
    NewSession,
    RefreshOutcome,
    SessionLimits,
    UserRecord,
    cut_stored_text,
    new_session_id,
    new_user_id,
)

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

# ARGV: prefix, password hash, idle ms, absolute ms, peer, user agent, then
# groups of (user id, session id, rotation key, refresh hash). Each group
# becomes one user with one session, written as create_user and
# CREATE_SESSION write them: the rotation key is the user's.
POPULATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix = ARGV[1]
local idle = math.min(tonumber(ARGV[3]), tonumber(ARGV[4]))
local absolute = now + tonumber(ARGV[4])
for i = 7, #ARGV, 4 do
  local uid, sid = ARGV[i], ARGV[i + 1]
  local base = prefix .. ':{u:' .. uid .. '}'
  local name = 'bulk-' .. string.lower(uid)
  redis.call('SET', base .. ':pw', ARGV[2])
  redis.call('HSET', base .. ':user', 'n', name, 'r', '', 'd', 0, 'g', 0, 'c', now,
    'k', ARGV[i + 2])
  redis.call('SET', prefix .. ':{n:' .. name .. '}', uid)
  redis.call('SADD', prefix .. ':users', name)
  local session = base .. ':s:' .. sid
  redis.call('HSET', session, 't', ARGV[4], 'l', 0, 'r', ARGV[i + 3], 'i', ARGV[5],
    'u', ARGV[6])
  redis.call('PEXPIRE', session, idle)
  redis.call('HSET', base .. ':user', sid, absolute)
end
return (#ARGV - 6) / 4
"""

# Like POPULATE, but only the users, so that session memory can be measured
# apart. ARGV: prefix, password hash, then pairs of (user id, rotation key).
POPULATE_USERS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix = ARGV[1]
for i = 3, #ARGV, 2 do
  local uid = ARGV[i]
  local base = prefix .. ':{u:' .. uid .. '}'
  local name = 'bulk-' .. string.lower(uid)
  redis.call('SET', base .. ':pw', ARGV[2])
  redis.call('HSET', base .. ':user', 'n', name, 'r', '', 'd', 0, 'g', 0, 'c', now,
    'k', ARGV[i + 1])
  redis.call('SET', prefix .. ':{n:' .. name .. '}', uid)
  redis.call('SADD', prefix .. ':users', name)
end
return (#ARGV - 2) / 2
"""

BATCH = 5_000


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisProcess:
    """A redis-server child process on a free loopback port, without persistence."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        command = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server on port {self.port} did not start"
                    ) from None
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(10)
        self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=30)


@dataclass(frozen=True)
class SessionRef:
    """A session that the benchmark created, by its ids."""

    user_id: str
    session_id: str
    refresh_hash: bytes = b""


def populate_users(
    client: redis.Redis, prefix: str, password_hash: str, count: int
) -> list[str]:
    """Write ``count`` users as ``RedisStore.create_user`` does; return their ids."""
    script = client.register_script(POPULATE_USERS)
    user_ids = [new_user_id() for _ in range(count)]
    for start in range(0, count, BATCH):
        args: list[str | bytes] = [prefix, password_hash]
        for user_id in user_ids[start : start + BATCH]:
            args += [user_id, refresh.new_rotation_key()]
        script(args=args)
    return user_ids


def populate(
    client: redis.Redis,
    prefix: str,
    password_hash: str,
    limits: SessionLimits,
    peer: str,
    user_agent: str,
    count: int,
) -> list[SessionRef]:
    """Write ``count`` users with one live session each; return the sessions."""
    script = client.register_script(POPULATE)
    refs: list[SessionRef] = []
    # Redis runs one batch while this thread builds the next.
    with ThreadPoolExecutor(max_workers=1) as sender:
        pending: Future[Any] | None = None
        for start in range(0, count, BATCH):
            size = min(BATCH, count - start)
            args: list[str | bytes | int] = [
                prefix,
                password_hash,
                limits.idle_ms,
                limits.absolute_ms,
                cut_stored_text(peer),
                cut_stored_text(user_agent),
            ]
            for _ in range(size):
                ref = SessionRef(new_user_id(), new_session_id())
                refs.append(ref)
                args += [
                    ref.user_id,
                    ref.session_id,
                    refresh.new_rotation_key(),
                    refresh.RefreshToken("", "", os.urandom(32)).stored_hash,
                ]
            if pending is not None:
                pending.result()
            pending = sender.submit(script, args=args)
        if pending is not None:
            pending.result()
    return refs


async def create_sessions(
    store: RedisStore,
    users: list[UserRecord],
    limits: SessionLimits,
    peer: str,
    user_agent: str,
    *,
    concurrency: int = 64,
    per_user: int = 1,
) -> list[SessionRef]:
    """Create ``per_user`` sessions for each of ``users`` with the store's script."""
    refs: list[SessionRef] = []
    queue = list(reversed(users))

    async def creator() -> None:
        while queue:
            user = queue.pop()
            for _ in range(per_user):
                secret = refresh.new_secret()
                draft = refresh.RefreshToken(user.user_id, "", secret)
                new = NewSession(
                    draft.stored_hash, refresh.new_rotation_key(), peer, user_agent
                )
                session = await store.create_session(user, new, limits)
                refs.append(
                    SessionRef(user.user_id, session.session_id, draft.stored_hash)
                )

    await asyncio.gather(*(creator() for _ in range(concurrency)))
    return refs


async def refresh_sessions(
    store: RedisStore,
    refs: list[SessionRef],
    limits: SessionLimits,
    *,
    concurrency: int = 64,
) -> None:
    """Rotate the refresh token of each session once, as a Refresh call does."""
    queue = list(reversed(refs))

    async def refresher() -> None:
        while queue:
            await _refresh(store, queue.pop(), limits)

    await asyncio.gather(*(refresher() for _ in range(concurrency)))


async def _refresh(store: RedisStore, ref: SessionRef, limits: SessionLimits) -> None:
    outcome, _ = await store.commit_refresh(
        ref.user_id,
        ref.session_id,
        ref.refresh_hash,
        refresh.RefreshToken("", "", os.urandom(32)).stored_hash,
        10_000,
        limits,
    )
    if outcome is not RefreshOutcome.ROTATED:
        raise RuntimeError(f"refresh of session {ref.session_id} was {outcome}")


def used_memory(client: redis.Redis) -> int:
    """Return ``used_memory`` from INFO memory, in bytes."""
    return int(client.info("memory")["used_memory"])


def settled_used_memory(client: redis.Redis, timeout: float = 10.0) -> int:
    """Return ``used_memory`` once ``client`` is the only connection left.

    Redis keeps each connection's buffers of several kilobytes until it has
    processed the close, which happens after the closing side has moved on.
    """
    deadline = time.monotonic() + timeout
    while int(client.info("clients")["connected_clients"]) > 1:
        if time.monotonic() > deadline:
            raise RuntimeError("other connections to the private Redis stayed open")
        time.sleep(0.01)
    return used_memory(client)


def memory_usage(client: redis.Redis, keys: list[str]) -> list[int]:
    """Return MEMORY USAGE of each key with every nested value counted (SAMPLES 0)."""
    return [int(client.memory_usage(key, samples=0) or 0) for key in keys]


def sample(refs: list[SessionRef], count: int) -> list[SessionRef]:
    """Return up to ``count`` distinct sessions picked at random."""
    picked = list(refs)
    secrets.SystemRandom().shuffle(picked)
    return picked[:count]


@dataclass(frozen=True)
class MemoryReport:
    """Redis memory that sessions added, per session, in bytes."""

    users: int
    per_user: int
    created: float
    refreshed: float
    session_key: float
    user_key_before: float
    user_key_after: float


def measure_memory(
    users: int, per_user: int, password_hash: str, peer: str, user_agent: str
) -> MemoryReport:
    """Measure the ``used_memory`` delta per session on a new private redis-server.

    The users are written first. Then ``per_user`` sessions per user are
    created with ``RedisStore.create_session``, and each session's refresh
    token is rotated once. ``session_key`` and the ``user_key`` means are
    MEMORY USAGE (SAMPLES 0) over up to 100 sessions and their users' hashes.
    """
    with TemporaryDirectory() as directory:
        server = RedisProcess(Path(directory))
        server.start()
        try:
            return _measure(server, users, per_user, password_hash, peer, user_agent)
        finally:
            server.stop()


def _measure(
    server: RedisProcess,
    users: int,
    per_user: int,
    password_hash: str,
    peer: str,
    user_agent: str,
) -> MemoryReport:
    layout = KeyLayout()
    limits = Settings(dev=True).limits
    client = server.client()

    async def create_then_refresh(
        user_ids: list[str], readings: list[int]
    ) -> list[SessionRef]:
        records = [
            UserRecord(uid, f"bulk-{uid.lower()}", password_hash) for uid in user_ids
        ]
        # Each reading follows closing the store, whose connections' buffers
        # would otherwise count.
        store = RedisStore.from_url(server.url, timeout=30)
        try:
            refs = await create_sessions(
                store, records, limits, peer, user_agent, per_user=per_user
            )
        finally:
            await store.close()
        readings.append(settled_used_memory(client))
        store = RedisStore.from_url(server.url, timeout=30)
        try:
            await refresh_sessions(store, refs, limits)
        finally:
            await store.close()
        readings.append(settled_used_memory(client))
        return refs

    # The first runs of the scripts allocate about 100 kB that stays (the
    # script cache and the buffers of Redis's script client), so a warm-up
    # user's sessions are created and refreshed before the first reading.
    warm_up = populate_users(client, layout.prefix, password_hash, 1)
    asyncio.run(create_then_refresh(warm_up, []))
    user_ids = populate_users(client, layout.prefix, password_hash, users)
    picked_users = [layout.user(uid) for uid in user_ids[:100]]
    user_before = memory_usage(client, picked_users)
    readings = [settled_used_memory(client)]
    refs = asyncio.run(create_then_refresh(user_ids, readings))
    before, created, refreshed = readings
    count = users * per_user
    session_keys = [layout.session(r.user_id, r.session_id) for r in sample(refs, 100)]
    report = MemoryReport(
        users=users,
        per_user=per_user,
        created=(created - before) / count,
        refreshed=(refreshed - before) / count,
        session_key=_mean(memory_usage(client, session_keys)),
        user_key_before=_mean(user_before),
        user_key_after=_mean(memory_usage(client, picked_users)),
    )
    client.close()
    return report


def _mean(values: list[int]) -> float:
    return sum(values) / len(values)


# An argon2id hash with argon2-cffi's default parameters is 97 characters.
_EXAMPLE_HASH = "$argon2id$v=19$m=65536,t=3,p=4$" + "A" * 22 + "$" + "B" * 43
_EXAMPLE_AGENT = "grpc-python/1.85.3 grpc-c/50.0.0 (linux; chttp2)"


def main() -> None:
    """Print the Redis memory per session for each ``--users`` and ``--per-user``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument(
        "--users", type=int, nargs="+", default=[2000, 10_000], help="user counts"
    )
    parser.add_argument(
        "--per-user",
        type=int,
        nargs="+",
        default=[1, 5],
        help="sessions per user",
    )
    options = parser.parse_args()
    print("users  per user  created B  refreshed B  session key B  user key B")
    for users in options.users:
        for per_user in options.per_user:
            report = measure_memory(
                users, per_user, _EXAMPLE_HASH, "127.0.0.1", _EXAMPLE_AGENT
            )
            print(
                f"{report.users:>5}  {report.per_user:>8}  {report.created:>9.0f}  "
                f"{report.refreshed:>11.0f}  {report.session_key:>13.0f}  "
                f"{report.user_key_before:.0f} -> {report.user_key_after:.0f}"
            )


if __name__ == "__main__":
    main()
