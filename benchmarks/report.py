"""The benchmark's table and its targets, computed from the rows of one run."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from loadgen import JobResult

# Rows whose throughput is compared with the floor: closed loop, same concurrency.
THROUGHPUT_ROWS = (
    "floor",
    "public",
    "validate",
    "local",
    "remote",
    "cached",
    "signature",
)
ROW_TITLES = {
    "floor": "floor: no-op unary, no interceptor",
    "public": "no-op, public method of AsyncAuthInterceptor",
    "validate": "ValidateSession (auth service)",
    "local": "protected no-op, AsyncLocalValidator",
    "remote": "protected no-op, AsyncRemoteValidator",
    "cached": "protected no-op, local validator + cache",
    "signature": "protected no-op, signature only (stateless)",
    "login": "Login, argon2id t=3 m=64 MiB p=1, in the burst",
    "validate_idle": "ValidateSession paced, idle",
    "validate_burst": "ValidateSession paced, during the login burst",
    "validate_small": "ValidateSession serial, {small} live sessions",
    "validate_large": "ValidateSession serial, {large} live sessions",
}  # fmt: skip


@dataclass
class Row:
    """One line of the table, aggregated over the rounds of a run."""

    name: str
    latencies_ns: list[int] = field(default_factory=list)
    rounds_rps: list[float] = field(default_factory=list)
    rounds_latencies_ns: list[list[int]] = field(default_factory=list)
    cpu: dict[str, list[float]] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        if not self.rounds_rps:
            return math.nan
        return sum(self.rounds_rps) / len(self.rounds_rps)

    def percentile(self, fraction: float) -> float:
        """Return a latency percentile in milliseconds, by the nearest-rank method."""
        return _percentile(self.latencies_ns, fraction)

    def round_percentiles(self, fraction: float) -> list[float]:
        """Return the latency percentile of each round, in milliseconds."""
        return [_percentile(values, fraction) for values in self.rounds_latencies_ns]

    @property
    def p50(self) -> float:
        return self.percentile(0.50)

    @property
    def p99(self) -> float:
        return self.percentile(0.99)

    def add(self, results: list[JobResult], cpu: dict[str, float]) -> None:
        """Add one round: the results of every worker, and CPU % by process label."""
        rate = sum(r.count / r.elapsed_s for r in results if r.elapsed_s > 0)
        self.rounds_rps.append(rate)
        latencies: list[int] = []
        for result in results:
            latencies.extend(result.latencies_ns)
        self.latencies_ns.extend(latencies)
        self.rounds_latencies_ns.append(latencies)
        for label, percent in cpu.items():
            self.cpu.setdefault(label, []).append(percent)

    def mean_cpu(self, label: str) -> float:
        values = self.cpu.get(label, [])
        return sum(values) / len(values) if values else math.nan

    def cpu_per_request_us(self, label: str) -> float:
        """Return the CPU time of process ``label`` per request, in microseconds."""
        return self.mean_cpu(label) / 100 * 1e6 / self.rps


def _percentile(latencies_ns: list[int], fraction: float) -> float:
    if not latencies_ns:
        return math.nan
    ordered = sorted(latencies_ns)
    rank = max(0, math.ceil(fraction * len(ordered)) - 1)
    return ordered[rank] / 1e6


def latency_ratio(row: Row, reference: Row, fraction: float) -> float:
    """Return the median over rounds of a latency percentile's ratio to the reference's.

    The two rows take turns within each round, as in :func:`ratio_to`.
    """
    pairs = [
        mine / theirs
        for mine, theirs in zip(
            row.round_percentiles(fraction),
            reference.round_percentiles(fraction),
            strict=True,
        )
        if theirs > 0
    ]
    return statistics.median(pairs) if pairs else math.nan


def ratio_to(row: Row, floor: Row) -> float:
    """Return the median over rounds of the row's req/s over the floor's.

    The rows take turns within a round, so each round's pair ran minutes
    apart at most, and a slow round slows both of its sides alike.
    """
    pairs = [
        mine / theirs
        for mine, theirs in zip(row.rounds_rps, floor.rounds_rps, strict=True)
        if theirs > 0
    ]
    return statistics.median(pairs) if pairs else math.nan


def number(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def render(header: list[str], lines: list[list[str]]) -> str:
    """Render a Markdown table with padded columns; numeric columns align right."""
    widths = [
        max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))
    ]

    def line(cells: list[str]) -> str:
        padded = [
            cell.ljust(width) if i == 0 or i == len(cells) - 1 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(header), rule, *(line(cells) for cells in lines)])


def _cpu_text(row: Row, server: str) -> str:
    parts = [f"{label} {row.mean_cpu(label):.0f}%" for label in row.cpu]
    text = ", ".join(parts)
    if server in row.cpu and row.rps > 0:
        text += f"; {server} {row.cpu_per_request_us(server):.0f} us/req"
    return text


def table(rows: dict[str, Row], facts: dict[str, Any], servers: dict[str, str]) -> str:
    """Return the one table of the run: every row, the revocation and memory lines."""
    floor = rows["floor"]
    header = [
        "row",
        "req/s",
        "p50 ms",
        "p99 ms",
        "x floor",
        "req/s by round",
        "CPU (100% = 1 core)",
    ]
    lines = []
    for key, title in ROW_TITLES.items():
        if key not in rows:
            continue
        row = rows[key]
        ratio = ratio_to(row, floor) if key in THROUGHPUT_ROWS else math.nan
        title = title.format(
            small=f"{facts['live_sessions']:,}", large=f"{facts['large_sessions']:,}"
        )
        lines.append(
            [
                title,
                number(row.rps, 0),
                number(row.p50),
                number(row.p99),
                number(ratio),
                " ".join(f"{rate:.0f}" for rate in row.rounds_rps),
                _cpu_text(row, servers.get(key, "")),
            ]
        )
    revocation = revocation_row(facts)
    latencies = facts["revocation"]["latencies_ms"]
    worst = max(latencies) if latencies else math.nan
    lines.append(
        [
            "revocation: Logout returned -> first refusal",
            "-",
            number(revocation.p50),
            number(revocation.p99),
            "-",
            "-",
            f"max {number(worst)} ms over {facts['revocation']['trials']} trials",
        ]
    )
    memory = facts["memory"]
    lines.append(
        [
            "Redis memory per live session, index included",
            "-",
            "-",
            "-",
            "-",
            "-",
            f"{memory['delta_per_session']:.0f} B new, "
            f"{memory['after_refresh']:.0f} B after a refresh (used_memory "
            f"delta over {memory['sessions']:,} sessions)",
        ]
    )
    return render(header, lines)


def revocation_row(facts: dict[str, Any]) -> Row:
    latencies = facts["revocation"]["latencies_ms"]
    return Row("revocation", latencies_ns=[int(value * 1e6) for value in latencies])


@dataclass(frozen=True)
class Target:
    """A target, its measured value, and whether the value meets it."""

    name: str
    value: float
    limit: float
    relation: str

    @property
    def met(self) -> bool:
        if self.relation == ">=":
            return self.value >= self.limit
        if self.relation == "<=":
            return self.value <= self.limit
        return self.value < self.limit

    def line(self) -> str:
        verdict = "PASS" if self.met else "MISS"
        goal = f"target {self.relation} {self.limit:g}"
        return f"{verdict}  {self.name}: {self.value:.3g} ({goal})"


def targets(rows: dict[str, Row], facts: dict[str, Any]) -> list[Target]:
    """Return every target with its value from this run."""
    floor = rows["floor"]
    small, large = rows["validate_small"], rows["validate_large"]
    idle, burst = rows["validate_idle"], rows["validate_burst"]
    validate = rows["validate"]
    memory = max(facts["memory"]["delta_per_session"], facts["memory"]["after_refresh"])
    return [
        Target("ValidateSession req/s / floor req/s", ratio_to(validate, floor),
               0.6, ">="),
        Target("ValidateSession p99 / floor p99", latency_ratio(validate, floor, 0.99),
               2.0, "<="),
        Target("local validator req/s / floor req/s", ratio_to(rows["local"], floor),
               0.7, ">="),
        Target("local + cache req/s / floor req/s", ratio_to(rows["cached"], floor),
               0.9, ">="),
        Target("revocation p99, ms", revocation_row(facts).p99, 50.0, "<"),
        Target("Redis bytes per live session, new or refreshed", memory, 300.0, "<="),
        Target("ValidateSession p50, large / small population",
               latency_ratio(large, small, 0.50), 1.1, "<="),
        Target("ValidateSession p99, large / small population",
               latency_ratio(large, small, 0.99), 1.1, "<="),
        Target("ValidateSession p99, login burst / idle",
               latency_ratio(burst, idle, 0.99),
               2.0, "<="),
    ]  # fmt: skip


def details(facts: dict[str, Any]) -> list[str]:
    """Return the lines that explain the memory and revocation rows."""
    memory = facts["memory"]
    revocation = facts["revocation"]
    return [
        f"MEMORY USAGE (SAMPLES 0), mean of 100 refreshed sessions: session "
        f"hash {memory['session_key']:.0f} B, user hash (record and index) "
        f"{memory['index_key']:.0f} B; each session keeps peer "
        f"{memory['peer']!r} and a {len(memory['user_agent'])}-byte user agent",
        f"large population: {facts['large_keys']:,} keys, used_memory "
        f"{facts['large_used_memory'] / 2**20:,.0f} MiB, loaded in "
        f"{facts['populate_s']:.1f} s",
        f"revocation: {revocation['accepted_after_refusal']} calls accepted after "
        f"the first refusal; {revocation['stale_accepts']} accepted calls were sent "
        f"after Logout returned",
    ]
