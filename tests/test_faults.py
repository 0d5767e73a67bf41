"""Faults around a real `authgrpc serve`: Redis stopped, frozen, restarted or evicting.

The server itself is also stopped with SIGTERM and killed with SIGKILL.
Every server here is a subprocess started with the real command line, and
every Redis is a private redis-server on a free loopback port. Each load loop
is bounded in time and in count.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import argon2
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authgrpc.errors import error_info
from authgrpc.redis_store import RedisStore
from authgrpc.v1 import auth_pb2, auth_pb2_grpc
from tests.conftest import RedisProcess, free_port

AUTHGRPC = str(Path(sys.executable).parent / "authgrpc")
PASSWORD = "correct horse battery"
OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

_password_hash: list[str] = []


def password_hash() -> str:
    """Return a hash of PASSWORD with the argon2 parameters that the server uses."""
    if not _password_hash:
        _password_hash.append(argon2.PasswordHasher().hash(PASSWORD))
    return _password_hash[0]


def generate_key(path: Path) -> Path:
    """Write a signing key with `authgrpc keys generate` and return its path."""
    subprocess.run(
        [AUTHGRPC, "keys", "generate", "--out", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return path


def clean_env() -> dict[str, str]:
    """Return the environment without AUTHGRPC_* variables, so that only flags apply."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AUTHGRPC_")}


class ServeProcess:
    """An `authgrpc serve` subprocess on a free loopback port, logging to a file."""

    def __init__(
        self,
        redis_url: str,
        signing_key: Path,
        log_path: Path,
        *extra: str,
        prefix: str = "authgrpc",
        grace_period: float = 2.0,
    ):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [
            AUTHGRPC, "serve",
            "--listen", self.address,
            "--redis-url", redis_url,
            "--redis-prefix", prefix,
            "--signing-key", str(signing_key),
            "--grace-period", str(grace_period),
            *extra,
        ]  # fmt: skip
        self._log: IO[str] = log_path.open("w")
        self.process = subprocess.Popen(
            command, env=clean_env(), stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 20) -> None:
        """Wait until the server's health Check returns SERVING."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"authgrpc serve exited with {self.process.returncode}:\n"
                        + self.log()
                    )
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"authgrpc serve was not SERVING after {timeout} s:\n"
                        + self.log()
                    )
                time.sleep(0.05)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self) -> int:
        """Send SIGTERM (SIGKILL after 15 s) and return the server's exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return self.process.returncode


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


async def create_users(redis_url: str, prefix: str, count: int) -> list[str]:
    """Create users user0, user1, ... with PASSWORD in Redis; return their names."""
    store = RedisStore.from_url(redis_url, prefix=prefix)
    names = [f"user{i}" for i in range(count)]
    try:
        for name in names:
            await store.create_user(name, password_hash(), ("reader",))
    finally:
        await store.close()
    return names


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@dataclass
class CallResult:
    """One finished call: its kind, start and end (monotonic seconds), and status."""

    kind: str
    started: float
    ended: float
    code: grpc.StatusCode
    reason: str = ""


async def timed_call(kind: str, call: Any) -> tuple[CallResult, Any]:
    """Await ``call``; return its CallResult and its response (None on failure)."""
    started = time.monotonic()
    try:
        response = await call
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        reason = info.reason if info is not None else ""
        return CallResult(kind, started, time.monotonic(), error.code(), reason), None
    return CallResult(kind, started, time.monotonic(), OK), response


