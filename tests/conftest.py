"""Shared fixtures: real redis-server processes on free loopback ports, and key sets."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from authgrpc.keys import KeySet, SigningKey, generate_private_key, key_id

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisProcess:
    """A redis-server child process that a test can stop, start, freeze and thaw."""

    def __init__(self, directory: Path, port: int | None = None, *extra: str):
        self.directory = directory
        self.port = port or free_port()
        self.extra = list(extra)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(
            port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5
        )
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
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Return the test session's Redis: AUTHGRPC_TEST_REDIS_URL, or one of our own."""
    configured = os.environ.get("AUTHGRPC_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis of this test's own, which the test may stop, restart or freeze."""
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """Return a key prefix unique to the test, so tests sharing a Redis never clash."""
    return f"t{abs(hash(request.node.nodeid)) % 10**10}{os.getpid()}"


def make_keys(algorithm: str = "EdDSA") -> KeySet:
    """Return a fresh in-memory key set for ``algorithm``."""
    key = generate_private_key(algorithm)
    kid = key_id(key, algorithm)
    signing = SigningKey(kid, algorithm, key)
    return KeySet(algorithm, {kid: signing.verification_key}, signing)


@pytest.fixture(scope="session")
def keys() -> KeySet:
    return make_keys()
