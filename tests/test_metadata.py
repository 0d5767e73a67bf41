"""Reading the bearer token and the caller's address from metadata."""

from __future__ import annotations

import ipaddress

import pytest

from authgrpc.errors import Reason, Unauthenticated
from authgrpc.metadata import bearer_token, client_address, peer_address

PROXIES = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("ipv4:192.0.2.1:5000", "192.0.2.1"),
        ("ipv6:[2001:db8::1]:5000", "2001:db8::1"),
        ("ipv6:%5B::1%5D:5000", "::1"),
        ("unix:/run/authgrpc.sock", "unix:/run/authgrpc.sock"),
    ],
)
def test_peer_address_forms(peer: str, expected: str) -> None:
    assert peer_address(peer) == expected


def test_forwarded_ignored_from_untrusted_peer() -> None:
    metadata = [("x-forwarded-for", "198.51.100.7")]

    address = client_address("ipv4:192.0.2.1:5000", metadata, PROXIES)

    assert address == "192.0.2.1"


def test_forwarded_used_behind_trusted_proxy() -> None:
    metadata = [("x-forwarded-for", "198.51.100.7, 10.1.2.3")]

    address = client_address("ipv4:10.0.0.5:5000", metadata, PROXIES)

    assert address == "198.51.100.7"


def test_forwarded_spoofed_left_entries_ignored() -> None:
    # The client wrote the left-most entry itself; the proxy appended its peer.
    metadata = [("x-forwarded-for", "203.0.113.9, 198.51.100.7")]

    address = client_address("ipv4:10.0.0.5:5000", metadata, PROXIES)

    assert address == "198.51.100.7"


def test_forwarded_ignored_without_trusted_proxies() -> None:
    metadata = [("x-forwarded-for", "198.51.100.7")]

    address = client_address("ipv6:[::1]:5000", metadata, [])

    assert address == "::1"


def test_bearer_scheme_any_case() -> None:
    assert bearer_token([("authorization", "bEaReR abc.def.ghi")]) == "abc.def.ghi"


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ([], Reason.TOKEN_MISSING),
        ([("authorization", "")], Reason.TOKEN_MISSING),
        ([("authorization", "Basic dXNlcjpwdw==")], Reason.TOKEN_MISSING),
        ([("authorization", "Bearer ")], Reason.TOKEN_MISSING),
        (
            [("authorization", "Bearer a"), ("authorization", "Bearer b")],
            Reason.TOKEN_MALFORMED,
        ),
        ([("authorization", "Bearer " + "a" * 9000)], Reason.TOKEN_MALFORMED),
    ],
    ids=["absent", "empty", "basic", "no-token", "two-values", "oversized"],
)
def test_bearer_rejections(metadata: list[tuple[str, str]], reason: Reason) -> None:
    with pytest.raises(Unauthenticated) as caught:
        bearer_token(metadata)

    assert caught.value.reason is reason
