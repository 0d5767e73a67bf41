"""The Redis session store.

Key layout, with ``P`` the configurable prefix (default ``authgrpc``)::

    P:{u:<user_id>}:user        hash: n username, r roles, d disabled,
                                g generation, c created, k rotation key,
                                and the session index: one field per session,
                                named by its session id, whose value is the
                                session's absolute expiry
    P:{u:<user_id>}:pw          string: the password hash
    P:{u:<user_id>}:s:<sid>     hash: t lifetime (absolute expiry minus
                                creation time), l last seen minus creation
                                time, r current refresh-token hash (12
                                bytes), p the first 8 bytes of the previous
                                one, q grace end minus creation time, i peer,
                                u user agent. Its TTL is the idle timeout,
                                capped at the absolute expiry.
    P:{n:<username>}            string: the user id for a username
    P:users                     set of every username
    P:{t:<kind>:<value>}        hash: failed-login counter and lockout
    P:ended                     pub/sub channel: "<user_id> <session_id>" for
                                every session that ends before its time

The index values are Unix milliseconds, and ``t``, ``l`` and ``q`` are
durations in milliseconds. The session hash keeps those offsets, and leaves
the absolute expiry to the index, so that listpack stores them as integers
of 4 bytes or less. A new session with an IPv4 peer and a 48-byte user
agent then fits a 112-byte listpack allocation. A refresh within about
20 s of the login adds ``p`` and ``q`` within 128 bytes; a later one stores
3-byte offsets and needs the 160-byte class.

Session ids are 11 characters and every user field name is one character,
so the index fields are the fields whose name is longer than one character.
Scripts touch an index field by a caller's session id only after its
session key turned out to exist, or when that id is longer than one
character. The password hash (about 97 characters for argon2id) is a key of
its own because any hash value over ``hash-max-listpack-value`` (64 bytes by
default in Redis 7.0) converts the whole user hash to the larger hashtable
encoding. For the same reason the store cuts the peer and the user agent to
64 bytes. NOTE: a username or roles string over 64 bytes, or more fields
than ``hash-max-listpack-entries`` (512 on redis-server 7.0.15 without a
config file), still converts that user's hash to the hashtable encoding,
which costs more per index field.

Every key of one user shares the hash tag ``{u:<user_id>}``, so each script
touches a single hash slot and the same code runs on Redis Cluster. Every
change to a session is one Lua script, so it is atomic: a validation only
extends a session key that still exists, and cannot bring back one that a
concurrent logout deleted. Times come from the Redis server's clock (TIME),
so replicas with skewed clocks agree. Sessions that time out by idleness
vanish through their TTL and are dropped from the index whenever it is
read, and at every login.

The refresh rotation key is one random 16-byte key per user: ``create_user``
writes it, and CREATE_SESSION adds the login's key when the user has none.
HMAC-SHA256 of a presented secret under it stays unguessable to anyone
without access to Redis, and each session's secrets differ.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from authgrpc import refresh
from authgrpc.errors import ConfigurationError, StoreUnavailable
from authgrpc.resp import Script, ScriptConnection
from authgrpc.store import (
    PREVIOUS_HASH_BYTES,
    NewSession,
    RefreshOutcome,
    RefreshState,
    SessionLimits,
    SessionRecord,
    ThrottlePolicy,
    ThrottleResult,
    UserChanged,
    UsernameTaken,
    UserRecord,
    cut_stored_text,
    new_session_id,
    new_user_id,
)

T = TypeVar("T")


_NOW = (
    "local t = redis.call('TIME') "
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
)

# Every loop over the user hash skips the fields of one character, which are
# the user's own, and takes the rest as the session index.

# KEYS: user, session. ARGV: generation, idle ms, absolute ms, max sessions,
# rotation key, refresh hash, peer, user agent, channel, user id, session id,
# session key prefix.
CREATE_SESSION = (
    _NOW
    + """
local u = redis.call('HMGET', KEYS[1], 'n', 'd', 'g', 'r')
if not u[1] or u[2] == '1' or (u[3] or '0') ~= ARGV[1] then return {0} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {-1} end
local live = {}
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local sid = flat[i]
  if #sid > 1 then
    local absolute = tonumber(flat[i + 1])
    if absolute > now and redis.call('EXISTS', ARGV[12] .. sid) == 1 then
      table.insert(live, {absolute, sid})
    else
      redis.call('HDEL', KEYS[1], sid)
    end
  end
