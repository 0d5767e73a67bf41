"""Benchmark the auth service and its validators against a no-op floor, in one run.

Everything runs on 127.0.0.1: two private redis-server processes (one with
about 10 thousand live sessions, one with a million), an auth service on
each, and one process per variant of a protected no-op service. The load
comes from separate worker processes (see loadgen.py). Every response's
status is checked; any unexpected status fails the run with exit status 1.
The targets are ratios against rows measured in the same run, printed as
PASS or MISS, and never fail the run.

    .venv/bin/python benchmarks/run.py            # full run, under 5 minutes on 2 cores
    .venv/bin/python benchmarks/run.py --quick    # about a minute
    .venv/bin/python benchmarks/run.py --smoke    # a few hundred requests per row
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import grpc
import loadgen
import report
import servers
import sessions
from loadgen import Job, JobResult, PollJob
from report import Row

from authgrpc.config import Settings
from authgrpc.keys import generate_key_file, load_signing_keys
from authgrpc.passwords import PasswordHasher
from authgrpc.redis_store import KeyLayout, RedisStore
from authgrpc.store import UserRecord
from authgrpc.tokens import TokenIssuer
from authgrpc.v1 import auth_pb2, auth_pb2_grpc

SPAWN = multiprocessing.get_context("spawn")
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
LOGIN_PASSWORD = "correct horse battery staple"
# Tokens that the benchmark signs itself outlive the longest run.
BENCH_TOKEN_SECONDS = 3600
AUTH_METHOD = "/authgrpc.v1.AuthService/"


@dataclass(frozen=True)
class Mode:
    """How long and how large each part of a run is."""

    name: str
    rounds: int
    warmup_s: float
    duration_s: float
    concurrency: int
    workers: int
    max_requests: int
    live_sessions: int
    memory_sessions: int
    large_sessions: int
    token_pool: int
    latency_tokens: int
    paced_rate: float
    login_concurrency: int
    revocation_trials: int
    population_rounds: int


MODES = {
    "full": Mode("full", 3, 1.0, 3.0, 32, 2, 0, 10_000, 50_000, 1_000_000, 64, 1000,
                 400.0, 4, 200, 5),
    "quick": Mode("quick", 1, 0.5, 2.5, 32, 2, 0, 10_000, 30_000, 100_000, 64, 500,
                  400.0, 4, 50, 2),
    "smoke": Mode("smoke", 1, 0.2, 2.0, 8, 2, 150, 1_000, 1_000, 1_000, 8, 100,
                  200.0, 2, 10, 1),
}  # fmt: skip


@dataclass
class Process:
    """A child process and the pipe to it."""

    name: str
    process: Any
    conn: Connection

    @property
    def pid(self) -> int:
        return int(self.process.pid)


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time of every thread of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def machine_busy_seconds() -> float:
    """Return the CPU time that every core of the machine spent busy since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLOCK_TICK


