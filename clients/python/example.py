"""Log in, call the protected greeter, log out, and watch the next call get rejected.

Start the auth service and the greeter first (see README.md in this folder),
then run::

    AUTHGRPC_PASSWORD=PASSWORD .venv/bin/python clients/python/example.py

Exits with 0 when every step behaved as expected, and 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from authgrpc.client import AuthClient
from authgrpc.errors import error_info
from authgrpc.example.v1 import greeter_pb2, greeter_pb2_grpc


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--auth", default="127.0.0.1:50051", help="auth service HOST:PORT"
    )
    parser.add_argument(
        "--greeter", default="127.0.0.1:50061", help="greeter HOST:PORT"
    )
    parser.add_argument("--username", default="demo", help="user to log in as")
    parser.add_argument(
        "--password",
        default=os.environ.get("AUTHGRPC_PASSWORD"),
        help="that user's password; AUTHGRPC_PASSWORD keeps it out of the process list",
    )
    args = parser.parse_args()
    if not args.password:
        parser.error("pass --password or set AUTHGRPC_PASSWORD")
    return args


def describe(error: grpc.RpcError) -> str:
    info = error_info(error)
    reason = info.reason if info is not None else "no ErrorInfo"
    return f"{error.code().name} ({reason}): {error.details()}"


def main() -> int:
    args = parse_args()
    with AuthClient(args.auth) as client:
        try:
            client.login(args.username, args.password)
        except grpc.RpcError as error:
            print(f"login failed: {describe(error)}")
            return 1
        print(f"logged in as {client.validate().username}")

        # Call credentials travel only over a channel with channel credentials.
        # Local credentials are plaintext, and gRPC allows them only on loopback.
        credentials = grpc.composite_channel_credentials(
            grpc.local_channel_credentials(), client.call_credentials()
        )
        with grpc.secure_channel(args.greeter, credentials) as channel:
            greeter = greeter_pb2_grpc.GreeterServiceStub(channel)
            reply = greeter.SayHello(greeter_pb2.SayHelloRequest(), timeout=5)
            print(f"greeter said: {reply.greeting}")
            request = greeter_pb2.StreamGreetingsRequest(count=2)
            for item in greeter.StreamGreetings(request, timeout=5):
                print(f"greeter streamed #{item.index}: {item.greeting}")

        # metadata() suits a plain insecure channel; keep the old token to
        # show that it stops working once the session ends.
        old_metadata = client.metadata()
        client.logout()
        print("logged out")

    with grpc.insecure_channel(args.greeter) as channel:
        greeter = greeter_pb2_grpc.GreeterServiceStub(channel)
        try:
            greeter.SayHello(
                greeter_pb2.SayHelloRequest(), metadata=old_metadata, timeout=5
            )
        except grpc.RpcError as error:
            print(f"call after logout rejected as expected: {describe(error)}")
            return 0
    print("call after logout succeeded, but it should have been rejected")
    return 1


if __name__ == "__main__":
    sys.exit(main())
