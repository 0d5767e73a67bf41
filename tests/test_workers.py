"""`authgrpc serve --workers N`: processes on one port, supervised as a group."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from authgrpc.v1 import auth_pb2, auth_pb2_grpc
from tests.conftest import free_port

AUTHGRPC = str(Path(sys.executable).parent / "authgrpc")
PASSWORD = "a long passphrase"


@pytest.fixture
def env(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    key = tmp_path / "signing.pem"
    environment = {
        **os.environ,
        "AUTHGRPC_REDIS_URL": redis_url,
        "AUTHGRPC_REDIS_PREFIX": prefix,
        "AUTHGRPC_SIGNING_KEY": str(key),
    }
    subprocess.run(
        [AUTHGRPC, "keys", "generate", "--out", str(key)], env=environment, check=True
    )
    subprocess.run(
        [AUTHGRPC, "user", "add", "alice", "--password-stdin"],
        env=environment,
        input=PASSWORD,
        text=True,
        check=True,
    )
    yield environment
    import redis

    client = redis.Redis.from_url(redis_url)
    for name in client.scan_iter(match=f"{prefix}:*"):
        client.delete(name)


def start(env: dict[str, str], workers: int) -> tuple[subprocess.Popen[str], str]:
    address = f"127.0.0.1:{free_port()}"
    command = [
        AUTHGRPC,
        "serve",
        "--workers",
        str(workers),
        "--listen",
        address,
        "--grace-period",
        "2",
    ]
    process = subprocess.Popen(
        command, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    RUNNING.append(process)
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
    finally:
        channel.close()
    return process, address


RUNNING: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def stop_leftovers() -> Iterator[None]:
    """Kill every supervisor and worker a failed test left running."""
    yield
    while RUNNING:
        process = RUNNING.pop()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def worker_pids(log: str) -> set[str]:
    return set(re.findall(r"authgrpc\.service\[(\d+)\]: login succeeded", log))


def test_workers_share_port(env: dict[str, str]) -> None:
    process, address = start(env, 2)
    time.sleep(2)  # let the second worker bind before connections are spread
    try:
        for _ in range(30):
            with grpc.insecure_channel(address) as channel:
                stub = auth_pb2_grpc.AuthServiceStub(channel)
                stub.Login(
                    auth_pb2.LoginRequest(username="alice", password=PASSWORD),
                    timeout=10,
                )
    finally:
        process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=30)

    assert process.returncode == 0, log
    assert len(worker_pids(log)) == 2, log
    assert "all workers stopped" in log


def test_dead_worker_stops_group(env: dict[str, str]) -> None:
    process, _ = start(env, 2)
    assert process.stderr is not None
    started = ""
    while "workers started" not in started:
        started = process.stderr.readline()
        assert started, "the supervisor exited before starting its workers"
    pids = re.search(r"pids=([\d,]+)", started)
    assert pids is not None

    os.kill(int(pids.group(1).split(",")[0]), signal.SIGKILL)
    _, log = process.communicate(timeout=30)

    assert process.returncode == 1
    assert "worker exited unasked" in log


def test_workers_need_redis(env: dict[str, str]) -> None:
    without_redis = {k: v for k, v in env.items() if k != "AUTHGRPC_REDIS_URL"}

    result = subprocess.run(
        [AUTHGRPC, "serve", "--dev", "--workers", "2", "--listen", "127.0.0.1:50999"],
        env=without_redis,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 2
    assert "needs --redis-url" in result.stderr


def test_orphaned_workers_stop(env: dict[str, str]) -> None:
    process, _ = start(env, 2)
    assert process.stderr is not None
    started = ""
    while "workers started" not in started:
        started = process.stderr.readline()
        assert started, "the supervisor exited before starting its workers"
    pids = re.search(r"pids=([\d,]+)", started)
    assert pids is not None

    process.kill()
    process.wait(10)
    deadline = time.monotonic() + 15
    alive = [int(pid) for pid in pids.group(1).split(",")]
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _running(pid)]
        time.sleep(0.2)

    assert alive == []


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_second_group_on_port_refused(env: dict[str, str]) -> None:
    process, address = start(env, 2)
    try:
        second = subprocess.run(
            [AUTHGRPC, "serve", "--workers", "2", "--listen", address],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=30)

    assert second.returncode == 2, second.stderr
    assert f"cannot listen on {address}: the address is in use" in second.stderr
    assert "Traceback" not in second.stderr
    assert process.returncode == 0, log
