"""Three `authgrpc serve` replicas sharing one Redis and one key directory.

A round-robin channel spreads calls over them, a session made on one works
and ends on every other, and a key rotation plus SIGHUP reaches all of them.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from authgrpc.errors import error_info
from authgrpc.v1 import auth_pb2, auth_pb2_grpc
from tests.conftest import RedisProcess, free_port
from tests.test_faults import AUTHGRPC, PASSWORD, ServeProcess, bearer, create_users

REPLICAS = 3


@dataclass
class Replica:
    """One server process, its metrics port and a direct channel to it."""

    server: ServeProcess
    metrics_port: int
    channel: grpc.aio.Channel
    stub: Any

    def calls_counted(self, method: str) -> float:
        """Return this replica's authgrpc_calls_total for ``method`` with status OK."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        total = 0.0
        for line in text.splitlines():
            name_matches = line.startswith("authgrpc_calls_total{")
            labels_match = f'method="{method}"' in line and 'code="OK"' in line
            if name_matches and labels_match:
                total += float(line.rsplit(" ", 1)[1])
        return total


def rotate_keys(directory: Path) -> str:
    """Run `authgrpc keys rotate --dir` and return the new active kid."""
    result = subprocess.run(
        [AUTHGRPC, "keys", "rotate", "--dir", str(directory)],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    match = re.search(r"key (\S+) to ", result.stdout)
    assert match is not None, result.stdout
    return match.group(1)


def kid_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


@pytest.fixture
async def replicas(
    tmp_path: Path, redis_process: RedisProcess
) -> AsyncIterator[list[Replica]]:
    key_directory = tmp_path / "keys"
    rotate_keys(key_directory)
    started = []
    for index in range(REPLICAS):
        metrics_port = free_port()
        server = ServeProcess(
            redis_process.url,
            key_directory,
            tmp_path / f"serve{index}.log",
            "--key-reload-interval", "0",
            "--metrics-listen", f"127.0.0.1:{metrics_port}",
        )  # fmt: skip
        started.append((server, metrics_port))
    running = []
    for server, metrics_port in started:
        server.wait_ready()
        channel = grpc.aio.insecure_channel(server.address)
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        running.append(Replica(server, metrics_port, channel, stub))
    yield running
    for replica in running:
        await replica.channel.close()
        replica.server.stop()


def login_request(name: str) -> Any:
    return auth_pb2.LoginRequest(username=name, password=PASSWORD)


async def validate_code(replica: Replica, token: str) -> tuple[grpc.StatusCode, str]:
    """Return the status and ErrorInfo reason of ValidateSession on one replica."""
    request = auth_pb2.ValidateSessionRequest(access_token=token)
    try:
        await replica.stub.ValidateSession(request, timeout=5)
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        return error.code(), info.reason if info is not None else ""
    return grpc.StatusCode.OK, ""


OK = (grpc.StatusCode.OK, "")
ENDED = (grpc.StatusCode.UNAUTHENTICATED, "SESSION_ENDED")


@pytest.mark.slow
async def test_round_robin_spreads_calls(
    replicas: list[Replica], redis_process: RedisProcess
) -> None:
    await create_users(redis_process.url, "authgrpc", 1)
    targets = ",".join(replica.server.address for replica in replicas)
    options = [("grpc.lb_policy_name", "round_robin")]
    async with grpc.aio.insecure_channel(f"ipv4:{targets}", options=options) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        await channel.channel_ready()
        login = await stub.Login(login_request("user0"), timeout=20)
        request = auth_pb2.ValidateSessionRequest(access_token=login.access_token)
        for _ in range(60):
            await stub.ValidateSession(request, timeout=5)
    counts = [replica.calls_counted("ValidateSession") for replica in replicas]

    assert sum(counts) == 60
    assert min(counts) >= 10, counts


@pytest.mark.slow
async def test_session_shared_across_replicas(
    replicas: list[Replica], redis_process: RedisProcess
) -> None:
    await create_users(redis_process.url, "authgrpc", 1)
    first, second, third = replicas
    a = await first.stub.Login(login_request("user0"), timeout=20)
    b = await second.stub.Login(login_request("user0"), timeout=20)
    a_before = [await validate_code(r, a.access_token) for r in replicas]
    b_before = [await validate_code(r, b.access_token) for r in replicas]
    listed = await third.stub.ListSessions(
        auth_pb2.ListSessionsRequest(), metadata=bearer(a.access_token), timeout=5
    )
    revoke = auth_pb2.RevokeSessionRequest(session_id=b.session.session_id)
    revoked = await third.stub.RevokeSession(
        revoke, metadata=bearer(a.access_token), timeout=5
    )
    b_after = [await validate_code(r, b.access_token) for r in replicas]
    refresh_b = auth_pb2.RefreshRequest(refresh_token=b.refresh_token)
    with pytest.raises(grpc.aio.AioRpcError) as refresh_error:
        await first.stub.Refresh(refresh_b, timeout=5)
    refreshed_a = await third.stub.Refresh(
        auth_pb2.RefreshRequest(refresh_token=a.refresh_token), timeout=5
    )
    await second.stub.Logout(
        auth_pb2.LogoutRequest(access_token=refreshed_a.access_token), timeout=5
    )
    a_after = [await validate_code(r, a.access_token) for r in replicas]

    assert a_before == [OK] * REPLICAS
    assert b_before == [OK] * REPLICAS
    assert {s.session_id for s in listed.sessions} == {
        a.session.session_id,
        b.session.session_id,
    }
    assert revoked.revoked is True
    assert b_after == [ENDED] * REPLICAS
    assert refresh_error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert a_after == [ENDED] * REPLICAS


async def wait_for_log(server: ServeProcess, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{text!r} not logged within {timeout} s:\n{server.log()}"
            )
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_key_rotation_reaches_replicas(
    replicas: list[Replica], redis_process: RedisProcess, tmp_path: Path
) -> None:
    await create_users(redis_process.url, "authgrpc", 1)
    first, second, _ = replicas
    old = await first.stub.Login(login_request("user0"), timeout=20)
    old_kid = kid_of(old.access_token)

    new_kid = rotate_keys(tmp_path / "keys")
    first.server.signal(signal.SIGHUP)
    await wait_for_log(first.server, f"keys reloaded: active kid={new_kid}")
    # Until a replica reloads, it rejects tokens that an updated replica signed.
    early = await first.stub.Login(login_request("user0"), timeout=20)
    early_on_stale = await validate_code(second, early.access_token)
    for replica in replicas[1:]:
        replica.server.signal(signal.SIGHUP)
    for replica in replicas[1:]:
        await wait_for_log(replica.server, f"keys reloaded: active kid={new_kid}")

    new_tokens = [
        (await r.stub.Login(login_request("user0"), timeout=20)).access_token
        for r in replicas
    ]
    new_kids = [kid_of(token) for token in new_tokens]
    new_results = [
        await validate_code(r, token) for token in new_tokens for r in replicas
    ]
    old_results = [await validate_code(r, old.access_token) for r in replicas]
    early_results = [await validate_code(r, early.access_token) for r in replicas]
    jwks_kids = []
    for replica in replicas:
        jwks = await replica.stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=5)
        document = json.loads(jwks.jwks_json)
        jwks_kids.append(sorted(key["kid"] for key in document["keys"]))

    assert old_kid != new_kid
    assert kid_of(early.access_token) == new_kid
    assert early_on_stale == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_BAD_SIGNATURE")
    assert new_kids == [new_kid] * REPLICAS
    assert new_results == [OK] * REPLICAS * REPLICAS
    assert old_results == [OK] * REPLICAS
    assert early_results == [OK] * REPLICAS
    assert jwks_kids == [sorted([old_kid, new_kid])] * REPLICAS
