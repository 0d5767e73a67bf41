"""A validation cache that forgets an ended session within a bounded delay.

Validators keep sessions they have just seen live in a bounded in-memory
map. The auth service publishes every early end of a session (logout,
revoke, logout-all, refresh reuse, a disabled user, the per-user limit) on
the Redis channel ``<prefix>:ended``, and :class:`InvalidationListener`
drops the entry when the message arrives, usually within a few
milliseconds. Delivery is asynchronous, so a session ended through another
process may still be accepted from the cache until its message is applied,
and never for longer than ``recheck_after`` (:data:`MAX_STALENESS`, 0.25 s,
by default). Use no cache where an ended session must be refused as soon
as Logout returns. Correctness never depends on a message arriving:

- the cache is empty and off until the subscription is confirmed, and is
  cleared and turned off again whenever the connection drops or stops
  answering pings;
- a session that a message has ended leaves a tombstone, so a validation
  that raced the end cannot put the session back into the cache;
- every entry is re-checked against Redis once per ``recheck_after``
  (which also slides the idle timeout, writing at most once per touch
  interval), and never outlives the session's own idle and absolute expiry.

Role changes are not published, so a cached principal keeps its old roles
for up to ``recheck_after`` as well.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import redis

from authgrpc.errors import ConfigurationError
from authgrpc.store import SessionRecord, wall_clock_ms

log = logging.getLogger("authgrpc.cache")

SessionKey = tuple[str, str]
MAX_STALENESS = 0.25


@dataclass(slots=True)
class _Entry:
    session: SessionRecord
    checked_at: float


class ValidationCache:
    """Recently validated sessions by (user id, session id), bounded and thread-safe.

    ``lookup`` returns a session only while the cache is enabled, the entry
    was checked against the store less than ``recheck_after`` seconds ago,
    and the session's idle and absolute expiry have not passed.
    """

    def __init__(
        self,
        *,
        max_entries: int = 100_000,
        recheck_after: float = 1.0,
        tombstone_seconds: float = 60.0,
    ):
        self.max_entries = max_entries
        self.recheck_after = recheck_after
        self.tombstone_seconds = tombstone_seconds
        self._entries: OrderedDict[SessionKey, _Entry] = OrderedDict()
        self._tombstones: OrderedDict[SessionKey, float] = OrderedDict()
        self._lock = threading.Lock()
        self._enabled = False
        self._epoch = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self._enabled

    def epoch(self) -> int:
        """Return the token to pass to ``store``; a clear in between voids it."""
        return self._epoch

    def lookup(self, user_id: str, session_id: str) -> SessionRecord | None:
        """Return the cached live session, or None if the store must be asked."""
        if not self._enabled:
            return None
        key = (user_id, session_id)
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            wall = wall_clock_ms()
            expired = (
                wall >= entry.session.idle_expiry_ms
                or wall >= entry.session.absolute_expiry_ms
            )
            if expired or now - entry.checked_at >= self.recheck_after:
                del self._entries[key]
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry.session

    def store(self, session: SessionRecord, epoch: int) -> None:
        """Cache a session the store just reported live, unless it ended since."""
        key = (session.user_id, session.session_id)
        with self._lock:
            if not self._enabled or epoch != self._epoch or key in self._tombstones:
                return
            self._entries[key] = _Entry(session, time.monotonic())
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def invalidate(self, user_id: str, session_id: str) -> None:
        """Forget an ended session and keep it out for ``tombstone_seconds``."""
        key = (user_id, session_id)
        now = time.monotonic()
        with self._lock:
            self._entries.pop(key, None)
            self._tombstones[key] = now
            self._tombstones.move_to_end(key)
            while self._tombstones:
                oldest_key, ended_at = next(iter(self._tombstones.items()))
                if (
                    now - ended_at < self.tombstone_seconds
                    and len(self._tombstones) <= self.max_entries
                ):
                    break
                del self._tombstones[oldest_key]

    def forget_user(self, user_id: str) -> None:
        """Forget every cached session of a user and void validations in flight."""
        with self._lock:
            for key in [key for key in self._entries if key[0] == user_id]:
                del self._entries[key]
            self._epoch += 1

    def clear(self, *, enable: bool) -> None:
        """Drop every entry and turn the cache on or off."""
        with self._lock:
            self._entries.clear()
            self._epoch += 1
            self._enabled = enable

    def __len__(self) -> int:
        return len(self._entries)


class InvalidationListener:
    """Feeds a ValidationCache from the session-end channel, on a daemon thread.

    The cache is enabled only while the subscription is confirmed and each
    ping gets a response within ``ping_timeout`` seconds. On any failure the
    cache is cleared and turned off, and the listener reconnects with backoff.
    """

    def __init__(
        self,
        client_factory: Callable[[], redis.Redis],
        channel: str,
        cache: ValidationCache,
        *,
        ping_interval: float = 0.5,
        ping_timeout: float = 1.5,
    ):
        self._client_factory = client_factory
        self.channel = channel
        self.cache = cache
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="authgrpc-invalidation", daemon=True
        )

    def start(self) -> InvalidationListener:
        self._thread.start()
        return self

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the subscription; return if it came."""
        return self._connected.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                self._listen()
                backoff = 0.05
            except (redis.exceptions.RedisError, OSError, ValueError) as error:
                if self.cache.enabled:
                    log.warning(
                        "invalidation channel lost, validation cache off: %s",
                        type(error).__name__,
                    )
            self._connected.clear()
            self.cache.clear(enable=False)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 2.0)

    def _listen(self) -> None:
        client = self._client_factory()
        # Typed from redis-py 8.2 on, untyped before: Any suits both.
        pubsub = cast(Any, client).pubsub()
        try:
            pubsub.subscribe(self.channel)
            last_pong = time.monotonic()
            last_ping = 0.0
            while not self._stop.is_set():
                now = time.monotonic()
                if now - last_ping >= self.ping_interval:
                    pubsub.ping()
                    last_ping = now
                if now - last_pong > self.ping_timeout:
                    raise redis.exceptions.TimeoutError(
                        "invalidation channel did not respond to a ping"
                    )
                message = pubsub.get_message(timeout=min(self.ping_interval, 0.2))
                if message is None:
                    continue
                kind = message["type"]
                if kind == "subscribe":
                    self.cache.clear(enable=True)
                    self._connected.set()
                    last_pong = time.monotonic()
                    log.info(
                        "invalidation channel subscribed, cache on: channel=%s",
                        self.channel,
                    )
                elif kind == "pong" or (
                    kind == "message" and message["data"] in (b"PONG", "PONG")
                ):
                    last_pong = time.monotonic()
                elif kind == "message":
                    self._apply(message["data"])
        finally:
            pubsub.close()
            client.close()

    def _apply(self, data: bytes | str) -> None:
        text = data.decode() if isinstance(data, bytes) else data
        user_id, _, session_id = text.partition(" ")
        if user_id and session_id:
            self.cache.invalidate(user_id, session_id)