@pytest.fixture
def signing_key(tmp_path: Path) -> Path:
    return generate_key(tmp_path / "signing.pem")


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis of this test's own that fsyncs its AOF on every write."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisProcess(
        directory, free_port(), "--appendonly", "yes", "--appendfsync", "always"
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def channel_factory() -> AsyncIterator[Any]:
    channels: list[grpc.aio.Channel] = []

    def open_channel(address: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(address)
        channels.append(channel)
        return channel

    yield open_channel
    for channel in channels:
        await channel.close()


def login_request(name: str) -> Any:
    return auth_pb2.LoginRequest(username=name, password=PASSWORD)


@pytest.mark.slow
async def test_redis_stop_then_recover(
    tmp_path: Path,
    private_redis: RedisProcess,
    signing_key: Path,
    channel_factory: Any,
) -> None:
    names = await create_users(private_redis.url, "authgrpc", 6)
    server = ServeProcess(
        private_redis.url,
        signing_key,
        tmp_path / "serve.log",
        "--redis-timeout", "0.5",
        "--login-max-failures", "1000",
    )  # fmt: skip
    server.wait_ready()
    channel = channel_factory(server.address)
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    tokens = [
        (await stub.Login(login_request(n), timeout=20)).access_token for n in names
    ]
    deadline = 2.0
    results: list[CallResult] = []
    health_samples: list[tuple[float, Any]] = []
    done = asyncio.Event()

    async def validate_loop(index: int) -> None:
        token = tokens[index % len(tokens)]
        while not done.is_set():
            request = auth_pb2.ValidateSessionRequest(access_token=token)
            result, _ = await timed_call(
                "validate", stub.ValidateSession(request, timeout=deadline)
            )
            results.append(result)
            await asyncio.sleep(0.01)

    async def login_loop(index: int) -> None:
        while not done.is_set():
            result, _ = await timed_call(
                "login", stub.Login(login_request(names[index]), timeout=deadline)
            )
            results.append(result)
            await asyncio.sleep(0.05)

    async def health_loop() -> None:
        while not done.is_set():
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                health_samples.append((time.monotonic(), reply.status))
            except grpc.aio.AioRpcError as error:
                health_samples.append((time.monotonic(), error.code()))
            await asyncio.sleep(0.1)

    workers = [asyncio.create_task(validate_loop(i)) for i in range(16)]
    workers += [asyncio.create_task(login_loop(i)) for i in range(3)]
    workers.append(asyncio.create_task(health_loop()))
    await asyncio.sleep(1.5)
    stop_began = time.monotonic()
    await asyncio.to_thread(private_redis.stop)
    stopped = time.monotonic()
    await asyncio.sleep(4)
    start_began = time.monotonic()
    await asyncio.to_thread(private_redis.start)
    started = time.monotonic()
    await asyncio.sleep(5)
    done.set()
    await asyncio.gather(*workers)
    assert server.stop() == 0

    codes = {result.code for result in results}
    down = [r for r in results if r.started > stopped and r.ended < start_began]
    down_codes = {r.code for r in down}
    down_reasons = {r.reason for r in down}
    slowest = max(r.ended - r.started for r in results)
    recovered_validate = min(
        r.ended
        for r in results
        if r.kind == "validate" and r.code == OK and r.started > started
    )
    recovered_login = min(
        r.ended
        for r in results
        if r.kind == "login" and r.code == OK and r.started > started
    )
    down_health = {
        status for t, status in health_samples if stopped + 2.5 < t < start_began
    }
    first_serving = min(
        t for t, status in health_samples if t > started and status == SERVING
    )
    tail = [r for r in results if r.started > started + 3]
    tail_codes = {r.code for r in tail}
    early_ok = [r for r in results if r.code == OK and r.ended < stop_began]

    assert codes <= {OK, UNAVAILABLE}, codes
    assert len(down) >= 20
    assert down_codes == {UNAVAILABLE}
    assert down_reasons == {"STORE_UNAVAILABLE"}
    assert slowest < deadline
    assert len(early_ok) > 50
    assert down_health == {NOT_SERVING}
    assert first_serving - started < 3
    assert recovered_validate - started < 3
    assert recovered_login - started < 3
    assert len(tail) > 50
    assert tail_codes == {OK}
    assert stop_began < stopped
    log = (tmp_path / "serve.log").read_text()
    assert "failed: session store is unavailable: ConnectionError (" in log
    assert "Connection refused" in log


@pytest.mark.slow
async def test_redis_frozen_then_thawed(
    tmp_path: Path, redis_process: RedisProcess, signing_key: Path, channel_factory: Any
) -> None:
    names = await create_users(redis_process.url, "authgrpc", 4)
    server = ServeProcess(
        redis_process.url,
        signing_key,
        tmp_path / "serve.log",
        "--redis-timeout", "0.5",
        "--login-max-failures", "1000",
    )  # fmt: skip
    server.wait_ready()
    stub = auth_pb2_grpc.AuthServiceStub(channel_factory(server.address))
    tokens = [
        (await stub.Login(login_request(n), timeout=20)).access_token for n in names
    ]
    concurrency = 20

    async def validate_round(timeout: float) -> list[CallResult]:
        calls = []
        for i in range(concurrency):
            request = auth_pb2.ValidateSessionRequest(
                access_token=tokens[i % len(tokens)]
            )
            calls.append(
                timed_call("validate", stub.ValidateSession(request, timeout=timeout))
            )
        calls += [
            timed_call("login", stub.Login(login_request(n), timeout=timeout))
            for n in names[:2]
        ]
        return [result for result, _ in await asyncio.gather(*calls)]

    async def sample(count: int) -> tuple[int, int]:
        threads, fds = [], []
        for _ in range(count):
            await asyncio.sleep(0.3)
            threads.append(thread_count(server.pid))
            fds.append(fd_count(server.pid))
        return max(threads), max(fds)

    for _ in range(3):
        await validate_round(5)
    threads_before, fds_before = await sample(4)

    redis_process.freeze()
    frozen: list[CallResult] = []
    try:
        for _ in range(5):
            frozen += await validate_round(0.5)
    finally:
        redis_process.thaw()

    recovered = None
    recovery_deadline = time.monotonic() + 10
    while recovered is None and time.monotonic() < recovery_deadline:
        results = await validate_round(2)
        if {r.code for r in results} == {OK}:
            recovered = time.monotonic()
    for _ in range(3):
        await validate_round(5)
    threads_after, fds_after = await sample(4)
    threads_later, fds_later = await sample(4)
    final = await validate_round(5)
    assert server.stop() == 0

    frozen_codes = {r.code for r in frozen}
    frozen_slowest = max(r.ended - r.started for r in frozen)

    assert frozen_codes == {UNAVAILABLE}
    assert frozen_slowest < 0.5
    assert recovered is not None
    # A thread made per frozen call would show here; the pool of Redis
    # connections may grow by at most one connection per concurrent call.
    assert threads_after <= threads_before
    assert threads_later <= threads_before
    assert fds_after <= fds_before + concurrency + 2
    assert fds_later <= fds_after
    assert {r.code for r in final} == {OK}


@pytest.mark.slow
async def test_redis_restart_keeps_sessions(
    tmp_path: Path, private_redis: RedisProcess, signing_key: Path, channel_factory: Any
) -> None:
    names = await create_users(private_redis.url, "authgrpc", 3)
    server = ServeProcess(
        private_redis.url, signing_key, tmp_path / "serve.log", "--redis-timeout", "0.5"
    )
    server.wait_ready()
    stub = auth_pb2_grpc.AuthServiceStub(channel_factory(server.address))
    logins = [await stub.Login(login_request(name), timeout=20) for name in names * 2]
    live, revoked = logins[::2], logins[1::2]
    for login in revoked:
        await stub.Logout(
            auth_pb2.LogoutRequest(access_token=login.access_token), timeout=5
        )

    # SIGKILL gives Redis no chance to flush: only appendfsync always keeps every write.
    assert private_redis.process is not None
    private_redis.process.kill()
    private_redis.process.wait(10)
    private_redis.start()

    async def validate(token: str) -> CallResult:
        request = auth_pb2.ValidateSessionRequest(access_token=token)
        result, _ = await timed_call(
            "validate", stub.ValidateSession(request, timeout=2)
        )
        return result

    first_ok = None
    deadline = time.monotonic() + 10
    while first_ok is None and time.monotonic() < deadline:
        if (await validate(live[0].access_token)).code == OK:
            first_ok = time.monotonic()
        else:
            await asyncio.sleep(0.1)
    live_results = [await validate(login.access_token) for login in live]
    revoked_results = [await validate(login.access_token) for login in revoked]
    refreshed, _ = await timed_call(
        "refresh",
        stub.Refresh(
            auth_pb2.RefreshRequest(refresh_token=live[1].refresh_token), timeout=5
        ),
    )
    assert server.stop() == 0

    assert first_ok is not None
    assert [r.code for r in live_results] == [OK] * len(live)
    assert [r.code for r in revoked_results] == [grpc.StatusCode.UNAUTHENTICATED] * len(
        revoked
    )
    assert {r.reason for r in revoked_results} == {"SESSION_ENDED"}
    assert refreshed.code == OK


@pytest.mark.slow
async def test_sigterm_drains_in_flight(
    tmp_path: Path, redis_process: RedisProcess, signing_key: Path
) -> None:
    names = await create_users(redis_process.url, "authgrpc", 8)
    grace = 5.0
    server = ServeProcess(
        redis_process.url,
        signing_key,
        tmp_path / "serve.log",
        "--login-max-failures", "1000",
        grace_period=grace,
    )  # fmt: skip
    server.wait_ready()
    channel = grpc.aio.insecure_channel(server.address)
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(), timeout=30
    )
    statuses: list[tuple[float, Any]] = []

    async def read_watch() -> None:
        try:
            async for reply in watch:
                statuses.append((time.monotonic(), reply.status))
        except grpc.aio.AioRpcError as error:
            statuses.append((time.monotonic(), error.code()))

    reader = asyncio.create_task(read_watch())
    while not statuses:
        await asyncio.sleep(0.01)
    # A Login costs 0.1 to 0.3 s of argon2 (measured on two cores), and the
    # server hashes on one thread per core but one, so eight take over a second.
    # SIGTERM comes only after 0.5 s, because a call that the server has
    # received but not yet dispatched to a handler is CANCELLED by gRPC on
    # shutdown.
    in_flight = [
        asyncio.create_task(
            timed_call("login", stub.Login(login_request(n), timeout=20))
        )
        for n in names
    ]
    await asyncio.sleep(0.5)
    sigterm_at = time.monotonic()
    server.signal(signal.SIGTERM)

    while (
        not any(status == NOT_SERVING for _, status in statuses)
        and time.monotonic() < sigterm_at + 5
    ):
        await asyncio.sleep(0.01)
    not_serving_at = next((t for t, status in statuses if status == NOT_SERVING), None)
    await asyncio.sleep(0.2)
    late_channel = grpc.aio.insecure_channel(server.address)
    late_stub = auth_pb2_grpc.AuthServiceStub(late_channel)
    late = [
        await timed_call(
            "validate",
            late_stub.ValidateSession(
                auth_pb2.ValidateSessionRequest(access_token="x"), timeout=3
            ),
        )
        for _ in range(3)
    ]
    late_on_old_channel = await timed_call(
        "login", stub.Login(login_request(names[0]), timeout=3)
    )
    drained = [result for result, _ in await asyncio.gather(*in_flight)]
    exit_status = await asyncio.to_thread(server.process.wait, grace + 10)
    exited_at = time.monotonic()
    await reader
    await late_channel.close()
    await channel.close()
    log = server.log()

    assert not_serving_at is not None
    assert len([r for r in drained if r.ended > sigterm_at]) >= 2
    assert not_serving_at < max(r.ended for r in drained)
    assert [r.code for r in drained] == [OK] * len(drained)
    assert [r.code for r, _ in late] == [UNAVAILABLE] * len(late)
    assert max(r.ended - r.started for r, _ in late) < 2
    assert late_on_old_channel[0].code == UNAVAILABLE
    assert exit_status == 0
    # The open Watch stream keeps the server running for the whole grace period.
    assert exited_at - sigterm_at < grace + 3
    assert "shutdown requested" in log
    assert "server stopped" in log
    assert "Traceback" not in log


