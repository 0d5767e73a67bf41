"""A pipelined asyncio connection to one Redis server, for the session check.

Every call of every protected service runs VALIDATE_SESSION, and redis-py's
asyncio client spends about 100 us of CPU on each command it sends: the pool
checkout, the retry wrapper, the health check, the command packing and the
reply callbacks. :class:`ScriptConnection` sends that one script over a
single socket per event loop instead. Commands are written in the order they
come, the writes of one event-loop turn leave in one send, hiredis parses
the replies, and each reply goes to the oldest waiting caller. That costs
about 20 us per command.

It speaks RESP2 to a plain ``redis://`` or ``unix://`` server, with AUTH and
SELECT. For anything else (TLS, Sentinel, Cluster, URL options) the store
keeps using redis-py, which handles them. Its failures are redis-py's
exception types, so :func:`authgrpc.redis_store.guarded` maps them the same
way.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from typing import Any

import hiredis
import redis.exceptions
from redis.connection import parse_url

# URL fields that ScriptConnection honours. A URL with any other option
# (socket_timeout, ssl settings, protocol=3 ...) stays with redis-py.
_PLAIN_URL_FIELDS = {"host", "port", "db", "username", "password", "path"}

# Replies that mean the connection cannot run commands until it logs in again.
_AUTH_ERRORS = ("NOAUTH", "WRONGPASS", "NOPERM")


class ScriptConnection:
    """Runs Lua scripts by EVALSHA over one pipelined connection per event loop.

    ``timeout`` bounds the connect, the login and every reply in seconds. A
    reply that does not come within it closes the connection, and with it
    every command still waiting on that socket, since Redis answers them in
    order. The next command connects again.
    """

    def __init__(
        self,
        *,
        host: str = "localhost",
        port: int = 6379,
        path: str | None = None,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        timeout: float = 1.0,
    ):
        self.host = host
        self.port = port
        self.path = path
        self.timeout = timeout
        self._login: list[tuple[Any, ...]] = []
        if password is not None:
            if username:
                self._login.append(("AUTH", username, password))
            else:
                self._login.append(("AUTH", password))
        if db:
            self._login.append(("SELECT", db))
        self._pipe: _Pipe | None = None
        self._opening: asyncio.Task[_Pipe] | None = None

    @classmethod
    def for_url(cls, url: str, *, timeout: float = 1.0) -> ScriptConnection | None:
        """Return a connection for a plain ``redis://`` or ``unix://`` URL, or None."""
        if not url.startswith(("redis://", "unix://")):
            return None
        try:
            fields = parse_url(url)  # type: ignore[no-untyped-call]
        except (ValueError, TypeError):
            return None
        fields.pop("connection_class", None)
        if not set(fields) <= _PLAIN_URL_FIELDS:
            return None
        return cls(
            host=fields.get("host") or "localhost",
            port=int(fields.get("port") or 6379),
            path=fields.get("path"),
            username=fields.get("username"),
            password=fields.get("password"),
            db=int(fields.get("db") or 0),
            timeout=timeout,
        )

    async def run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """Run ``script`` and return its reply, as redis-py would with hiredis.

        Raises redis.exceptions.ConnectionError or TimeoutError when Redis
        cannot be reached or does not answer in time, and ResponseError for
        an error reply. A command whose connection was lost before its reply
        came is sent once more on a new connection: the session check is
        safe to repeat.
        """
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            reply = await self._call(command)
        except _ConnectionLost:
            reply = await self._call(command)
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            # The server restarted or ran SCRIPT FLUSH. EVAL loads it again.
            reply = await self._call(("EVAL", script.source, len(keys), *keys, *args))
        if isinstance(reply, hiredis.ReplyError):
            raise _response_error(str(reply))
        return reply

    async def close(self) -> None:
        """Close the connection; a later command opens a new one."""
        pipe, self._pipe = self._pipe, None
        if self._opening is not None:
            self._opening.cancel()
            self._opening = None
        if pipe is not None:
            pipe.abort()
            await pipe.closed

    async def _call(self, command: tuple[Any, ...]) -> Any:
        pipe = self._pipe
        if pipe is None or not pipe.usable():
            pipe = await self._connect()
        waiter = pipe.send(command)
        try:
            async with asyncio.timeout(self.timeout):
                return await waiter
        except TimeoutError:
            pipe.abort()
            raise redis.exceptions.TimeoutError("Timeout reading from Redis") from None

    async def _connect(self) -> _Pipe:
        loop = asyncio.get_running_loop()
        opening = self._opening
        if opening is None or opening.done() or opening.get_loop() is not loop:
            opening = self._opening = loop.create_task(self._open())
            opening.add_done_callback(_retrieve)
        # Callers that come while the connection opens share one attempt; a
        # caller that gives up does not cancel it for the others.
        return await asyncio.shield(opening)

    async def _open(self) -> _Pipe:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                if self.path is not None:
                    _, pipe = await loop.create_unix_connection(
                        lambda: _Pipe(loop), self.path
                    )
                else:
                    _, pipe = await loop.create_connection(
                        lambda: _Pipe(loop), self.host, self.port
                    )
                try:
                    for command in self._login:
                        reply = await pipe.send(command)
                        if isinstance(reply, hiredis.ReplyError):
                            raise _response_error(str(reply))
                except BaseException:
                    pipe.abort()
                    raise
        except TimeoutError:
            raise redis.exceptions.TimeoutError("Timeout connecting to Redis") from None
        except OSError as error:
            raise redis.exceptions.ConnectionError(
                f"Error connecting to Redis: {error.strerror or type(error).__name__}"
            ) from None
        except _ConnectionLost:
            raise redis.exceptions.ConnectionError(
                "Redis closed the connection during login"
            ) from None
        self._pipe = pipe
        return pipe