end
local max = tonumber(ARGV[4])
if max > 0 and #live >= max then
  table.sort(live, function(x, y)
    if x[1] ~= y[1] then return x[1] < y[1] end
    return x[2] < y[2]
  end)
  for i = 1, #live - max + 1 do
    local oldest = live[i][2]
    redis.call('DEL', ARGV[12] .. oldest)
    redis.call('HDEL', KEYS[1], oldest)
    redis.call('PUBLISH', ARGV[9], ARGV[10] .. ' ' .. oldest)
  end
end
local absolute = now + tonumber(ARGV[3])
local idle = math.min(tonumber(ARGV[2]), tonumber(ARGV[3]))
redis.call('HSET', KEYS[2], 't', ARGV[3], 'l', 0, 'r', ARGV[6], 'i', ARGV[7],
  'u', ARGV[8])
redis.call('PEXPIRE', KEYS[2], idle)
redis.call('HSET', KEYS[1], ARGV[11], absolute)
redis.call('HSETNX', KEYS[1], 'k', ARGV[5])
return {1, now, absolute, now + idle, u[1], u[4] or ''}
"""
)

# KEYS: session, user. ARGV: idle ms, touch interval ms, session id.
VALIDATE_SESSION = (
    _NOW
    + """
local s = redis.call('HMGET', KEYS[1], 't', 'l', 'i', 'u')
if not s[1] then return false end
local u = redis.call('HMGET', KEYS[2], 'n', 'd', 'r', ARGV[3])
if not u[1] or u[2] == '1' then return false end
local absolute = tonumber(u[4])
if not absolute or absolute <= now then
  redis.call('DEL', KEYS[1])
  redis.call('HDEL', KEYS[2], ARGV[3])
  return false
end
local created = absolute - tonumber(s[1])
local last = created + tonumber(s[2])
local ttl
if now - last >= tonumber(ARGV[2]) then
  ttl = math.min(tonumber(ARGV[1]), absolute - now)
  redis.call('HSET', KEYS[1], 'l', now - created)
  redis.call('PEXPIRE', KEYS[1], ttl)
  last = now
else
  ttl = redis.call('PTTL', KEYS[1])
end
return {created, absolute, last, now + ttl, u[1], u[3] or '', s[3] or '', s[4] or ''}
"""
)

# KEYS: session, user. ARGV: session id, channel, user id.
END_SESSION = """
local ended = redis.call('DEL', KEYS[1])
if #ARGV[1] > 1 then redis.call('HDEL', KEYS[2], ARGV[1]) end
if ended == 1 then redis.call('PUBLISH', ARGV[2], ARGV[3] .. ' ' .. ARGV[1]) end
return ended
"""

# KEYS: user, password. ARGV: session key prefix, session id to keep or '',
# channel, user id, disabled flag to set ('' leaves it), new password hash
# ('' leaves it).
END_ALL_SESSIONS = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'g', 1)
  if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'd', ARGV[5]) end
  if ARGV[6] ~= '' then redis.call('SET', KEYS[2], ARGV[6]) end
end
local ended = 0
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local sid = flat[i]
  if #sid > 1 and sid ~= ARGV[2] then
    if redis.call('DEL', ARGV[1] .. sid) == 1 then
      ended = ended + 1
      redis.call('PUBLISH', ARGV[3], ARGV[4] .. ' ' .. sid)
    end
    redis.call('HDEL', KEYS[1], sid)
  end
end
return ended
"""

# KEYS: user. ARGV: session key prefix.
LIST_SESSIONS = (
    _NOW
    + """
local out = {}
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local sid = flat[i]
  if #sid > 1 then
    local key = ARGV[1] .. sid
    local absolute = tonumber(flat[i + 1])
    local f = {}
    if absolute > now then
      f = redis.call('HMGET', key, 't', 'l', 'i', 'u')
    else
      redis.call('DEL', key)
    end
    if f[1] then
      local created = absolute - tonumber(f[1])
      local ttl = redis.call('PTTL', key)
      table.insert(out, {sid, created, absolute, created + tonumber(f[2]),
        now + ttl, f[3] or '', f[4] or ''})
    else
      redis.call('HDEL', KEYS[1], sid)
    end
  end
end
return out
"""
)

