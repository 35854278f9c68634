"""Shared fixtures: a private runtime dir per test, child processes, the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

import commy

REPO = Path(__file__).resolve().parents[2]
#: Generous: the machine is small and shared.
LONG = 30.0


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh private runtime dir (short: socket paths are limited to 107
    bytes), also used by child processes through COMMY_RUNTIME_DIR."""
    d = tempfile.mkdtemp(prefix="cpy-", dir="/tmp")
    os.chmod(d, 0o700)
    monkeypatch.setenv("COMMY_RUNTIME_DIR", d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def mesh(runtime_dir: str) -> Iterator[commy.Mesh]:
    with commy.Mesh() as m:
        yield m


def commy_cli() -> str:
    """The Rust `commy` CLI (COMMY_CLI, else the workspace's debug build)."""
    path = os.environ.get("COMMY_CLI") or str(REPO / "target" / "debug" / "commy")
    if not os.access(path, os.X_OK):
        raise RuntimeError(
            f"the commy CLI is not at {path}: build it (cargo build -p commy-cli --bin commy) "
            "or set COMMY_CLI"
        )
    return path


class Child:
    """A child process whose stdout lines can be awaited."""

    def __init__(self, argv: List[str], env: Optional["dict[str, str]"] = None) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ) if env is None else env,
        )

    def expect(self, prefix: str, timeout: float = LONG) -> str:
        """Waits for a stdout line starting with `prefix` (failing with the
        child's stderr if it exits first)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith(prefix):
                return line.strip()
        err = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
        raise AssertionError(f"child {self.proc.args!r} never printed {prefix!r}; stderr: {err}")

    def stop(self, sig: int = 15, timeout: float = LONG) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def python_child(code: str, *args: str, env: Optional["dict[str, str]"] = None) -> Child:
    """Runs `code` in a new interpreter (with `env`, else this environment)."""
    return Child([sys.executable, "-c", code, *args], env=env)


@pytest.fixture
def children() -> Iterator[List[Child]]:
    """Children started by a test; any still running at its end are killed."""
    started: List[Child] = []
    yield started
    for c in started:
        if c.proc.poll() is None:
            c.proc.kill()
        c.proc.wait()
        for f in (c.proc.stdout, c.proc.stderr):
            if f is not None:
                f.close()


def wait_for_service(mesh: commy.Mesh, name: str, data: bytes = b"ping", timeout: float = LONG) -> Optional[bytes]:
    """Calls `name` until an instance answers (discovery is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return mesh.call(name, data, timeout=LONG)
        except (commy.NotFound, commy.Unavailable):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