def subscriber_factory(url: str, timeout: float = 1.0) -> Callable[[], redis.Redis]:
    """Return a function that opens a client for subscribing to the channel at ``url``.

    Plain PUBLISH reaches every node of a Redis Cluster, so a cluster URL
    subscribes on its first node; a Sentinel URL subscribes on the primary.
    """
    options = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss", "unix"):
        return lambda: redis.Redis.from_url(url, **options)
    if parts.scheme in ("redis+cluster", "rediss+cluster"):
        first = parts.netloc.rsplit("@", 1)[-1].split(",")[0]
        credentials = (
            parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        )
        scheme = parts.scheme.replace("+cluster", "")
        node_url = f"{scheme}://{credentials}{first}"
        return lambda: redis.Redis.from_url(node_url, **options)
    if parts.scheme == "redis+sentinel":
        from redis.sentinel import Sentinel

        hosts = []
        for item in parts.netloc.rsplit("@", 1)[-1].split(","):
            host, _, port = item.rpartition(":")
            hosts.append((host.strip("[]") or "127.0.0.1", int(port or 26379)))
        service = parts.path.strip("/")
        sentinel: Any = cast(Any, Sentinel)(hosts, sentinel_kwargs=options, **options)
        return lambda: sentinel.master_for(service, password=parts.password)
    raise ConfigurationError(f"unsupported Redis URL scheme {parts.scheme!r}")
