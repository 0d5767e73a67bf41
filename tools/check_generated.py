"""Fail when the committed protobuf code differs from what `make proto` generates."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "protos/authgrpc/v1/auth.proto"
GENERATED = ["auth_pb2.py", "auth_pb2.pyi", "auth_pb2_grpc.py"]


def main() -> int:
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iprotos",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            PROTO,
        ]
        subprocess.run(command, cwd=ROOT, check=True)
        stale = []
        for name in GENERATED:
            fresh = Path(out, "authgrpc", "v1", name).read_bytes()
            committed = ROOT / "authgrpc" / "v1" / name
            if not committed.exists() or committed.read_bytes() != fresh:
                stale.append(str(committed.relative_to(ROOT)))
    if stale:
        print(
            f"generated code is stale: {', '.join(stale)}; run `make proto` and commit"
        )
        return 1
    print("generated code matches", PROTO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
