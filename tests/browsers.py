"""Headless Chromium for the browser tests: Debian's ``chromium`` package, driven by Playwright.

Playwright's own browser download needs a host we cannot reach; Playwright drives any Chromium through
``executable_path``, and its network routing lets a test block every request to the outside.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Screenshots the browser tests leave behind (gitignored).
ARTIFACTS = ROOT / "tests" / "artifacts"


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True, timeout=900, check=False)


def chromium_executable() -> str:
    """The system's Chromium, installed with apt-get when missing; the test fails (loudly) if it cannot be."""
    found = shutil.which("chromium")
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.fail("the browser tests need Debian's chromium package, and there is no apt-get to install it")
    print("chromium is missing: installing Debian's chromium package with apt-get")
    update = _apt_get("update")
    install = _apt_get("install", "-y", "chromium")
    found = shutil.which("chromium")
    if install.returncode != 0 or not found:
        pytest.fail(
            "could not install chromium with apt-get (the browser tests need it):\n"
            f"apt-get update: {update.returncode}\n{update.stderr[-2000:]}\n"
            f"apt-get install: {install.returncode}\n{install.stdout[-2000:]}\n{install.stderr[-2000:]}"
        )
    return found


def artifact(name: str) -> Path:
    """Where a test keeps ``name`` (printed, so a run's log says where to look)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    print(f"browser test artefact: {path}")
    return path
