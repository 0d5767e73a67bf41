"""Fail when the committed protobuf code differs from what `make proto` generates."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ["protos/authgrpc/v1/auth.proto", "protos/authgrpc/example/v1/greeter.proto"]
SUFFIXES = ["_pb2.py", "_pb2.pyi", "_pb2_grpc.py"]


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
            *PROTOS,
        ]
        subprocess.run(command, cwd=ROOT, check=True)
        stale = []
        for proto in PROTOS:
            stem = Path(proto).relative_to("protos").with_suffix("")
            for suffix in SUFFIXES:
                relative = f"{stem}{suffix}"
                fresh = Path(out, relative).read_bytes()
                committed = ROOT / relative
                if not committed.exists() or committed.read_bytes() != fresh:
                    stale.append(relative)
    if stale:
        print(f"generated code is stale: {', '.join(stale)}; run `make proto`, commit")
        return 1
    print("generated code matches", ", ".join(PROTOS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