# KEYS: session, user. ARGV: session id.
READ_REFRESH_STATE = """
local s = redis.call('HMGET', KEYS[1], 'r', 'p', 'q', 't')
if not s[1] then return false end
local u = redis.call('HMGET', KEYS[2], 'k', ARGV[1])
if not u[1] or not u[2] then return false end
local grace = 0
if s[3] then grace = tonumber(u[2]) - tonumber(s[4]) + tonumber(s[3]) end
return {u[1], s[1], s[2] or '', grace}
"""

# KEYS: session, user. ARGV: presented hash, new hash, grace ms, idle ms,
# channel, user id, session id, the presented hash's first
# PREVIOUS_HASH_BYTES.
COMMIT_REFRESH = (
    _NOW
    + """
local s = redis.call('HMGET', KEYS[1], 'r', 'p', 'q', 't', 'i', 'u')
if not s[1] then return {'ended'} end
local u = redis.call('HMGET', KEYS[2], 'n', 'd', 'r', ARGV[7])
if not u[1] or u[2] == '1' then return {'ended'} end
local absolute = tonumber(u[4])
if not absolute or absolute <= now then
  redis.call('DEL', KEYS[1])
  redis.call('HDEL', KEYS[2], ARGV[7])
  return {'ended'}
end
local created = absolute - tonumber(s[4])
local outcome
if s[1] == ARGV[1] then
  redis.call('HSET', KEYS[1], 'r', ARGV[2], 'p', ARGV[8],
    'q', now + tonumber(ARGV[3]) - created)
  outcome = 'rotated'
elseif s[2] and s[2] == ARGV[8] then
  if now < created + tonumber(s[3]) and s[1] == ARGV[2] then
    outcome = 'replayed'
  else
    redis.call('DEL', KEYS[1])
    redis.call('HDEL', KEYS[2], ARGV[7])
    redis.call('PUBLISH', ARGV[5], ARGV[6] .. ' ' .. ARGV[7])
    return {'reused'}
  end
else
  return {'invalid'}
end
local ttl = math.min(tonumber(ARGV[4]), absolute - now)
redis.call('HSET', KEYS[1], 'l', now - created)
redis.call('PEXPIRE', KEYS[1], ttl)
return {outcome, created, absolute, now, now + ttl, u[1], u[3] or '', s[5] or '',
  s[6] or ''}
"""
)

# KEYS: user, password. Returns the user fields and the password hash.
READ_USER = """
local u = redis.call('HMGET', KEYS[1], 'n', 'r', 'd', 'g', 'c')
return {u[1], u[2], u[3], u[4], u[5], redis.call('GET', KEYS[2])}
"""

# KEYS: password.
REPLACE_PASSWORD_HASH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# ARGV: max failures, window ms, lockout ms, max lockout ms, level memory ms.
# Returns 0 when the attempt may go ahead, else the milliseconds to wait.
THROTTLE_ACQUIRE = (
    _NOW
    + """
local h = redis.call('HMGET', KEYS[1], 'n', 'w', 'lu', 'lv', 'le')
local count, window_end = tonumber(h[1] or '0'), tonumber(h[2] or '0')
local locked_until = tonumber(h[3] or '0')
local level, level_end = tonumber(h[4] or '0'), tonumber(h[5] or '0')
if locked_until > now then return locked_until - now end
if window_end <= now then
  count = 0
  window_end = now + tonumber(ARGV[2])
end
if level_end <= now then level = 0 end
local wait = 0
if count >= tonumber(ARGV[1]) then
  wait = math.min(tonumber(ARGV[3]) * (2 ^ level), tonumber(ARGV[4]))
  level = level + 1
  level_end = now + tonumber(ARGV[5])
  locked_until = now + wait
  count = 0
else
  count = count + 1
end
redis.call('HSET', KEYS[1], 'n', count, 'w', window_end, 'lu', locked_until,
  'lv', level, 'le', level_end)
redis.call('PEXPIRE', KEYS[1], math.max(window_end, locked_until, level_end) - now)
return wait
"""
)

