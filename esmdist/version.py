"""The package version and the git commit of the source it runs from (for `esmdist --version`
and every checkpoint's version.json). Imports nothing heavy."""

from __future__ import annotations

import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def version_info() -> dict[str, str]:
    try:
        esmdist_version = version("esmdist")
    except PackageNotFoundError:
        esmdist_version = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"esmdist": esmdist_version, "git_commit": commit or "unknown"}