def sleep_until(deadline_ns: int) -> None:
    delay = (deadline_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


class Bench:
    """One benchmark run: its processes, its data, and the rows it measured."""

    def __init__(self, mode: Mode, directory: Path, profile_dir: Path | None):
        self.mode = mode
        self.directory = directory
        self.profile_dir = profile_dir
        self.settings = Settings(dev=True)
        self.layout = KeyLayout()
        self.redis_main = sessions.RedisProcess(directory / "redis-main")
        self.redis_large = sessions.RedisProcess(directory / "redis-large")
        self.key_path = directory / "signing.pem"
        self.servers: dict[str, Process] = {}
        self.ports: dict[str, int] = {}
        self.workers: list[Process] = []
        self.rows: dict[str, Row] = {}
        self.mismatches = 0
        self.mismatch_examples: list[str] = []
        self.facts: dict[str, Any] = {}
        self.issuer: TokenIssuer | None = None

    # -- processes ---------------------------------------------------------

    def start(self) -> None:
        for redis_process in (self.redis_main, self.redis_large):
            redis_process.directory.mkdir()
            redis_process.start()
        generate_key_file(self.key_path)
        keys = load_signing_keys(self.key_path)
        self.issuer = TokenIssuer(
            keys,
            issuer=servers.ISSUER,
            audience=servers.AUDIENCE,
            lifetime_seconds=BENCH_TOKEN_SECONDS,
        )
        self._start_server("auth", "auth", self.redis_main.url)
        self._start_server("auth-large", "auth", self.redis_large.url)
        auth_target = f"127.0.0.1:{self.ports['auth']}"
        for kind in servers.VALIDATOR_KINDS:
            self._start_server(kind, kind, self.redis_main.url, auth_target)
        for index in range(self.mode.workers):
            parent, child = SPAWN.Pipe()
            process = SPAWN.Process(
                target=loadgen.run_worker, args=(child,), name=f"load-{index}"
            )
            process.start()
            self.workers.append(Process(f"load-{index}", process, parent))

    def _start_server(
        self, name: str, kind: str, redis_url: str, auth_target: str = ""
    ) -> None:
        spec = servers.ServerSpec(kind, redis_url, self.key_path, auth_target)
        parent, child = SPAWN.Pipe()
        process = SPAWN.Process(
            target=servers.run_server, args=(spec, child), name=f"server-{name}"
        )
        process.start()
        self.servers[name] = Process(name, process, parent)
        self.ports[name] = servers.wait_ready(parent, name)

    def stop(self) -> None:
        for worker in self.workers:
            if worker.process.is_alive():
                worker.conn.send(("stop",))
        for server in self.servers.values():
            if server.process.is_alive():
                server.conn.send(("stop",))
        for child in (*self.workers, *self.servers.values()):
            child.process.join(10)
            if child.process.is_alive():
                child.process.terminate()
                child.process.join(5)
        self.redis_main.stop()
        self.redis_large.stop()

    def pids(self) -> list[int]:
        """Return the process ids of this run: itself, its servers, Redis and load."""
        children = [*self.servers.values(), *self.workers]
        redis_pids = [self.redis_main.pid, self.redis_large.pid]
        return [os.getpid(), *redis_pids, *(child.pid for child in children)]

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    # -- data --------------------------------------------------------------

    def token(self, ref: sessions.SessionRef) -> str:
        assert self.issuer is not None
        return self.issuer.issue(ref.user_id, ref.session_id).token

    def prepare(self) -> None:
        """Create the login users, one real login, and the sessions the rows use."""
        hasher = PasswordHasher(workers=1)
        password_hash = hasher.hash_sync(LOGIN_PASSWORD)
        hasher.close()
        self.facts["password_hash"] = password_hash
        asyncio.run(self._prepare_async(password_hash))

    async def _prepare_async(self, password_hash: str) -> None:
        store = RedisStore.from_url(self.redis_main.url, timeout=30)
        try:
            self.login_users = [f"login-{index}" for index in range(8)]
            for name in self.login_users:
                await store.create_user(name, password_hash, ("reader",))
            # One real Login, to take the peer and user agent that the store
            # keeps for a session from a real gRPC client.
            channel = grpc.aio.insecure_channel(self.target("auth"))
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            login = await stub.Login(
                auth_pb2.LoginRequest(
                    username=self.login_users[0], password=LOGIN_PASSWORD
                )
            )
            listed = await stub.ListSessions(
                auth_pb2.ListSessionsRequest(),
                metadata=[("authorization", f"Bearer {login.access_token}")],
            )
            await channel.close()
            self.peer = listed.sessions[0].peer
            self.user_agent = listed.sessions[0].user_agent
            self.limits = self.settings.limits
            users = [
                await store.create_user(f"pool-{index}", password_hash, ("reader",))
                for index in range(self.mode.token_pool)
            ]
            refs = await sessions.create_sessions(
                store, users, self.limits, self.peer, self.user_agent
            )
            self.pool_tokens = [self.token(ref) for ref in refs]
            self.revocation_users = [
                await store.create_user(f"revoke-{index}", password_hash, ())
                for index in range(self.mode.revocation_trials)
            ]
        finally:
            await store.close()

    def create_live_sessions(self) -> None:
        """Create the small population's sessions with the store."""
        client = self.redis_main.client()
        user_ids = sessions.populate_users(
            client,
            self.layout.prefix,
            self.facts["password_hash"],
            self.mode.live_sessions,
        )
        client.close()
        users = [
            UserRecord(uid, f"bulk-{uid.lower()}", self.facts["password_hash"])
            for uid in user_ids
        ]
        self.live_refs = asyncio.run(self._create(users))

    def measure_memory(self) -> None:
        """Measure Redis memory per session on a private redis-server.

        The figure is a used_memory delta, which the other rows' traffic and
        the small population's growth would blur on the main Redis.
        """
        count = self.mode.memory_sessions
        measured = sessions.measure_memory(
            count, 1, self.facts["password_hash"], self.peer, self.user_agent
        )
        self.facts["memory"] = {
            "sessions": count,
            "delta_per_session": measured.created,
            "after_refresh": measured.refreshed,
            "session_key": measured.session_key,
            "index_key": measured.user_key_after,
            "peer": self.peer,
            "user_agent": self.user_agent,
        }

    async def _create(self, users: list[UserRecord]) -> list[sessions.SessionRef]:
        store = RedisStore.from_url(self.redis_main.url, timeout=30)
        try:
            return await sessions.create_sessions(
                store, users, self.limits, self.peer, self.user_agent
            )
        finally:
            await store.close()

    def populate_large(self) -> None:
        """Load the second Redis with the large population, in the store's layout."""
        client = self.redis_large.client()
        started = time.monotonic()
        refs = sessions.populate(
            client,
            self.layout.prefix,
            self.facts["password_hash"],
            self.limits,
            self.peer,
            self.user_agent,
            self.mode.large_sessions,
        )
        self.facts["populate_s"] = time.monotonic() - started
        self.facts["large_used_memory"] = sessions.used_memory(client)
        self.facts["large_keys"] = client.dbsize()
        client.close()
        self.large_refs = refs

    # -- phases ------------------------------------------------------------

    def split(
        self,
        target: str,
        method: str,
        requests: list[bytes],
        metadata: list[loadgen.MetadataPairs],
        start_ns: int,
        *,
        concurrency: int,
        workers: list[int],
        rate: float = 0.0,
        expected: str = "OK",
    ) -> list[tuple[int, Job]]:
        """Spread one load over ``workers``, each with a share of the load."""
        jobs = []
        for position, worker in enumerate(workers):
            # Each worker starts at another point of the request list, so that
            # the workers do not send the same token at the same moment.
            offset = position * len(requests) // len(workers)
            jobs.append(
                (
                    worker,
                    Job(
                        target=target,
                        method=method,
                        requests=requests[offset:] + requests[:offset],
                        metadata=metadata[offset:] + metadata[:offset],
                        concurrency=max(1, concurrency // len(workers)),
                        start_ns=start_ns,
                        warmup_s=self.mode.warmup_s,
                        duration_s=self.mode.duration_s,
                        expected=expected,
                        max_requests=self.mode.max_requests,
                        rate=rate / len(workers),
                    ),
                )
            )
        return jobs

    def run_phase(
        self,
        groups: Callable[[int], dict[str, list[tuple[int, Job]]]],
        watch: dict[str, int],
        profile: tuple[str, int] | None = None,
    ) -> tuple[dict[str, list[JobResult]], dict[str, float]]:
        """Run jobs on all workers at once; return results by group, CPU % by process.

        The phase ends at the end of its window or when every job has answered.
        """
        start_ns = time.monotonic_ns() + 500_000_000
        plan = groups(start_ns)
        sent: list[tuple[str, Process]] = []
        for label, jobs in plan.items():
            for index, job in jobs:
                self.workers[index].conn.send(("job", job))
                sent.append((label, self.workers[index]))
        window_start = start_ns + int(self.mode.warmup_s * 1e9)
        window_end = window_start + int(self.mode.duration_s * 1e9)
        sleep_until(window_start)
        spy = self._start_profile(profile)
        loaded = sorted({worker.pid for _, worker in sent})
        cpu_before = {name: cpu_seconds(pid) for name, pid in watch.items()}
        load_before = sum(cpu_seconds(pid) for pid in loaded)
        ours_before = sum(cpu_seconds(pid) for pid in self.pids())
        machine_before = machine_busy_seconds()
        wall_before = time.monotonic()
        pending = [worker.conn for _, worker in sent]
        while pending and time.monotonic_ns() < window_end:
            ready = wait(pending, timeout=(window_end - time.monotonic_ns()) / 1e9)
            if len(ready) == len(pending):
                break
        wall = time.monotonic() - wall_before
        cpu = {
            name: 100 * (cpu_seconds(pid) - cpu_before[name]) / wall
            for name, pid in watch.items()
        }
        load_cpu = sum(cpu_seconds(pid) for pid in loaded) - load_before
        cpu["load"] = 100 * load_cpu / wall
        # CPU that processes outside this benchmark took from the same cores.
        ours = sum(cpu_seconds(pid) for pid in self.pids()) - ours_before
        outside = machine_busy_seconds() - machine_before - ours
        cpu["other"] = max(0.0, 100 * outside / wall)
        results: dict[str, list[JobResult]] = {label: [] for label in plan}
        for label, worker in sent:
            kind, result = worker.conn.recv()
            assert kind == "result"
            results[label].append(result)
            self.mismatches += result.mismatches
            self.mismatch_examples.extend(result.mismatch_examples)
        if spy is not None:
            spy.wait(30)
        return results, cpu

    def _start_profile(
        self, profile: tuple[str, int] | None
    ) -> subprocess.Popen[bytes] | None:
        if profile is None or self.profile_dir is None:
            return None
        slug, pid = profile
        output = self.profile_dir / f"{slug}.txt"
        command = [
            str(Path(sys.executable).with_name("py-spy")),
            "record",
            "--pid", str(pid),
            "--duration", str(max(1, int(self.mode.duration_s))),
            "--rate", "200",
            "--format", "raw",
            "--nonblocking",
            "--output", str(output),
        ]  # fmt: skip
        return subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def row(self, name: str) -> Row:
        return self.rows.setdefault(name, Row(name))

    def record(
        self, name: str, results: list[JobResult], cpu: dict[str, float]
    ) -> None:
        self.row(name).add(results, cpu)

    # -- the measurements --------------------------------------------------

    def throughput_rows(self) -> list[tuple[str, str, str, list[bytes], list[Any]]]:
        bearer = [(("authorization", f"Bearer {t}"),) for t in self.pool_tokens]
        noop = [b""] * len(bearer)
        validate = [
            auth_pb2.ValidateSessionRequest(access_token=t).SerializeToString()
            for t in self.pool_tokens
        ]
        no_metadata: list[loadgen.MetadataPairs] = [()] * len(validate)
        method = servers.NOOP_METHOD
        return [
            ("floor", "none", method, noop, bearer),
            ("public", "public", method, noop, bearer),
            ("validate", "auth", AUTH_METHOD + "ValidateSession", validate,
             no_metadata),
            ("local", "local", method, noop, bearer),
            ("remote", "remote", method, noop, bearer),
            ("cached", "cached", method, noop, bearer),
            ("signature", "signature", method, noop, bearer),
        ]  # fmt: skip

    def measure_throughput(self) -> None:
        rows = self.throughput_rows()
        for round_index in range(self.mode.rounds):
            for key, server, method, requests, metadata in rows:
                watch = {server: self.servers[server].pid}
                if server == "remote":
                    watch["auth"] = self.servers["auth"].pid
                watch["redis"] = self.redis_main.pid

                def plan(
                    start_ns: int,
                    server: str = server,
                    method: str = method,
                    requests: list[bytes] = requests,
                    metadata: list[Any] = metadata,
                ) -> dict[str, list[tuple[int, Job]]]:
                    return {
                        "main": self.split(
                            self.target(server),
                            method,
                            requests,
                            metadata,
                            start_ns,
                            concurrency=self.mode.concurrency,
                            workers=list(range(self.mode.workers)),
                        )
                    }

                profile = (key, self.servers[server].pid) if round_index == 0 else None
                results, cpu = self.run_phase(plan, watch, profile)
                self.record(key, results["main"], cpu)

    def measure_login_burst(self) -> None:
        logins = [
            auth_pb2.LoginRequest(
                username=name, password=LOGIN_PASSWORD
            ).SerializeToString()
            for name in self.login_users
        ]
        validate = [
            auth_pb2.ValidateSessionRequest(access_token=t).SerializeToString()
            for t in self.pool_tokens
        ]
        watch = {"auth": self.servers["auth"].pid, "redis": self.redis_main.pid}
        paced_workers = [self.mode.workers - 1]

        def idle(start_ns: int) -> dict[str, list[tuple[int, Job]]]:
            return {"validate": self._paced_validate(validate, start_ns, paced_workers)}

        def burst(start_ns: int) -> dict[str, list[tuple[int, Job]]]:
            plan = idle(start_ns)
            plan["login"] = self.split(
                self.target("auth"),
                AUTH_METHOD + "Login",
                logins,
                [()] * len(logins),
                start_ns,
                concurrency=self.mode.login_concurrency,
                workers=[0],
            )
            return plan

        for _ in range(self.mode.rounds):
            results, cpu = self.run_phase(idle, watch)
            self.record("validate_idle", results["validate"], cpu)
            results, cpu = self.run_phase(burst, watch)
            self.record("validate_burst", results["validate"], cpu)
            self.record("login", results["login"], cpu)

    def _paced_validate(
        self, requests: list[bytes], start_ns: int, workers: list[int], target: str = ""
    ) -> list[tuple[int, Job]]:
        return self.split(
            target or self.target("auth"),
            AUTH_METHOD + "ValidateSession",
            requests,
            [()] * len(requests),
            start_ns,
            concurrency=32,
            workers=workers,
            rate=self.mode.paced_rate,
        )

    def measure_population(self) -> None:
        count = self.mode.latency_tokens
        small = [
            auth_pb2.ValidateSessionRequest(
                access_token=self.token(r)
            ).SerializeToString()
            for r in sessions.sample(self.live_refs, count)
        ]
        large = [
            auth_pb2.ValidateSessionRequest(
                access_token=self.token(r)
            ).SerializeToString()
            for r in sessions.sample(self.large_refs, count)
        ]
        cases = [
            ("validate_small", "auth", self.redis_main.pid, small),
            ("validate_large", "auth-large", self.redis_large.pid, large),
        ]
        for _, server, _, requests in cases:
            self.prime(self.target(server), requests)
        # More, shorter pairs than the other rows: serial latency is what a
        # burst of work elsewhere on the machine disturbs the most.
        for _ in range(self.mode.population_rounds):
            for key, server, redis_pid, requests in cases:

                def plan(
                    start_ns: int,
                    server: str = server,
                    requests: list[bytes] = requests,
                ) -> dict[str, list[tuple[int, Job]]]:
                    # One call at a time: the latency is the service time, with
                    # no queueing behind other calls.
                    jobs = self.split(
                        self.target(server),
                        AUTH_METHOD + "ValidateSession",
                        requests,
                        [()] * len(requests),
                        start_ns,
                        concurrency=1,
                        workers=[0],
                    )
                    return {"validate": jobs}

                watch = {"auth": self.servers[server].pid, "redis": redis_pid}
                results, cpu = self.run_phase(plan, watch)
                self.record(key, results["validate"], cpu)

    def prime(self, target: str, requests: list[bytes]) -> None:
        """Send each request once, unmeasured, so the verifier caches each token."""
        job = Job(
            target=target,
            method=AUTH_METHOD + "ValidateSession",
            requests=requests,
            metadata=[()] * len(requests),
            concurrency=8,
            start_ns=time.monotonic_ns(),
            warmup_s=0.0,
            duration_s=60.0,
            max_requests=len(requests),
        )
        worker = self.workers[0]
        worker.conn.send(("job", job))
        kind, result = worker.conn.recv()
        assert kind == "result"
        self.mismatches += result.mismatches
        self.mismatch_examples.extend(result.mismatch_examples)

    def measure_revocation(self) -> None:
        refs = asyncio.run(self._revocation_sessions())
        poller = self.workers[0]
        channel = grpc.insecure_channel(self.target("auth"))
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        latencies: list[float] = []
        accepted_after = 0
        stale_accepts = 0
        never_refused = 0
        wrong_codes = 0
        for ref in refs:
            token = self.token(ref)
            job = PollJob(
                target=self.target("cached"),
                method=servers.NOOP_METHOD,
                metadata=(("authorization", f"Bearer {token}"),),
            )
            poller.conn.send(("poll", job))
            assert poller.conn.recv() == ("warm",)
            stub.Logout(auth_pb2.LogoutRequest(access_token=token), timeout=5)
            returned = time.monotonic_ns()
            kind, records = poller.conn.recv()
            assert kind == "records"
            refused = [done for sent, done, code in records if code != "OK"]
            wrong_codes += sum(
                1 for _, _, code in records if code not in ("OK", "UNAUTHENTICATED")
            )
            if not refused:
                never_refused += 1
                continue
            first = min(refused)
            latencies.append(max(0, first - returned) / 1e6)
            accepted_after += sum(
                1 for sent, _, code in records if code == "OK" and sent > first
            )
            stale_accepts += sum(
                1 for sent, _, code in records if code == "OK" and sent > returned
            )
        channel.close()
        self.mismatches += wrong_codes + never_refused
        if never_refused:
            self.mismatch_examples.append(
                f"revocation: {never_refused} trials saw no refusal within 3 s"
            )
        self.facts["revocation"] = {
            "trials": len(refs),
            "latencies_ms": latencies,
            "accepted_after_refusal": accepted_after,
            "stale_accepts": stale_accepts,
            "wrong_codes": wrong_codes,
        }

    async def _revocation_sessions(self) -> list[sessions.SessionRef]:
        store = RedisStore.from_url(self.redis_main.url, timeout=30)
        try:
            return await sessions.create_sessions(
                store, self.revocation_users, self.limits, self.peer, self.user_agent
            )
        finally:
            await store.close()


SERVER_OF_ROW = {
    "floor": "none",
    "public": "public",
    "validate": "auth",
    "local": "local",
    "remote": "remote",
    "cached": "cached",
    "signature": "signature",
    "login": "auth",
    "validate_idle": "auth",
    "validate_burst": "auth",
    "validate_small": "auth",
    "validate_large": "auth",
}


def print_report(bench: Bench) -> None:
    mode = bench.mode
    facts = bench.facts
    facts["live_sessions"] = mode.live_sessions
    facts["large_sessions"] = mode.large_sessions
    print()
    print(
        f"mode={mode.name}: {mode.rounds} round(s) of {mode.duration_s:.1f} s after "
        f"{mode.warmup_s:.1f} s warmup; closed-loop rows keep {mode.concurrency} calls "
        f"in flight from {mode.workers} load processes; paced rows send "
        f"{mode.paced_rate:.0f} req/s; serial rows send one call at a time, in "
        f"{mode.population_rounds} rounds; x floor and the targets' ratios are "
        f"medians over rounds of each round's ratio"
    )
    print(report.table(bench.rows, facts, SERVER_OF_ROW))
    outside = [row.mean_cpu("other") for row in bench.rows.values()]
    busiest = max(outside)
    if busiest > 20:
        print(
            f"WARNING: processes outside this benchmark used up to {busiest:.0f}% "
            f"CPU during a measured window, so the ratios are less reliable"
        )
    print()
    for line in report.details(facts):
        print(line)
    print()
    for target in report.targets(bench.rows, facts):
        print(target.line())


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="short windows and 100k sessions: about a minute",
    )
    size.add_argument(
        "--smoke",
        action="store_true",
        help="about 300 requests per row and 1k sessions, for a test suite",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="write py-spy raw profiles of each server in the first round to DIR",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    # grpcio logs each connection that a server closes at shutdown; only
    # errors matter here. Children inherit the setting.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    mode_name = "full"
    if arguments.smoke:
        mode_name = "smoke"
    elif arguments.quick:
        mode_name = "quick"
    mode = MODES[mode_name]
    if arguments.profile:
        arguments.profile.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="authgrpc-bench-") as scratch:
        bench = Bench(mode, Path(scratch), arguments.profile)
        try:
            steps: list[tuple[str, Callable[[], None]]] = [
                ("starting Redis, servers and load processes", bench.start),
                ("creating users and one real login", bench.prepare),
                (f"creating {mode.live_sessions:,} sessions with the store",
                 bench.create_live_sessions),
                (f"measuring memory over {mode.memory_sessions:,} sessions on "
                 "a private Redis", bench.measure_memory),
                ("measuring the throughput rows", bench.measure_throughput),
                ("measuring the login burst", bench.measure_login_burst),
                (f"loading {mode.large_sessions:,} sessions into the second Redis",
                 bench.populate_large),
                ("measuring validation at both population sizes",
                 bench.measure_population),
                (f"running {mode.revocation_trials} revocation trials",
                 bench.measure_revocation),
            ]  # fmt: skip
            for title, step in steps:
                print(f"[{time.monotonic() - started:6.1f} s] {title}", flush=True)
                step()
            print_report(bench)
        finally:
            bench.stop()
    elapsed = time.monotonic() - started
    print()
    revocation = bench.facts.get("revocation", {})
    failed = bench.mismatches > 0 or revocation.get("accepted_after_refusal", 0) > 0
    print(f"unexpected statuses: {bench.mismatches}")
    for example in sorted(set(bench.mismatch_examples)):
        print(f"  {example}")
    print(f"total time {elapsed:.0f} s; run {'FAILED' if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