THROTTLE_RELEASE = """
if tonumber(redis.call('HGET', KEYS[1], 'n') or '0') > 0 then
  redis.call('HINCRBY', KEYS[1], 'n', -1)
end
return 0
"""

_UNAVAILABLE_ERRORS = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    # ClusterDownError, and "TTL exhausted" when redirections never settle.
    redis.exceptions.ClusterError,
    redis.exceptions.SlotNotCoveredError,
    # MOVED and ASK only reach us when the cluster client ran out of
    # redirections, which happens while slots change owner in a failover.
    redis.exceptions.AskError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.MasterDownError,
    OSError,
    TimeoutError,
)

# Everything a client call can raise. _unavailable picks out the store failures.
_CLIENT_ERRORS = (
    redis.exceptions.RedisError,
    redis.exceptions.RedisClusterException,
    OSError,
    TimeoutError,
)


class _ClusterClient(RedisCluster):
    """``redis.asyncio.cluster.RedisCluster`` that works under concurrent first use.

    redis-py 8.1 picks a command's route before it initializes the client,
    and with no slot map yet it sends keyed commands to a node that may not
    own the slot. Every fifth MOVED reply then makes it close all
    connections, including those that other tasks are using, so a burst of
    concurrent calls on a new client (or after a CLUSTERDOWN reset) fails.
    Loading the slot map before each command avoids that, and costs nothing
    once it is loaded. When loading fails (no node reachable, or slots not
    covered) this raises ConnectionError, because RedisClusterException is
    not a RedisError and would escape as a programming error.
    """

    async def initialize(self, *args: Any, **kwargs: Any) -> _ClusterClient:
        try:
            await super().initialize(*args, **kwargs)
        except redis.exceptions.RedisClusterException as exc:
            raise redis.exceptions.ConnectionError(str(exc)) from exc
        return self

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        await self.initialize()
        return await super().execute_command(*args, **kwargs)


class KeyLayout:
    """Builder of every Redis key name from the prefix.

    The key layout lives in this one place.
    """

    def __init__(self, prefix: str = "authgrpc"):
        if not prefix or "{" in prefix or "}" in prefix:
            raise ConfigurationError(
                f"Redis key prefix {prefix!r} must be non-empty and contain no braces"
            )
        self.prefix = prefix
        self.channel = f"{prefix}:ended"
        self.users = f"{prefix}:users"

    def user(self, user_id: str) -> str:
        return f"{self.prefix}:{{u:{user_id}}}:user"

    def index(self, user_id: str) -> str:
        """Return the key whose fields are the user's session index: the user hash."""
        return self.user(user_id)

    def password(self, user_id: str) -> str:
        return f"{self.prefix}:{{u:{user_id}}}:pw"

    def session_prefix(self, user_id: str) -> str:
        return f"{self.prefix}:{{u:{user_id}}}:s:"

    def session(self, user_id: str, session_id: str) -> str:
        return f"{self.prefix}:{{u:{user_id}}}:s:{session_id}"

    def username(self, username: str) -> str:
        return f"{self.prefix}:{{n:{username}}}"

    def throttle(self, key: str) -> str:
        return f"{self.prefix}:{{t:{key}}}"


MAX_CONNECTIONS = 256


