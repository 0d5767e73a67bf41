"""Prometheus metrics for the auth server, served over HTTP on a port of their own.

Without ``--metrics-listen`` the server uses :class:`NullMetrics`, whose
methods do nothing, and prometheus-client need not be installed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from authgrpc.errors import ConfigurationError

log = logging.getLogger("authgrpc.metrics")

LIVE_SESSION_SCAN_INTERVAL = 60.0


class NullMetrics:
    """Metrics that record nothing."""

    def observe_call(self, method: str, code: str, seconds: float) -> None:
        return None

    def observe_login(self, outcome: str) -> None:
        return None

    def observe_validation(self, outcome: str) -> None:
        return None

    def observe_store_error(self) -> None:
        return None

    def set_live_sessions(self, count: int) -> None:
        return None


class PrometheusMetrics(NullMetrics):
    """Counters and histograms in a registry of their own, exposed by ``serve_http``."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.calls = Counter(
            "authgrpc_calls",
            "Calls handled, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "authgrpc_call_duration_seconds",
            "Time to handle a call, by method.",
            ["method"],
            buckets=(
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
            ),
            registry=self.registry,
        )
        self.logins = Counter(
            "authgrpc_logins",
            "Login attempts, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.validations = Counter(
            "authgrpc_validations",
            "ValidateSession results, by outcome: ok or the ErrorInfo reason.",
            ["outcome"],
            registry=self.registry,
        )
        self.store_errors = Counter(
            "authgrpc_store_errors",
            "Calls that failed because the session store was unavailable.",
            registry=self.registry,
        )
        self.live_sessions = Gauge(
            "authgrpc_live_sessions",
            "Session keys in the store at the last count.",
            registry=self.registry,
        )

    def observe_call(self, method: str, code: str, seconds: float) -> None:
        self.calls.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def observe_login(self, outcome: str) -> None:
        self.logins.labels(outcome).inc()

    def observe_validation(self, outcome: str) -> None:
        self.validations.labels(outcome).inc()

    def observe_store_error(self) -> None:
        self.store_errors.inc()

    def set_live_sessions(self, count: int) -> None:
        self.live_sessions.set(count)

    def serve_http(self, listen: str) -> Any:
        """Start the HTTP exposition server on ``HOST:PORT`` and return it."""
        from prometheus_client import start_http_server

        host, _, port = listen.rpartition(":")
        try:
            server, _thread = start_http_server(
                int(port), addr=host.strip("[]"), registry=self.registry
            )
        except (OSError, ValueError) as error:
            raise ConfigurationError(
                f"cannot serve metrics on --metrics-listen {listen}: {error}"
            ) from None
        log.info("metrics served: address=%s path=/metrics", listen)
        return server


async def count_live_sessions(metrics: NullMetrics, client: Any, pattern: str) -> None:
    """Count session keys with SCAN every minute and publish the count as a gauge."""
    while True:
        try:
            count = 0
            async for _ in client.scan_iter(match=pattern, count=1000):
                count += 1
            metrics.set_live_sessions(count)
        except Exception as error:
            log.warning("live session count failed: %s", type(error).__name__)
        await asyncio.sleep(LIVE_SESSION_SCAN_INTERVAL)
