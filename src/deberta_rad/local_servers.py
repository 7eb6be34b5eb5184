"""What the servers this project starts on this machine share (`platform up`, `review server up`): a
folder of generated secrets kept at mode 600, a health check to wait for, and stopping by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

STOP_TIMEOUT_S = 30.0


def loopback_url(port: int) -> str:
    """The HTTP address of a server this project started: they listen on 127.0.0.1 only."""
    return f"http://127.0.0.1:{port}"


@dataclass(frozen=True)
class ServerFolder:
    """The one folder a server's `up` keeps everything in: its generated secrets and what it started."""

    root: Path

    @property
    def secrets(self) -> Path:
        return self.root / "secrets.env"

    @property
    def state(self) -> Path:
        return self.root / "state.json"


def is_running(pid: int) -> bool:
    """Whether a process with this PID exists (a zombie of ours counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, run by another account (PostgreSQL's, when started as root)
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    return True


def stop_process(pid: int, sig: signal.Signals, group: bool = False) -> bool:
    """Signal a process (or its group) and wait for it to end, by force after STOP_TIMEOUT_S; False if it
    was not running."""
    if not is_running(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while is_running(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL) if group else os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + STOP_TIMEOUT_S
        time.sleep(0.2)
    return True


def answers(url: str) -> bool:
    """Whether ``url`` (a health endpoint) answers 200."""
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def why_not_answering(url: str, server: subprocess.Popen, log: Path, timeout_s: float) -> str | None:
    """Wait until ``url`` answers 200; None when it did, else why not (the server exited: its log's end)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return f"exited with {server.returncode}; its log, {log}, ends:\n{log_tail(log)}"
        if answers(url):
            return None
        time.sleep(0.5)
    return f"did not answer at {url} within {timeout_s:g} s; see {log}"


def log_tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def read_env_file(path: Path) -> dict[str, str]:
    """NAME=value lines (a secrets file these servers wrote); empty when there is none."""
    if not path.is_file():
        return {}
    pairs = (line.partition("=") for line in path.read_text().splitlines())
    return {name.strip(): value.strip() for name, _, value in pairs if value}


def write_env_file(path: Path, values: dict[str, str]) -> None:
    """Write NAME=value lines readable by this account only (mode 600 before anything is in it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