def connect(url: str, *, timeout: float = 1.0, decode: bool = False) -> Any:
    """Open an asyncio Redis client for ``url``.

    ``redis://`` and ``rediss://`` reach one server, ``redis+cluster://host:port``
    (``rediss+cluster://`` with TLS) a cluster through any of its nodes, and
    ``redis+sentinel://host:port[,host:port...]/<service>`` the primary that
    Sentinel names for ``<service>``. ``timeout`` bounds each connect and
    each reply in seconds.
    """
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "decode_responses": decode,
        # The asyncio Retry: the synchronous one would return the coroutine
        # unawaited from call_with_retry, so no call would ever be retried.
        "retry": AsyncRetry(ExponentialBackoff(cap=timeout / 4, base=0.01), retries=1),
        "health_check_interval": 5,
    }
    parts = urlsplit(url)
    scheme = parts.scheme
    database = parts.path.strip("/")
    if scheme in ("redis", "rediss") and database and not database.isdigit():
        # redis-py would quietly take database 0 for such a path.
        raise ConfigurationError(
            f"the Redis URL's path must be a database number, not {database!r}"
        )
    if scheme in ("redis", "rediss", "unix"):
        # A blocking pool makes a burst beyond the pool size wait, within the
        # timeout, for a free connection instead of failing at once.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=timeout, **options
        )
        return aioredis.Redis(connection_pool=pool)
    if scheme in ("redis+cluster", "rediss+cluster"):
        base = url.replace("+cluster", "", 1)
        options.pop("health_check_interval")
        return _ClusterClient.from_url(base, **options)
    if scheme == "redis+sentinel":
        hosts = []
        for item in parts.netloc.rsplit("@", 1)[-1].split(","):
            host, _, port = item.rpartition(":")
            hosts.append((host.strip("[]") or "127.0.0.1", int(port or 26379)))
        service = parts.path.strip("/")
        if not service:
            raise ConfigurationError(
                f"Sentinel URL {url!r} must name the service: redis+sentinel://host:port/<service>"
            )
        query = parse_qs(parts.query)
        db = int(query.get("db", ["0"])[0])
        sentinel_options = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
        }
        # Typed from redis-py 8.2 on, untyped before: Any suits both.
        sentinel_class: Any = Sentinel
        sentinel = sentinel_class(hosts, sentinel_kwargs=sentinel_options, **options)
        return sentinel.master_for(service, db=db, password=parts.password)
    raise ConfigurationError(
        f"unsupported Redis URL scheme {scheme!r}; use redis://, rediss://, "
        "redis+cluster:// or redis+sentinel://"
    )


