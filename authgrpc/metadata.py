"""Reading credentials and the caller's address from gRPC metadata."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from urllib.parse import unquote

from authgrpc.errors import Reason, Unauthenticated

AUTHORIZATION = "authorization"
_AUTHORIZATION_LENGTH = len(AUTHORIZATION)
MAX_AUTHORIZATION_BYTES = 8192
_SCHEME = "bearer"


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """Return the token from the single ``authorization: Bearer <token>`` entry.

    The scheme is matched without regard to case. A missing, empty or
    non-Bearer header raises Unauthenticated(TOKEN_MISSING); more than one
    header or one over 8 KiB raises Unauthenticated(TOKEN_MALFORMED).
    """
    found: str | bytes | None = None
    for key, value in metadata or ():
        # Comparing lengths first skips lowercasing every other key.
        if len(key) == _AUTHORIZATION_LENGTH and key.lower() == AUTHORIZATION:
            if found is not None:
                raise Unauthenticated(
                    Reason.TOKEN_MALFORMED, "more than one authorization metadata value"
                )
            found = value
    if found is None:
        raise Unauthenticated(Reason.TOKEN_MISSING, "authorization metadata is missing")
    value = found
    if isinstance(value, bytes):
        raise Unauthenticated(
            Reason.TOKEN_MALFORMED, "authorization metadata must be text"
        )
    if len(value) > MAX_AUTHORIZATION_BYTES:
        raise Unauthenticated(
            Reason.TOKEN_MALFORMED,
            f"authorization metadata is longer than {MAX_AUTHORIZATION_BYTES} bytes",
        )
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != _SCHEME:
        raise Unauthenticated(
            Reason.TOKEN_MISSING, "authorization metadata must use the Bearer scheme"
        )
    token = token.strip()
    if not token:
        raise Unauthenticated(
            Reason.TOKEN_MISSING, "authorization metadata has an empty Bearer token"
        )
    return token


def peer_address(peer: str) -> str:
    """Return the IP address or socket path of a gRPC peer, e.g. ``ipv4:1.2.3.4:5``."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        # grpc percent-encodes the brackets: ipv6:%5B::1%5D:50051
        return unquote(rest.rpartition(":")[0]).strip("[]")
    return peer


def client_address(
    peer: str,
    metadata: Iterable[tuple[str, str | bytes]] | None,
    trusted_proxies: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> str:
    """Return the caller's address, following ``x-forwarded-for`` via trusted proxies.

    The right-most address in the header that is not a trusted proxy is the
    client; the header is ignored unless the direct peer is trusted.
    """
    address = peer_address(peer)
    if not trusted_proxies or not _is_trusted(address, trusted_proxies):
        return address
    forwarded: list[str] = []
    for key, value in metadata or ():
        if key.lower() == "x-forwarded-for" and isinstance(value, str):
            forwarded.extend(part.strip() for part in value.split(","))
    for hop in reversed(forwarded):
        if not _is_trusted(hop, trusted_proxies):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return address
    return address


def _is_trusted(
    address: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)
