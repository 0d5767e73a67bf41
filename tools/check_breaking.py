"""Run `buf breaking` against the proto as committed on main, when main exists.

A fresh clone of main compares main with itself, which passes; a branch or a
working tree with uncommitted proto changes is checked against main.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUF = ["npx", "--yes", "@bufbuild/buf@1.75.0"]


def main() -> int:
    has_main = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", "refs/heads/main"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    if has_main.returncode != 0:
        print("no main branch to compare with; skipping buf breaking")
        return 0
    against = ".git#branch=main"
    result = subprocess.run(
        [*BUF, "breaking", "--against", against], cwd=ROOT, check=False
    )
    if result.returncode == 0:
        print("buf breaking: no breaking change against main")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