def _unavailable(exc: Exception) -> StoreUnavailable | None:
    """Return the StoreUnavailable that ``exc`` means, or None for any other error."""
    if isinstance(exc, _UNAVAILABLE_ERRORS):
        return StoreUnavailable(f"session store is unavailable: {type(exc).__name__}")
    if isinstance(exc, redis.exceptions.NoPermissionError):
        # The ACL user lacks a command the store needs: no retry can succeed
        # until an operator fixes it, but the caller's request is fine.
        return StoreUnavailable("session store is unavailable: NOPERM")
    if isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(
        ("LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "READONLY", "BUSY")
    ):
        return StoreUnavailable(f"session store is unavailable: {str(exc).split()[0]}")
    return None


async def guarded(operation: Awaitable[T]) -> T:
    """Await a Redis operation, raising StoreUnavailable for failures of the store.

    Those are connection failures, timeouts, and the replies that a primary
    being down or a failover in progress produce.
    """
    try:
        return await operation
    except _CLIENT_ERRORS as exc:
        unavailable = _unavailable(exc)
        if unavailable is None:
            raise
        raise unavailable from exc


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _roles(value: Any) -> tuple[str, ...]:
    text = _text(value) if value else ""
    return tuple(role for role in text.split(",") if role)


class RedisStore:
    """A :class:`~authgrpc.store.SessionStore` on Redis, Sentinel or Redis Cluster.

    ``client`` is what :func:`connect` returns. With ``checks`` (what
    :meth:`ScriptConnection.for_url` returns for the same server), session
    checks go over that connection instead, which costs a fraction of
    redis-py's CPU per call.
    """

    def __init__(
        self,
        client: Any,
        layout: KeyLayout | None = None,
        *,
        checks: ScriptConnection | None = None,
    ):
        self.client = client
        self.keys = layout or KeyLayout()
        self._checks = checks
        self._validate_source = Script(VALIDATE_SESSION)
        self._create = client.register_script(CREATE_SESSION)
        self._validate = client.register_script(VALIDATE_SESSION)
        self._end = client.register_script(END_SESSION)
        self._end_all = client.register_script(END_ALL_SESSIONS)
        self._list = client.register_script(LIST_SESSIONS)
        self._read_refresh = client.register_script(READ_REFRESH_STATE)
        self._read_user = client.register_script(READ_USER)
        self._commit_refresh = client.register_script(COMMIT_REFRESH)
        self._replace_hash = client.register_script(REPLACE_PASSWORD_HASH)
        self._throttle_acquire = client.register_script(THROTTLE_ACQUIRE)
        self._throttle_release = client.register_script(THROTTLE_RELEASE)

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = "authgrpc", timeout: float = 1.0
    ) -> RedisStore:
        """Connect to the Redis at ``url`` (see :func:`connect` for the schemes).

        Raises ConfigurationError for a URL that cannot be parsed; the message
        leaves the URL out, since it may carry a password.
        """
        try:
            client = connect(url, timeout=timeout)
        except ConfigurationError:
            raise
        except (
            ValueError,
            TypeError,
            redis.exceptions.RedisError,
            redis.exceptions.RedisClusterException,  # not a RedisError in redis-py 8
        ) as error:
            raise ConfigurationError(f"invalid Redis URL: {error}") from None
        checks = ScriptConnection.for_url(url, timeout=timeout)
        return cls(client, KeyLayout(prefix), checks=checks)

    async def ping(self) -> None:
        await guarded(self.client.ping())

    async def close(self) -> None:
        if self._checks is not None:
            await self._checks.close()
        if isinstance(self.client, aioredis.Redis):
            # A client built on a pool it was given leaves that pool's
            # connections open unless close_connection_pool is set.
            await self.client.aclose(close_connection_pool=True)
        else:
            await self.client.aclose()

    async def create_user(
        self, username: str, password_hash: str, roles: tuple[str, ...]
    ) -> UserRecord:
        user_id = new_user_id()
        name_key = self.keys.username(username)
        if not await guarded(self.client.set(name_key, user_id, nx=True)):
            existing = await self.get_user_by_name(username)
            if existing is not None:
                raise UsernameTaken(f"user {username!r} already exists")
            # The name points at a user record that an interrupted add never wrote.
            await guarded(self.client.set(name_key, user_id))
        user = UserRecord(
            user_id,
            username,
            password_hash,
            tuple(roles),
            created_ms=await self._now_ms(),
        )
        fields = {
            "n": username,
            "r": ",".join(roles),
            "d": 0,
            "g": 0,
            "c": user.created_ms,
            "k": refresh.new_rotation_key(),
        }
        # The password key goes first, so that a user hash never exists
        # without it unless someone deletes it.
        await guarded(self.client.set(self.keys.password(user_id), password_hash))
        await guarded(self.client.hset(self.keys.user(user_id), mapping=fields))
        await guarded(self.client.sadd(self.keys.users, username))
        return user

    async def get_user(self, user_id: str) -> UserRecord | None:
        keys = [self.keys.user(user_id), self.keys.password(user_id)]
        name, roles, disabled, generation, created, password_hash = await guarded(
            self._read_user(keys=keys, args=[])
        )
        if name is None:
            return None
        # A missing password key reads as an empty hash. NOTE: PasswordHasher.verify
        # checks an empty hash against its dummy hash and returns True for the
        # dummy password, so it must reject an empty hash as it rejects None.
        return UserRecord(
            user_id=user_id,
            username=_text(name),
            password_hash=_text(password_hash or b""),
            roles=_roles(roles),
            disabled=disabled == b"1",
            generation=int(generation or 0),
            created_ms=int(created or 0),
        )

    async def get_user_by_name(self, username: str) -> UserRecord | None:
        user_id = await guarded(self.client.get(self.keys.username(username)))
        if user_id is None:
            return None
        user = await self.get_user(_text(user_id))
        return user if user is not None and user.username == username else None

    async def list_users(self) -> list[UserRecord]:
        names = sorted(
            _text(name) for name in await guarded(self.client.smembers(self.keys.users))
        )
        users = [await self.get_user_by_name(name) for name in names]
        return [user for user in users if user is not None]

    async def replace_password_hash(
        self, user_id: str, old_hash: str, new_hash: str
    ) -> bool:
        replaced = await guarded(
            self._replace_hash(
                keys=[self.keys.password(user_id)], args=[old_hash, new_hash]
            )
        )
        return bool(replaced)

    async def set_password_hash(self, user_id: str, new_hash: str) -> int:
        return await self._end_all_with(
            user_id, "", disabled="", password_hash=new_hash
        )

    async def set_disabled(self, user_id: str, disabled: bool) -> int:
        if disabled:
            return await self._end_all_with(user_id, "", disabled="1", password_hash="")
        await guarded(self.client.hset(self.keys.user(user_id), "d", 0))
        return 0

    async def set_roles(self, user_id: str, roles: tuple[str, ...]) -> None:
        await guarded(self.client.hset(self.keys.user(user_id), "r", ",".join(roles)))

    async def create_session(
        self, user: UserRecord, new: NewSession, limits: SessionLimits
    ) -> SessionRecord:
        peer, user_agent = cut_stored_text(new.peer), cut_stored_text(new.user_agent)
        for _ in range(3):
            session_id = new_session_id()
            keys = [
                self.keys.user(user.user_id),
                self.keys.session(user.user_id, session_id),
            ]
            args = [
                user.generation,
                limits.idle_ms,
                limits.absolute_ms,
                limits.max_per_user,
                new.rotation_key,
                new.refresh_hash,
                peer,
                user_agent,
                self.keys.channel,
                user.user_id,
                session_id,
                self.keys.session_prefix(user.user_id),
            ]
            result = await guarded(self._create(keys=keys, args=args))
            if result[0] == 1:
                _, now, absolute, idle, username, roles = result
                return SessionRecord(
                    session_id=session_id,
                    user_id=user.user_id,
                    username=_text(username),
                    roles=_roles(roles),
                    created_ms=int(now),
                    absolute_expiry_ms=int(absolute),
                    idle_expiry_ms=int(idle),
                    last_seen_ms=int(now),
                    peer=peer,
                    user_agent=user_agent,
                )
            if result[0] == 0:
                raise UserChanged(f"user {user.username!r} changed during login")
        # 64 random bits against at most a few live sessions of one user.
        raise StoreUnavailable("could not allocate a unique session id")

    async def validate_session(
        self, user_id: str, session_id: str, limits: SessionLimits
    ) -> SessionRecord | None:
        keys = [self.keys.session(user_id, session_id), self.keys.user(user_id)]
        args = [limits.idle_ms, limits.touch_interval_ms, session_id]
        if self._checks is not None:
            check = self._checks.run(self._validate_source, keys, args)
        else:
            check = self._validate(keys=keys, args=args)
        result = await guarded(check)
        return _validated(user_id, session_id, result)

    async def end_session(self, user_id: str, session_id: str) -> bool:
        keys = [self.keys.session(user_id, session_id), self.keys.user(user_id)]
        ended = await guarded(
            self._end(keys=keys, args=[session_id, self.keys.channel, user_id])
        )
        return bool(ended)

    async def end_all_sessions(
        self, user_id: str, keep_session_id: str | None = None
    ) -> int:
        return await self._end_all_with(
            user_id, keep_session_id or "", disabled="", password_hash=""
        )

    async def _end_all_with(
        self, user_id: str, keep: str, *, disabled: str, password_hash: str
    ) -> int:
        keys = [self.keys.user(user_id), self.keys.password(user_id)]
        args = [
            self.keys.session_prefix(user_id),
            keep,
            self.keys.channel,
            user_id,
            disabled,
            password_hash,
        ]
        return int(await guarded(self._end_all(keys=keys, args=args)))

    async def list_sessions(self, user_id: str) -> list[SessionRecord]:
        user = await self.get_user(user_id)
        if user is None:
            return []
        rows = await guarded(
            self._list(
                keys=[self.keys.user(user_id)],
                args=[self.keys.session_prefix(user_id)],
            )
        )
        records = []
        for session_id, created, absolute, last, idle, peer, agent in rows:
            records.append(
                SessionRecord(
                    session_id=_text(session_id),
                    user_id=user_id,
                    username=user.username,
                    roles=user.roles,
                    created_ms=int(created),
                    absolute_expiry_ms=int(absolute),
                    idle_expiry_ms=int(idle),
                    last_seen_ms=int(last),
                    peer=_text(peer),
                    user_agent=_text(agent),
                )
            )
        return sorted(records, key=lambda record: record.created_ms)

    async def get_refresh_state(
        self, user_id: str, session_id: str
    ) -> RefreshState | None:
        keys = [self.keys.session(user_id, session_id), self.keys.user(user_id)]
        state = await guarded(self._read_refresh(keys=keys, args=[session_id]))
        if not state:
            return None
        rotation_key, current, previous, grace = state
        return RefreshState(rotation_key, current, previous, int(grace))

    async def commit_refresh(
        self,
        user_id: str,
        session_id: str,
        presented_hash: bytes,
        new_hash: bytes,
        grace_ms: int,
        limits: SessionLimits,
    ) -> tuple[RefreshOutcome, SessionRecord | None]:
        keys = [self.keys.session(user_id, session_id), self.keys.user(user_id)]
        args = [
            presented_hash,
            new_hash,
            grace_ms,
            limits.idle_ms,
            self.keys.channel,
            user_id,
            session_id,
            presented_hash[:PREVIOUS_HASH_BYTES],
        ]
        result = await guarded(self._commit_refresh(keys=keys, args=args))
        outcome = RefreshOutcome(_text(result[0]))
        if outcome not in (RefreshOutcome.ROTATED, RefreshOutcome.REPLAYED):
            return outcome, None
        return outcome, _validated(user_id, session_id, result[1:])

    async def throttle_acquire(
        self, key: str, policy: ThrottlePolicy
    ) -> ThrottleResult:
        args = [
            policy.max_failures,
            policy.window_ms,
            policy.lockout_ms,
            policy.max_lockout_ms,
            policy.level_memory_ms,
        ]
        wait = int(
            await guarded(
                self._throttle_acquire(keys=[self.keys.throttle(key)], args=args)
            )
        )
        return ThrottleResult(wait == 0, wait)

    async def throttle_release(self, key: str) -> None:
        await guarded(self._throttle_release(keys=[self.keys.throttle(key)], args=[]))

    async def throttle_reset(self, key: str) -> bool:
        return bool(await guarded(self.client.delete(self.keys.throttle(key))))

    async def _now_ms(self) -> int:
        seconds, micros = await guarded(self.client.time())
        return int(seconds) * 1000 + int(micros) // 1000


