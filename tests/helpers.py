"""Helpers for tests that talk to a real node: free ports, dcmtk tools as peers, condition waits."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dcmtk_env() -> dict[str, str]:
    """dcmtk's tools leave Nagle's algorithm on unless told; every message would stall ~40 ms."""
    return {**os.environ, "TCP_NODELAY": "1"}


def dcmtk(tool: str, *args: str | Path, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=dcmtk_env(), cwd=cwd)


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    wait_until(lambda: port_open(port), timeout, f"port {port} to accept connections")
