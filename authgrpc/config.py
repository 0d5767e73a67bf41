"""Server settings: one frozen object, read from flags and ``AUTHGRPC_*`` variables."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from authgrpc.errors import ConfigurationError
from authgrpc.keys import ALGORITHMS, DEFAULT_ALGORITHM
from authgrpc.passwords import default_hash_workers
from authgrpc.store import SessionLimits, ThrottlePolicy


@dataclass(frozen=True)
class Settings:
    """Everything ``authgrpc serve`` needs. Durations are in seconds."""

    listen: str = "127.0.0.1:50051"
    redis_url: str | None = field(default=None, repr=False)
    redis_prefix: str = "authgrpc"
    redis_timeout: float = 1.0
    signing_key: Path | None = None
    algorithm: str = DEFAULT_ALGORITHM
    issuer: str = "authgrpc"
    audience: str = "authgrpc"
    access_token_ttl: int = 300
    idle_timeout: float = 30 * 60
    absolute_timeout: float = 12 * 60 * 60
    touch_interval: float = 1.0
    refresh_grace: float = 10.0
    max_sessions_per_user: int = 0
    leeway: float = 30.0
    throttle: ThrottlePolicy = field(default_factory=ThrottlePolicy)
    trusted_proxies: tuple[str, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    grace_period: float = 10.0
    max_message_bytes: int = 64 * 1024
    max_metadata_bytes: int = 16 * 1024
    hash_workers: int = field(default_factory=default_hash_workers)
    key_reload_interval: float = 60.0
    metrics_listen: str | None = None
    refuse_evicting_redis: bool = False
    validation_cache: bool = False
    reuse_port: bool = False
    dev: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def limits(self) -> SessionLimits:
        """The session lifetimes in the store's units."""
        return SessionLimits(
            idle_ms=int(self.idle_timeout * 1000),
            absolute_ms=int(self.absolute_timeout * 1000),
            touch_interval_ms=int(self.touch_interval * 1000),
            max_per_user=self.max_sessions_per_user,
        )

    def validate(self) -> None:
        """Raise ConfigurationError naming the first invalid setting."""
        if self.algorithm not in ALGORITHMS:
            raise ConfigurationError(
                f"--algorithm must be one of {', '.join(ALGORITHMS)}, "
                f"not {self.algorithm!r}"
            )
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ConfigurationError(
                f"--listen must be HOST:PORT with a port up to 65535, "
                f"not {self.listen!r}"
            )
        positive = {
            "--access-token-ttl": self.access_token_ttl,
            "--idle-timeout": self.idle_timeout,
            "--absolute-timeout": self.absolute_timeout,
            "--redis-timeout": self.redis_timeout,
            "--grace-period": self.grace_period,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigurationError(f"{name} must be positive, not {value}")
        if self.idle_timeout > self.absolute_timeout:
            raise ConfigurationError(
                "--idle-timeout must not exceed --absolute-timeout"
            )
        if self.touch_interval < 0 or self.touch_interval >= self.idle_timeout:
            raise ConfigurationError(
                "--touch-interval must be at least 0 and shorter than --idle-timeout"
            )
        if self.leeway < 0 or self.leeway > 300:
            raise ConfigurationError("--leeway must be between 0 and 300 seconds")
        if self.refresh_grace < 0:
            raise ConfigurationError("--refresh-grace must not be negative")
        if self.max_sessions_per_user < 0:
            raise ConfigurationError("--max-sessions-per-user must not be negative")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigurationError("--tls-cert and --tls-key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigurationError("--tls-client-ca needs --tls-cert and --tls-key")
        for option, path in (
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--tls-client-ca", self.tls_client_ca),
        ):
            if path is not None and not path.is_file():
                raise ConfigurationError(f"{option} file {path} does not exist")
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ConfigurationError(
                    f"--trusted-proxies entry {proxy!r} is not an IP address or network"
                ) from None
        if not self.dev:
            if self.signing_key is None:
                raise ConfigurationError(
                    "no signing key: pass --signing-key PATH "
                    "(or set AUTHGRPC_SIGNING_KEY); "
                    "create one with `authgrpc keys generate --out PATH`, or use --dev"
                )
            if self.redis_url is None:
                raise ConfigurationError(
                    "no session store: pass --redis-url URL "
                    "(or set AUTHGRPC_REDIS_URL), or use --dev"
                )