def _session_key_parts(key: str, prefix: str) -> tuple[str, str] | None:
    """Return (user_id, session_id) of a key ``prefix:{u:<id>}:s:<sid>``, else None."""
    head = f"{prefix}:{{u:"
    if not key.startswith(head) or "}:s:" not in key:
        return None
    user_id, _, session_id = key[len(head) :].partition("}:s:")
    return user_id, session_id


@pytest.mark.slow
async def test_sigkill_leaves_consistent_redis(
    tmp_path: Path, redis_process: RedisProcess, signing_key: Path
) -> None:
    prefix = "authgrpc"
    names = await create_users(redis_process.url, prefix, 6)
    rng = random.Random(7)
    calls = 0

    async def churn(stub: Any, name: str, stop: asyncio.Event) -> None:
        nonlocal calls
        while not stop.is_set():
            try:
                login = await stub.Login(login_request(name), timeout=5)
                access, refresh = login.access_token, login.refresh_token
                calls += 1
                for _ in range(rng.randint(1, 4)):
                    validate = auth_pb2.ValidateSessionRequest(access_token=access)
                    await stub.ValidateSession(validate, timeout=5)
                    request = auth_pb2.RefreshRequest(refresh_token=refresh)
                    refreshed = await stub.Refresh(request, timeout=5)
                    access, refresh = refreshed.access_token, refreshed.refresh_token
                    calls += 2
                choice = rng.random()
                if choice < 0.5:
                    logout = auth_pb2.LogoutRequest(access_token=access)
                    await stub.Logout(logout, timeout=5)
                    calls += 1
                elif choice < 0.6:
                    await stub.LogoutAll(
                        auth_pb2.LogoutAllRequest(keep_current=True),
                        metadata=bearer(access),
                        timeout=5,
                    )
                    calls += 1
            except grpc.aio.AioRpcError:
                return

    for round_number in range(6):
        server = ServeProcess(
            redis_process.url,
            signing_key,
            tmp_path / f"serve{round_number}.log",
            "--login-max-failures", "1000",
        )  # fmt: skip
        server.wait_ready()
        stop = asyncio.Event()
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            tasks = [asyncio.create_task(churn(stub, name, stop)) for name in names]
            await asyncio.sleep(1.0 + rng.random() * 0.6)
            server.signal(signal.SIGKILL)
            server.process.wait(10)
            stop.set()
            await asyncio.gather(*tasks)
        server.stop()

    client = redis_process.client()
    keys = [key.decode() for key in client.keys(f"{prefix}:*")]
    sessions = [parts for key in keys if (parts := _session_key_parts(key, prefix))]
    session_ttls = [client.pttl(f"{prefix}:{{u:{u}}}:s:{s}") for u, s in sessions]
    unindexed = [
        (u, s)
        for u, s in sessions
        if client.hget(f"{prefix}:{{u:{u}}}:user", s) is None
    ]
    permanent = {f"{prefix}:users"}
    for key in keys:
        if key.endswith((":user", ":pw")) or key.startswith(f"{prefix}:{{n:"):
            permanent.add(key)
    without_ttl = sorted(
        key for key in keys if key not in permanent and client.pttl(key) < 0
    )
    user_ids = {
        key[len(prefix) + 4 : -len("}:user")] for key in keys if key.endswith(":user")
    }
    dangling = []
    for user_id in user_ids:
        index = client.hkeys(f"{prefix}:{{u:{user_id}}}:user")
        for session_id in (field for field in index if len(field) > 1):
            if not client.exists(f"{prefix}:{{u:{user_id}}}:s:{session_id.decode()}"):
                dangling.append((user_id, session_id.decode()))
    store = RedisStore.from_url(redis_process.url, prefix=prefix)
    listed_gone = []
    try:
        for user_id in user_ids:
            for record in await store.list_sessions(user_id):
                if not client.exists(f"{prefix}:{{u:{user_id}}}:s:{record.session_id}"):
                    listed_gone.append((user_id, record.session_id))
    finally:
        await store.close()
    client.close()

    assert calls >= 20
    assert len(sessions) >= 3
    assert all(ttl > 0 for ttl in session_ttls)
    assert unindexed == []
    # Nothing expires within this test's default lifetimes, and every script
    # that deletes a session key also removes its index entry.
    assert dangling == []
    assert listed_gone == []
    assert without_ttl == []
    assert len(user_ids) == len(names)


async def test_evicting_redis_warns(tmp_path: Path, signing_key: Path) -> None:
    directory = tmp_path / "redis"
    directory.mkdir()
    evicting = RedisProcess(directory, None, "--maxmemory-policy", "allkeys-lru")
    evicting.start()
    try:
        server = ServeProcess(evicting.url, signing_key, tmp_path / "serve.log")
        server.wait_ready()
        exit_status = server.stop()
        rejected = subprocess.run(
            [
                AUTHGRPC, "serve",
                "--listen", f"127.0.0.1:{free_port()}",
                "--redis-url", evicting.url,
                "--signing-key", str(signing_key),
                "--refuse-evicting-redis",
            ],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
    finally:
        evicting.stop()
    log = server.log()

    assert exit_status == 0
    assert "WARNING authgrpc.server: Redis maxmemory-policy is allkeys-lru" in log
    assert "set it to noeviction" in log
    assert rejected.returncode == 2
    assert "authgrpc: error: Redis maxmemory-policy is allkeys-lru" in rejected.stderr
    assert "Traceback" not in rejected.stderr
