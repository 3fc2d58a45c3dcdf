"""moefuse's version: the installed distribution's, else the source tree's ``pyproject.toml`` (a copy of the
tree run with ``PYTHONPATH=src``, as on the GPU machines)."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def package_version() -> str:
    try:
        return version("moefuse")
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        found = (
            re.search(r'(?m)^version\s*=\s*"([^"]+)"', pyproject.read_text()) if pyproject.is_file() else None
        )
        return found.group(1) if found else "unknown"
