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
import contextlib
import hashlib
import os
import socket
import weakref
from collections import deque
from typing import Any

import hiredis
import redis.exceptions
from redis.connection import parse_url

# URL fields that ScriptConnection honours. A URL with any other option
# (socket_timeout, ssl settings, protocol=3 ...) stays with redis-py.
_PLAIN_URL_FIELDS = {"host", "port", "db", "username", "password", "path"}

# Error replies after which the connection cannot run commands: the login
# was refused, or the server has no room for another client.
_AUTH_ERRORS = ("NOAUTH", "WRONGPASS")
_CONNECTION_ERRORS = ("ERR max number of clients reached",)


class ScriptConnection:
    """Runs Lua scripts by EVALSHA over one pipelined connection per event loop.

    ``timeout`` bounds the connect, the login and every reply in seconds. A
    reply that does not come within it closes the connection, and with it
    every command still waiting on that socket, since Redis replies to them
    in order. The next command connects again. An object of this class belongs
    to the event loops that use it: it is not for sharing between threads
    that run commands at the same moment.
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
        if username or password is not None:
            # The two-argument form names the user (default when the URL has
            # none), so it also works for a user without a password and for a
            # server that has none, where one-argument AUTH is an error.
            self._login.append(("AUTH", username or "default", password or ""))
        if db:
            self._login.append(("SELECT", db))
        self._pipes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pipe] = (
            weakref.WeakKeyDictionary()
        )
        self._opening: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, asyncio.Task[_Pipe]
        ] = weakref.WeakKeyDictionary()

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
        cannot be reached or does not reply in time, and ResponseError for
        an error reply. A command whose connection was lost before its reply
        came is sent once more on a new connection, so ``script`` must be
        safe to run twice, as the session check is. Both tries together
        take at most twice the timeout.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * self.timeout
        try:
            reply = await self._run_once(script, keys, args, deadline)
        except _ConnectionLost:
            if loop.time() >= deadline:
                raise redis.exceptions.TimeoutError(
                    "Timeout reading from Redis"
                ) from None
            try:
                reply = await self._run_once(script, keys, args, deadline)
            except _ConnectionLost:
                raise redis.exceptions.ConnectionError(
                    "Redis closed the connection twice in a row"
                ) from None
        if isinstance(reply, hiredis.ReplyError):
            raise _response_error(str(reply))
        return reply

    async def close(self) -> None:
        """Close every connection; a later command opens a new one.

        Commands still waiting fail with ConnectionError and are not sent
        again. A connection of an event loop that has since closed is shut
        down at the socket.
        """
        for opening in list(self._opening.values()):
            opening.cancel()
        self._opening.clear()
        pipes = list(self._pipes.items())
        self._pipes.clear()
        running = asyncio.get_running_loop()
        for loop, pipe in pipes:
            if loop is running:
                pipe.close()
                await pipe.closed
            else:
                pipe.close_from_elsewhere()

    async def _run_once(
        self, script: Script, keys: list[str], args: list[Any], deadline: float
    ) -> Any:
        reply = await self._call(
            ("EVALSHA", script.sha, len(keys), *keys, *args), deadline
        )
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            # The server restarted or ran SCRIPT FLUSH. EVAL loads it again.
            reply = await self._call(
                ("EVAL", script.source, len(keys), *keys, *args), deadline
            )
        return reply

    async def _call(self, command: tuple[Any, ...], deadline: float) -> Any:
        """Send one command and wait for its reply, until ``deadline`` at the latest."""
        loop = asyncio.get_running_loop()
        pipe = self._pipes.get(loop)
        if pipe is None or pipe.lost:
            pipe = await self._connect(loop, deadline)
        waiter = pipe.send(command)
        try:
            async with asyncio.timeout_at(min(loop.time() + self.timeout, deadline)):
                return await waiter
        except TimeoutError:
            pipe.abort()
            raise redis.exceptions.TimeoutError("Timeout reading from Redis") from None

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Pipe:
        self._forget_closed_loops()
        opening = self._opening.get(loop)
        if opening is None or opening.done():
            opening = loop.create_task(self._open(loop))
            opening.add_done_callback(_retrieve)
            self._opening[loop] = opening
        # Callers that come while the connection opens share one attempt, and
        # a caller that gives up does not cancel it for the others.
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(opening)
        except TimeoutError:
            raise redis.exceptions.TimeoutError("Timeout connecting to Redis") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if opening.cancelled() and task is not None and not task.cancelling():
                # close() stopped the attempt, and this caller was not cancelled.
                raise redis.exceptions.ConnectionError(
                    "the Redis connection was closed"
                ) from None
            raise

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Pipe:
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
            reason = os.strerror(error.errno) if error.errno else str(error)
            where = self.path or f"{self.host}:{self.port}"
            raise redis.exceptions.ConnectionError(
                f"Error connecting to Redis at {where}: {reason}"
            ) from None
        except _ConnectionLost:
            raise redis.exceptions.ConnectionError(
                "Redis closed the connection during login"
            ) from None
        self._pipes[loop] = pipe
        return pipe

    def _forget_closed_loops(self) -> None:
        for loop in [loop for loop in self._pipes if loop.is_closed()]:
            self._pipes.pop(loop).close_from_elsewhere()


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
    """The connection closed before the reply came; the command may be resent."""


def _response_error(message: str) -> redis.exceptions.RedisError:
    if message.startswith(_AUTH_ERRORS):
        # redis-py reports these as AuthenticationError, a ConnectionError,
        # so the store counts them as unavailable.
        return redis.exceptions.AuthenticationError(message)
    if message.startswith("NOPERM"):
        return redis.exceptions.NoPermissionError(message)
    if message.startswith(_CONNECTION_ERRORS):
        return redis.exceptions.ConnectionError(message.removeprefix("ERR "))
    # redis-py drops the generic prefix too.
    return redis.exceptions.ResponseError(message.removeprefix("ERR "))


class _Pipe(asyncio.Protocol):
    """The protocol of one connection: a write buffer and a queue of waiters."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._reader = hiredis.Reader()
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._outgoing: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._closed_by_owner = False
        self.lost = False
        self.closed: asyncio.Future[None] = loop.create_future()

    def send(self, command: tuple[Any, ...]) -> asyncio.Future[Any]:
        if self.lost:
            raise _ConnectionLost("connection to Redis lost")
        waiter = self._loop.create_future()
        if not self._outgoing:
            self._loop.call_soon(self._flush)
        self._outgoing.append(hiredis.pack_command(command))
        self._waiting.append(waiter)
        return waiter

    def abort(self) -> None:
        if self._transport is not None and not self.lost:
            self._transport.abort()

    def close(self) -> None:
        """Close on purpose: waiting commands fail and are not sent again."""
        self._closed_by_owner = True
        self.abort()

    def close_from_elsewhere(self) -> None:
        """Close a connection whose event loop is another than the running one."""
        self._closed_by_owner = True
        if self._loop.is_closed():
            # Its loop cannot run the transport's close any more. Shutting
            # the socket down ends the connection at once, and the garbage
            # collector releases the descriptor.
            if self._transport is not None:
                sock = self._transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
            return
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.abort)

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if self._transport is not None and not self.lost:
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
        self.lost = True
        self._outgoing.clear()
        while self._waiting:
            waiter = self._waiting.popleft()
            if waiter.done():
                continue
            if self._closed_by_owner:
                waiter.set_exception(
                    redis.exceptions.ConnectionError("the Redis connection was closed")
                )
            else:
                waiter.set_exception(_ConnectionLost("connection to Redis lost"))
        if not self.closed.done():
            self.closed.set_result(None)
