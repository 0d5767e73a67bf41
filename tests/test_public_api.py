"""The names that the README promises are importable from the package root."""

from __future__ import annotations

import re
from pathlib import Path

import authgrpc

ROOT = Path(__file__).resolve().parent.parent


def test_all_names_exist() -> None:
    missing = [name for name in authgrpc.__all__ if not hasattr(authgrpc, name)]

    assert missing == []


def test_readme_names_exported() -> None:
    readme = (ROOT / "README.md").read_text()

    mentioned = set(re.findall(r"`authgrpc\.([A-Z]\w+|current_principal)`", readme))

    assert mentioned
    assert mentioned <= set(authgrpc.__all__)
