"""Real Redis topologies on 127.0.0.1: a cluster, a Sentinel setup, an AOF server.

Every process listens on 127.0.0.1 only, on a free port, and keeps its files
in a directory that the caller passes in. Only AofServer persists data.
Each class has ``start()`` and ``stop()``. ``stop()`` is safe to call more
than once and after a failed ``start()``, so fixtures can call it from a
finalizer.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
HOST = "127.0.0.1"
SERVICE = "authgrpc"


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_port(bus: bool = False) -> int:
    """Return a free TCP port on 127.0.0.1, with port + 10000 free too if ``bus``.

    A cluster node also listens on port + 10000 for the cluster bus, so it
    needs both. Another process may still take the port before the server
    binds it. The server then exits, and ``Server.start`` raises RuntimeError.
    """
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if not bus:
            return port
        if port + 10000 <= 65535 and _port_is_free(port + 10000):
            return port
    raise RuntimeError("found no free port pair for a cluster node")


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, step: float = 0.05
) -> None:
    """Call ``condition`` until it returns true, for at most ``timeout`` seconds.

    Redis errors raised by ``condition`` count as "not yet". Raises
    RuntimeError when the time runs out.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (redis.exceptions.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def wait_replicated(
    primary: Server, replicas: list[Server], timeout: float = 5
) -> None:
    """Wait until ``replicas`` have applied all that ``primary`` has written so far.

    WAIT only covers the writes of the connection that sends it, but a
    client spreads its writes over a pool of connections. So this compares
    replication offsets instead. A replica's ``master_repl_offset`` is how
    much of its primary's replication stream it has applied.
    """
    with primary.client() as client:
        target = int(client.info("replication")["master_repl_offset"])
    for replica in replicas:
        with replica.client() as client:

            def caught_up(client: redis.Redis = client) -> bool:
                info = client.info("replication")
                return int(info["master_repl_offset"]) >= target

            wait_until(caught_up, timeout, f"replica {replica.port} to catch up")


class Server:
    """One redis-server process, or Sentinel with ``--sentinel``, that tests can kill.

    ``start()`` after ``kill()`` or ``stop()`` starts it again on the same
    port and directory.
    """

    def __init__(self, directory: Path, port: int, arguments: list[str]):
        self.directory = directory
        self.port = port
        self.arguments = arguments
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "redis.log"

    def start(self) -> None:
        """Start the process and wait until it replies to PING."""
        command = [
            REDIS_SERVER,
            *self.arguments,
            "--port", str(self.port),
            "--bind", HOST,
            "--dir", str(self.directory),
            "--logfile", str(self.log),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        process = self.process
        with self.client() as client:

            def answers() -> bool:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{command[0]} on port {self.port} exited with "
                        f"{process.returncode}; see {self.log}"
                    )
                return bool(client.ping())

            wait_until(answers, 10, f"redis-server on port {self.port}")

    def kill(self) -> None:
        """Stop the process with SIGKILL, as a crash would, and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        """Stop the process with SIGTERM, so Redis flushes its AOF, and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(
            host=HOST,
            port=self.port,
            socket_timeout=1,
            socket_connect_timeout=1,
            decode_responses=True,
        )


_NO_PERSISTENCE = ["--save", "", "--appendonly", "no"]


class Cluster:
    """A Redis Cluster of ``primaries`` primaries, each with one replica."""

    def __init__(self, directory: Path, primaries: int = 3):
        self.directory = directory
        self.nodes: list[Server] = []
        for _ in range(primaries * 2):
            port = free_port(bus=True)
            arguments = [
                *_NO_PERSISTENCE,
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "1000",
                "--cluster-announce-ip", HOST,
                # With 0 a replica always tries to take over, however long its
                # link to the primary was down, so a slow machine cannot stop it.
                "--cluster-replica-validity-factor", "0",
            ]  # fmt: skip
            self.nodes.append(Server(directory / str(port), port, arguments))

    @property
    def url(self) -> str:
        return f"redis+cluster://{self.nodes[0].address}"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        command = [
            REDIS_CLI,
            "--cluster", "create",
            *(node.address for node in self.nodes),
            "--cluster-replicas", "1",
            "--cluster-yes",
        ]  # fmt: skip
        created = subprocess.run(
            command, capture_output=True, text=True, timeout=60, check=False
        )
        if created.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed: {created.stdout}{created.stderr}"
            )
        self.wait_healthy(replicas=len(self.nodes) // 2, timeout=30)

    def wait_healthy(self, replicas: int = 0, timeout: float = 15) -> None:
        """Wait until all running nodes report ``cluster_state:ok`` and one primary set.

        Also wait until ``replicas`` replicas have an up link to their primary,
        so that a write that WAIT acknowledged survives a failover.
        """
        running = [node for node in self.nodes if node.running]

        def healthy() -> bool:
            primaries = set()
            for node in running:
                with node.client() as client:
                    info = client.cluster("INFO")
                    if info["cluster_state"] != "ok":
                        return False
                    if int(info["cluster_slots_ok"]) != 16384:
                        return False
                    primaries.add(frozenset(self._primary_ports(client)))
            if len(primaries) != 1:
                return False
            return self._synced_replicas(running) >= replicas

        wait_until(healthy, timeout, "cluster_state:ok on every node", step=0.1)

    def primary_of(self, key: str) -> Server:
        """Return the node that serves ``key`` right now."""
        node = next(node for node in self.nodes if node.running)
        with node.client() as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            for low, high, owner, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if low <= slot <= high:
                    return self._node(int(owner[1]))
        raise RuntimeError(f"no node serves slot {slot}")

    def primaries(self) -> list[Server]:
        node = next(node for node in self.nodes if node.running)
        with node.client() as client:
            return [self._node(port) for port in sorted(self._primary_ports(client))]

    def wait_replicated(self) -> None:
        """Wait until every replica has applied all writes of its primary so far."""
        for primary in self.primaries():
            with primary.client() as client:
                replica_ports = {
                    int(value["port"])
                    for name, value in client.info("replication").items()
                    if name.startswith("slave") and isinstance(value, dict)
                }
            replicas = [node for node in self.nodes if node.port in replica_ports]
            wait_replicated(primary, replicas)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    def _node(self, port: int) -> Server:
        return next(node for node in self.nodes if node.port == port)

    @staticmethod
    def _primary_ports(client: redis.Redis) -> set[int]:
        ports = set()
        for line in client.execute_command("CLUSTER", "NODES").splitlines():
            fields = line.split()
            flags = fields[2].split(",")
            if "master" in flags and "fail" not in flags and len(fields) > 8:
                ports.add(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return ports

    @staticmethod
    def _synced_replicas(nodes: list[Server]) -> int:
        synced = 0
        for node in nodes:
            with node.client() as client:
                info = client.info("replication")
                if info["role"] == "slave" and info["master_link_status"] == "up":
                    synced += 1
        return synced


class SentinelSetup:
    """One primary, one replica and three Sentinels monitoring them as ``authgrpc``."""

    def __init__(self, directory: Path, sentinels: int = 3):
        self.directory = directory
        primary_port = free_port()
        self.primary = Server(
            directory / "primary",
            primary_port,
            [*_NO_PERSISTENCE, "--replica-announce-ip", HOST],
        )
        replica_arguments = [
            *_NO_PERSISTENCE,
            "--replica-announce-ip", HOST,
            "--replicaof", HOST, str(primary_port),
        ]  # fmt: skip
        self.replica = Server(directory / "replica", free_port(), replica_arguments)
        self.sentinels = []
        for number in range(sentinels):
            port = free_port()
            sentinel_directory = directory / f"sentinel-{number}"
            sentinel_directory.mkdir(parents=True)
            # Sentinel rewrites its configuration file with what it learns,
            # so each one needs a writable file of its own.
            config = sentinel_directory / "sentinel.conf"
            config.write_text(
                f"sentinel announce-ip {HOST}\n"
                f"sentinel monitor {SERVICE} {HOST} {primary_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self.sentinels.append(
                Server(sentinel_directory, port, [str(config), "--sentinel"])
            )

    @property
    def servers(self) -> list[Server]:
        return [self.primary, self.replica]

    @property
    def url(self) -> str:
        hosts = ",".join(sentinel.address for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        for sentinel in self.sentinels:
            sentinel.start()
        self.wait_healthy(timeout=30)

    def current_primary(self) -> Server:
        """Return the server that the Sentinels name as primary now."""
        with self.sentinels[0].client() as client:
            _, port = client.sentinel_get_master_addr_by_name(SERVICE)
        return next(server for server in self.servers if server.port == int(port))

    def wait_healthy(self, timeout: float = 15) -> None:
        """Wait until each Sentinel sees the primary, a synced replica and its peers."""

        def healthy() -> bool:
            ports = set()
            for sentinel in self.sentinels:
                with sentinel.client() as client:
                    state = client.sentinel_master(SERVICE)
                    if state["num-other-sentinels"] != len(self.sentinels) - 1:
                        return False
                    if state["num-slaves"] < 1 or "s_down" in state["flags"]:
                        return False
                    ports.add(int(state["port"]))
                    replicas = client.sentinel_slaves(SERVICE)
                    if not any(r["master-link-status"] == "ok" for r in replicas):
                        return False
            return len(ports) == 1

        wait_until(healthy, timeout, f"Sentinel to settle on {SERVICE}", step=0.1)

    def wait_replicated(self) -> None:
        """Wait until the replica has applied all writes of the primary so far."""
        primary = self.current_primary()
        wait_replicated(primary, [s for s in self.servers if s is not primary])

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.kill()
        self.replica.kill()
        self.primary.kill()


class AofServer(Server):
    """A single redis-server that appends each write to its AOF and fsyncs it."""

    def __init__(self, directory: Path):
        arguments = ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        super().__init__(directory, free_port(), arguments)

    @property
    def url(self) -> str:
        return f"redis://{self.address}/0"

    def restart(self) -> None:
        """Stop with SIGTERM and start again on the same port and directory."""
        self.stop()
        self.start()


# Fixtures. A test module loads them with ``pytest_plugins = ["tests.topology"]``.
# pytest registers a plugin once, so the session-scoped topologies are shared
# by every module that uses them, and each starts on first use.


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A cluster of 3 primaries and 3 replicas for the session. Do not break it."""
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSetup]:
    """A primary, a replica and 3 Sentinels for the whole session. Do not break it."""
    setup = SentinelSetup(tmp_path_factory.mktemp("sentinel"))
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster of the test's own, which it may break."""
    cluster = Cluster(tmp_path / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def fresh_sentinel(tmp_path: Path) -> Iterator[SentinelSetup]:
    """A Sentinel setup of the test's own, which it may break."""
    setup = SentinelSetup(tmp_path / "sentinel")
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


@pytest.fixture
def aof_server(tmp_path: Path) -> Iterator[AofServer]:
    """A single AOF server of the test's own, which it may restart."""
    server = AofServer(tmp_path / "aof")
    try:
        server.start()
        yield server
    finally:
        server.stop()
