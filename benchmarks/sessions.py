"""A private redis-server, and users and sessions written in the store's key layout.

Sessions are created two ways. :func:`create_sessions` goes through
``RedisStore.create_session``, the script that Login runs. :func:`populate`
writes the same keys with a Lua loop, so that a million sessions load in
seconds; :data:`POPULATE` mirrors ``CREATE_SESSION`` and
``RedisStore.create_user`` in ``authgrpc/redis_store.py`` and must follow
them when the layout changes.
"""

from __future__ import annotations

import asyncio
import base64
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
from typing import Any

import redis

from authgrpc import refresh
from authgrpc.redis_store import RedisStore
from authgrpc.store import NewSession, SessionLimits, UserRecord, new_id

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

# ARGV: prefix, password hash, idle ms, absolute ms, peer, user agent, then
# groups of (user id, session id, rotation key, refresh hash). Each group
# becomes one user with one session, written as create_user and
# CREATE_SESSION write them.
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
  redis.call('HSET', base .. ':user', 'n', name, 'h', ARGV[2], 'r', '', 'd', 0, 'g', 0,
    'c', now)
  redis.call('SET', prefix .. ':{n:' .. name .. '}', uid)
  redis.call('SADD', prefix .. ':users', name)
  local session = base .. ':s:' .. sid
  redis.call('HSET', session, 'c', now, 'a', absolute, 'l', now, 'k', ARGV[i + 2],
    'r', ARGV[i + 3], 'i', ARGV[5], 'ua', ARGV[6])
  redis.call('PEXPIRE', session, idle)
  redis.call('ZADD', base .. ':idx', absolute, sid)
  redis.call('PEXPIRE', base .. ':idx', absolute - now + 1000)
end
return (#ARGV - 6) / 4
"""

# Like POPULATE, but only the users, so that session memory can be measured apart.
POPULATE_USERS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix = ARGV[1]
for i = 3, #ARGV do
  local uid = ARGV[i]
  local name = 'bulk-' .. string.lower(uid)
  redis.call('HSET', prefix .. ':{u:' .. uid .. '}:user', 'n', name, 'h', ARGV[2],
    'r', '', 'd', 0, 'g', 0, 'c', now)
  redis.call('SET', prefix .. ':{n:' .. name .. '}', uid)
  redis.call('SADD', prefix .. ':users', name)
end
return #ARGV - 2
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


def populate_users(
    client: redis.Redis, prefix: str, password_hash: str, count: int
) -> list[str]:
    """Write ``count`` users as ``RedisStore.create_user`` does; return their ids."""
    script = client.register_script(POPULATE_USERS)
    user_ids = [new_id() for _ in range(count)]
    for start in range(0, count, BATCH):
        script(args=[prefix, password_hash, *user_ids[start : start + BATCH]])
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
                peer,
                user_agent,
            ]
            # Ids are 16 random bytes in base64url, as new_id() makes them.
            # The rotation key and the refresh hash are 16 random bytes each,
            # the sizes that refresh.new_rotation_key() and stored_hash have.
            blob = os.urandom(64 * size)
            for offset in range(0, 64 * size, 64):
                ref = SessionRef(
                    _base64url(blob[offset : offset + 16]),
                    _base64url(blob[offset + 16 : offset + 32]),
                )
                refs.append(ref)
                args += [
                    ref.user_id,
                    ref.session_id,
                    blob[offset + 32 : offset + 48],
                    blob[offset + 48 : offset + 64],
                ]
            if pending is not None:
                pending.result()
            pending = sender.submit(script, args=args)
        if pending is not None:
            pending.result()
    return refs


def _base64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def create_sessions(
    store: RedisStore,
    users: list[UserRecord],
    limits: SessionLimits,
    peer: str,
    user_agent: str,
    *,
    concurrency: int = 64,
) -> list[SessionRef]:
    """Create one session for each of ``users`` with ``RedisStore.create_session``."""
    refs: list[SessionRef] = []
    queue = list(reversed(users))

    async def creator() -> None:
        while queue:
            user = queue.pop()
            secret = refresh.new_secret()
            draft = refresh.RefreshToken(user.user_id, "", secret)
            new = NewSession(
                draft.stored_hash, refresh.new_rotation_key(), peer, user_agent
            )
            session = await store.create_session(user, new, limits)
            refs.append(SessionRef(user.user_id, session.session_id))

    await asyncio.gather(*(creator() for _ in range(concurrency)))
    return refs


def used_memory(client: redis.Redis) -> int:
    """Return ``used_memory`` from INFO memory, in bytes."""
    return int(client.info("memory")["used_memory"])


def memory_usage(client: redis.Redis, keys: list[str]) -> list[int]:
    """Return MEMORY USAGE of each key with every nested value counted (SAMPLES 0)."""
    return [int(client.memory_usage(key, samples=0) or 0) for key in keys]


def sample(refs: list[SessionRef], count: int) -> list[SessionRef]:
    """Return up to ``count`` distinct sessions picked at random."""
    picked = list(refs)
    secrets.SystemRandom().shuffle(picked)
    return picked[:count]
