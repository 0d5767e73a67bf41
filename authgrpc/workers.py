"""Running several server processes on one port, so that every core serves calls.

Each worker is a full server process. They share the listening port through
SO_REUSEPORT (the ``grpc.so_reuseport`` option, set only for workers), and
the kernel spreads new connections across them. They share sessions and
counters through Redis, which is why more than one worker needs a Redis URL.
The supervisor forwards SIGTERM, SIGINT and SIGHUP to every worker. When a
worker exits on its own, the supervisor stops the others and exits with
status 1, so that a process manager detects the failure and restarts the group.
A worker whose supervisor dies shuts itself down within about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from multiprocessing.process import BaseProcess
from types import FrameType

from authgrpc.config import Settings
from authgrpc.errors import ConfigurationError

log = logging.getLogger("authgrpc.server")

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_POLL_SECONDS = 0.2


def _run_worker(settings: Settings, log_level: str) -> None:
    from authgrpc.server import serve

    logging.basicConfig(
        level=log_level,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    threading.Thread(
        target=_stop_when_orphaned, args=(os.getppid(),), daemon=True
    ).start()
    asyncio.run(serve(settings))


def _stop_when_orphaned(supervisor: int) -> None:
    """Shut this worker down gracefully once its supervisor has died."""
    while os.getppid() == supervisor:
        time.sleep(_POLL_SECONDS * 5)
    log.error("supervisor %d is gone; stopping this worker", supervisor)
    os.kill(os.getpid(), signal.SIGTERM)


def check_port_free(listen: str) -> None:
    """Raise ConfigurationError if any socket already listens on ``listen``.

    The workers share their port with SO_REUSEPORT, which would also let
    them join another deployment's workers on that port unnoticed. A bind
    without the option fails on a port that anything holds, whether or not
    the holder set it.
    """
    host, _, port = listen.rpartition(":")
    bind_host: str | None = host.strip("[]") or None
    try:
        addresses = socket.getaddrinfo(
            bind_host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, ValueError) as error:
        raise ConfigurationError(f"cannot listen on {listen}: {error}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # Like gRPC's own listeners, so that connections of a previous
            # run in TIME_WAIT do not count as the port being in use.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise ConfigurationError(
                        f"cannot listen on {listen}: the address is in use"
                    ) from None
                raise ConfigurationError(
                    f"cannot listen on {listen}: {error.strerror}"
                ) from None


class Supervisor:
    """Starts the worker processes, forwards signals to them, and waits for them."""

    def __init__(self, settings: Settings, workers: int, log_level: str = "INFO"):
        if settings.redis_url is None:
            raise ConfigurationError(
                "--workers above 1 needs --redis-url, because in-memory sessions "
                "cannot be shared between processes"
            )
        if settings.listen.endswith(":0"):
            raise ConfigurationError("--workers above 1 needs a fixed port in --listen")
        if settings.metrics_listen is not None:
            # TODO: serve the workers' metrics from one port, for example with
            # prometheus-client's multiprocess mode.
            raise ConfigurationError(
                "--metrics-listen does not work with --workers above 1 yet"
            )
        self.settings = dataclasses.replace(settings, reuse_port=True)
        self.workers = workers
        self.log_level = log_level
        self.processes: list[BaseProcess] = []
        self.stopping = False

    def run(self) -> int:
        """Run the workers until a signal stops them or one fails; return the status."""
        context = multiprocessing.get_context("spawn")
        previous = {
            signum: signal.signal(signum, self._forward) for signum in _FORWARDED
        }
        try:
            check_port_free(self.settings.listen)
            for _ in range(self.workers):
                process = context.Process(
                    target=_run_worker, args=(self.settings, self.log_level)
                )
                process.start()
                self.processes.append(process)
            pids = ",".join(str(process.pid) for process in self.processes)
            log.info(
                "workers started: count=%d address=%s pids=%s",
                self.workers,
                self.settings.listen,
                pids,
            )
            return self._wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        if signum != signal.SIGHUP:
            self.stopping = True
        for process in self.processes:
            self._signal(process, signum)

    def _signal(self, process: BaseProcess, signum: int) -> None:
        if process.pid is not None and process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)

    def _wait(self) -> int:
        status = 0
        while any(process.is_alive() for process in self.processes):
            exited = [
                p for p in self.processes if not p.is_alive() and p.exitcode is not None
            ]
            if exited and not self.stopping:
                first = exited[0]
                log.error(
                    "worker exited unasked: pid=%s status=%s; stopping the others",
                    first.pid,
                    first.exitcode,
                )
                status = 1
                self.stopping = True
                for process in self.processes:
                    self._signal(process, signal.SIGTERM)
            time.sleep(_POLL_SECONDS)
        if not self.stopping:
            status = 1
        if (
            any(process.exitcode not in (0, None) for process in self.processes)
            and status == 0
        ):
            failed = [process.exitcode for process in self.processes]
            log.warning("workers stopped with statuses %s", failed)
        log.info("all workers stopped")
        return status