class Script:
    """A Lua script and its SHA1 digest, the name EVALSHA runs it by."""

    def __init__(self, source: str):
        self.source = source
        # SHA1 is what Redis names scripts by, not a security measure.
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


def _retrieve(task: asyncio.Task[_Pipe]) -> None:
    # Marks the failure as seen when every caller that waited gave up first.
    if not task.cancelled():
        task.exception()


class _ConnectionLost(redis.exceptions.ConnectionError):
    """The connection closed before the reply came."""


def _response_error(message: str) -> redis.exceptions.RedisError:
    if message.startswith(_AUTH_ERRORS):
        # redis-py reports these as AuthenticationError, a ConnectionError,
        # so the store counts them as unavailable.
        return redis.exceptions.AuthenticationError(message)
    return redis.exceptions.ResponseError(message)


class _Pipe(asyncio.Protocol):
    """The protocol of one connection: a write buffer and a queue of waiters."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._reader = hiredis.Reader()
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._outgoing: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._lost = False
        self.closed: asyncio.Future[None] = loop.create_future()

    def usable(self) -> bool:
        return not self._lost and asyncio.get_running_loop() is self._loop

    def send(self, command: tuple[Any, ...]) -> asyncio.Future[Any]:
        if self._lost:
            raise _ConnectionLost("connection to Redis lost")
        waiter = self._loop.create_future()
        if not self._outgoing:
            self._loop.call_soon(self._flush)
        self._outgoing.append(hiredis.pack_command(command))
        self._waiting.append(waiter)
        return waiter

    def abort(self) -> None:
        if self._transport is not None and not self._lost:
            self._transport.abort()

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if self._transport is not None and not self._lost:
            self._transport.write(b"".join(outgoing))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                if not self._waiting:
                    raise hiredis.ProtocolError("reply without a command")
                waiter = self._waiting.popleft()
                if not waiter.done():
                    waiter.set_result(reply)
        except hiredis.ProtocolError:
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._outgoing.clear()
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(_ConnectionLost("connection to Redis lost"))
        if not self.closed.done():
            self.closed.set_result(None)
