"""Debian's headless Chromium, driven over the DevTools protocol (CDP) on a loopback WebSocket.

Enough for tests and benchmarks of the node's pages: open a URL and wait for its load event, evaluate
JavaScript, take a full-page screenshot. No browser download: the system `chromium` (apt) is used.
"""
from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

from tests.helpers import free_port


class BrowserError(RuntimeError):
    def __init__(self, what: str) -> None:
        super().__init__(f"chromium: {what}")


class Chromium:
    """One headless Chromium with one page; a context manager that ends the browser on exit."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 900, timeout: float = 60.0) -> None:
        executable = shutil.which("chromium")
        if executable is None:
            raise BrowserError("not installed: apt-get install -y chromium (.ci/run does)")
        self.timeout = timeout
        port = free_port()
        profile.mkdir(parents=True, exist_ok=True)
        self.log = profile / "chromium.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [executable, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
                 "--disable-background-networking", f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
                 "--remote-debugging-address=127.0.0.1", f"--window-size={width},{height}", "about:blank"],
                stdout=log, stderr=subprocess.STDOUT)
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        self._closing = contextlib.ExitStack()
        self._closing.callback(self._end_process)
        self.ws: ClientConnection = self._closing.enter_context(
            connect(self._page_socket(port), max_size=None, open_timeout=timeout))
        self.send("Page.enable")

    def _page_socket(self, port: int) -> str:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrowserError(f"exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                pages = [t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"]
                if pages:
                    return str(pages[0])
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise BrowserError(f"no DevTools page after {self.timeout:.0f} s")

    def _receive(self, deadline: float) -> dict[str, Any]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BrowserError(f"no answer within {self.timeout:.0f} s")
        return dict(json.loads(self.ws.recv(timeout=remaining)))

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call a CDP method and return its result; events arriving meanwhile are kept for ``wait_for``."""
        self._next_id += 1
        self.ws.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._receive(deadline)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))
            if "method" in message:
                self._events.append(message)

    def wait_for(self, event: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            for i, message in enumerate(self._events):
                if message["method"] == event:
                    return dict(self._events.pop(i).get("params", {}))
            self._events.append(self._receive(deadline))

    def open(self, url: str) -> None:
        """Navigate and wait for the load event (the page and all its images fetched)."""
        self._events.clear()
        answer = self.send("Page.navigate", url=url)
        if answer.get("errorText"):
            raise BrowserError(f"cannot open {url}: {answer['errorText']}")
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"script failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page, beyond the window's height."""
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def _end_process(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        """Close the DevTools connection, then end the browser."""
        self._closing.close()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
