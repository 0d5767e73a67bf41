"""The load generator: worker processes that drive grpc.aio calls and time them.

Each worker runs one event loop and takes commands on a pipe: ``("job",
Job)`` runs a bounded load phase and sends back a :class:`JobResult`,
``("poll", PollJob)`` runs one revocation trial (see :func:`_poll`), and
``("stop",)`` ends the process. Requests and responses are raw bytes, so the
client spends no time on protobuf. Times are ``time.monotonic_ns()``, which
reads CLOCK_MONOTONIC on Linux and so is comparable across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import resource
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import grpc

MetadataPairs = tuple[tuple[str, str], ...]
MAX_MISMATCH_EXAMPLES = 5


@dataclass(frozen=True)
class Job:
    """One worker's part of a load phase.

    Calls go to ``method`` at ``target``, cycling through ``requests`` and
    ``metadata`` (the two lists have the same length). The phase starts at
    ``start_ns``; calls that complete in the first ``warmup_s`` seconds are
    not counted, and the phase ends ``duration_s`` seconds later or after
    ``max_requests`` counted calls. With ``rate`` > 0 the calls are sent
    open loop at that many per second, at most ``concurrency`` in flight;
    otherwise ``concurrency`` tasks each send the next call as soon as the
    previous one returns.
    """

    target: str
    method: str
    requests: list[bytes]
    metadata: list[MetadataPairs]
    concurrency: int
    start_ns: int
    warmup_s: float
    duration_s: float
    expected: str = "OK"
    max_requests: int = 0
    rate: float = 0.0
    timeout_s: float = 10.0


@dataclass
class JobResult:
    """The counts and latencies that one worker measured in its window."""

    count: int = 0
    elapsed_s: float = 0.0
    latencies_ns: array[int] = field(default_factory=lambda: array("q"))
    mismatches: int = 0
    mismatch_examples: list[str] = field(default_factory=list)
    cpu_s: float = 0.0
    codes: dict[str, int] = field(default_factory=dict)
    skipped: int = 0


@dataclass(frozen=True)
class PollJob:
    """One revocation trial: calls with ``metadata`` until after the first refusal."""

    target: str
    method: str
    metadata: MetadataPairs
    tasks: int = 2
    warm_calls: int = 5
    calls_after_refusal: int = 20
    timeout_s: float = 3.0


# (sent_ns, done_ns, status code name) of each call in a revocation trial.
PollRecord = tuple[int, int, str]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _sleep_until(deadline_ns: int) -> None:
    delay = (deadline_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


async def _wait_connected(channel: grpc.aio.Channel) -> None:
    await asyncio.wait_for(channel.channel_ready(), timeout=10)


class _Phase:
    """The shared state of one job while its tasks run."""

    def __init__(self, job: Job):
        self.job = job
        self.result = JobResult()
        self.window_start = job.start_ns + int(job.warmup_s * 1e9)
        self.window_end = self.window_start + int(job.duration_s * 1e9)
        self.first_done = 0
        self.last_done = 0
        self.stopped = False
        self.variants = itertools.cycle(range(len(job.requests)))

    def record(self, sent: int, done: int, code: str) -> None:
        result = self.result
        result.codes[code] = result.codes.get(code, 0) + 1
        if code != self.job.expected:
            result.mismatches += 1
            if len(result.mismatch_examples) < MAX_MISMATCH_EXAMPLES:
                result.mismatch_examples.append(
                    f"{self.job.method}: expected {self.job.expected}, got {code}"
                )
        if done < self.window_start:
            return
        if done > self.window_end:
            self.stopped = True
            return
        if not self.first_done:
            self.first_done = sent
        self.last_done = done
        result.latencies_ns.append(done - sent)
        result.count += 1
        if self.job.max_requests and result.count >= self.job.max_requests:
            self.stopped = True


async def _call(phase: _Phase, call: grpc.aio.UnaryUnaryMultiCallable) -> None:
    index = next(phase.variants)
    job = phase.job
    sent = time.monotonic_ns()
    try:
        await call(
            job.requests[index],
            metadata=job.metadata[index] or None,
            timeout=job.timeout_s,
        )
        code = "OK"
    except grpc.aio.AioRpcError as error:
        code = error.code().name
    phase.record(sent, time.monotonic_ns(), code)


async def _closed_loop(phase: _Phase, call: grpc.aio.UnaryUnaryMultiCallable) -> None:
    while not phase.stopped:
        await _call(phase, call)


async def _open_loop(phase: _Phase, call: grpc.aio.UnaryUnaryMultiCallable) -> None:
    """Send at a fixed rate; a call whose slot finds no free concurrency is skipped."""
    job = phase.job
    interval_ns = int(1e9 / job.rate)
    in_flight: set[asyncio.Task[None]] = set()
    for slot in itertools.count():
        if phase.stopped or time.monotonic_ns() > phase.window_end:
            break
        await _sleep_until(job.start_ns + slot * interval_ns)
        if len(in_flight) >= job.concurrency:
            phase.result.skipped += 1
            continue
        task = asyncio.create_task(_call(phase, call))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight)


async def run_job(job: Job) -> JobResult:
    """Run one job to its end and return what it measured."""
    phase = _Phase(job)
    async with grpc.aio.insecure_channel(job.target) as channel:
        await _wait_connected(channel)
        call = channel.unary_unary(job.method)
        await _sleep_until(job.start_ns)
        cpu_before = _cpu_seconds()
        if job.rate > 0:
            await _open_loop(phase, call)
        else:
            tasks = [_closed_loop(phase, call) for _ in range(job.concurrency)]
            await asyncio.gather(*tasks)
        phase.result.cpu_s = _cpu_seconds() - cpu_before
    if phase.first_done and phase.last_done > phase.first_done:
        phase.result.elapsed_s = (phase.last_done - phase.first_done) / 1e9
    return phase.result


async def _poll(job: PollJob, conn: Connection) -> list[PollRecord]:
    """Call until ``calls_after_refusal`` calls completed after the first refusal.

    Sends ``("warm",)`` on ``conn`` after ``warm_calls`` accepted calls, so
    that the parent ends the session only once the validator has cached it.
    """
    records: list[PollRecord] = []
    state = {"accepted": 0, "refused_at": 0, "after": 0, "warm_sent": False}
    deadline = time.monotonic_ns() + int(job.timeout_s * 1e9)
    async with grpc.aio.insecure_channel(job.target) as channel:
        await _wait_connected(channel)
        call = channel.unary_unary(job.method)

        async def poller() -> None:
            while state["after"] < job.calls_after_refusal:
                if time.monotonic_ns() > deadline:
                    return
                sent = time.monotonic_ns()
                try:
                    await call(b"", metadata=job.metadata, timeout=job.timeout_s)
                    code = "OK"
                except grpc.aio.AioRpcError as error:
                    code = error.code().name
                done = time.monotonic_ns()
                records.append((sent, done, code))
                if state["refused_at"]:
                    state["after"] += 1
                elif code == "OK":
                    state["accepted"] += 1
                    if state["accepted"] >= job.warm_calls and not state["warm_sent"]:
                        state["warm_sent"] = True
                        conn.send(("warm",))
                else:
                    state["refused_at"] = done

        await asyncio.gather(*(poller() for _ in range(job.tasks)))
    if not state["warm_sent"]:
        conn.send(("warm",))
    return records


async def _serve(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command[0] == "stop":
            return
        if command[0] == "job":
            conn.send(("result", await run_job(command[1])))
        elif command[0] == "poll":
            records = await _poll(command[1], conn)
            conn.send(("records", records))
        else:
            raise ValueError(f"unknown load generator command {command[0]!r}")


def run_worker(conn: Connection) -> None:
    """Process entry point: take commands on ``conn`` until ``("stop",)``."""
    with contextlib.suppress(EOFError):
        asyncio.run(_serve(conn))