def _validated(user_id: str, session_id: str, result: Any) -> SessionRecord | None:
    if not result:
        return None
    created, absolute, last, idle, username, roles = result[:6]
    peer, user_agent = result[6:8] if len(result) >= 8 else ("", "")
    return SessionRecord(
        session_id=session_id,
        user_id=user_id,
        username=_text(username),
        roles=_roles(roles),
        created_ms=int(created),
        absolute_expiry_ms=int(absolute),
        idle_expiry_ms=int(idle),
        last_seen_ms=int(last),
        peer=_text(peer),
        user_agent=_text(user_agent),
    )


class SyncSessionChecker:
    """Validator that checks and extends sessions from synchronous code.

    It runs the same script as RedisStore.
    """

    def __init__(self, client: redis.Redis, layout: KeyLayout | None = None):
        self.client = client
        self.keys = layout or KeyLayout()
        self._validate = client.register_script(VALIDATE_SESSION)

    def close(self) -> None:
        """Close the connections to Redis."""
        self.client.close()

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = "authgrpc", timeout: float = 1.0
    ) -> SyncSessionChecker:
        """Connect to a single Redis server or a cluster (``redis+cluster://``)."""
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(ExponentialBackoff(cap=timeout / 4, base=0.01), retries=1),
        }
        if url.startswith(("redis+cluster://", "rediss+cluster://")):
            client: Any = redis.RedisCluster.from_url(
                url.replace("+cluster", "", 1), **options
            )
        elif url.startswith("redis+sentinel://"):
            raise ConfigurationError(
                "the synchronous validator does not support Sentinel URLs; "
                "use the async one"
            )
        else:
            client = redis.Redis.from_url(url, **options)
        return cls(client, KeyLayout(prefix))

    def validate_session(
        self, user_id: str, session_id: str, limits: SessionLimits
    ) -> SessionRecord | None:
        """Return the live session, extended, or None. Raises StoreUnavailable."""
        keys = [self.keys.session(user_id, session_id), self.keys.user(user_id)]
        args: list[int | str] = [limits.idle_ms, limits.touch_interval_ms, session_id]
        try:
            result = self._validate(keys=keys, args=args)
        except _CLIENT_ERRORS as exc:
            unavailable = _unavailable(exc)
            if unavailable is None:
                raise
            raise unavailable from exc
        return _validated(user_id, session_id, result)
