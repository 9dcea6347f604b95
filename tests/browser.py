"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol on a pipe: no driver, no port.

Chromium started with ``--remote-debugging-pipe`` reads protocol messages (JSON, each ended by a NUL byte)
on its file descriptor 3 and writes its answers and events on descriptor 4. Every read has a deadline
(``timeout``), so a hung browser fails the test instead of blocking it. ``Browser`` is a context manager
that ends the browser on exit.
"""
from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class BrowserError(RuntimeError):
    def __init__(self, method: str, error: Any) -> None:
        super().__init__(f"{method} failed: {error}")


class Browser:
    """One page in a headless Chromium; ``close`` (or leaving a ``with`` block) ends the browser.

    ``timeout`` bounds the wait for each answer or awaited event, in seconds.
    """

    def __init__(self, profile: Path, width: int = 1280, height: int = 800, timeout: float = 60.0) -> None:
        assert CHROMIUM, "Debian's chromium is not installed (apt-get install chromium)"
        self.timeout = timeout
        profile.mkdir(parents=True, exist_ok=True)
        self.log = profile / "chromium.log"  # its stderr, quoted when it dies
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        # WebGL without a GPU: SwiftShader, which Chromium only uses in headless mode when told
        flags = ["--headless=new", "--no-sandbox", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                 f"--window-size={width},{height}", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio"]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser} {to_browser}<&- {from_browser}>&-',
                 CHROMIUM, *flags, "about:blank"],
                pass_fds=(to_browser, from_browser), stdout=subprocess.DEVNULL, stderr=log)
        os.close(to_browser)
        os.close(from_browser)
        self._closed = False
        self._buffer = b""
        self._next_id = 0
        # the load events since the last ``goto`` (other events are only noted for the console)
        self._loads: list[dict[str, Any]] = []
        # the page's console errors, uncaught exceptions and failed requests, for failure messages
        self.console: list[str] = []
        try:
            target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.call("Page.enable", session=True)
            self.call("Runtime.enable", session=True)
            self.call("Network.enable", session=True)
            self.call("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=True)
        except BaseException:
            self.close()  # no browser left behind when it does not come up
            raise

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = False) -> dict[str, Any]:
        """Send one command and return its result; BrowserError when none comes within ``timeout``.

        ``session``: a command for the page (Page.*, Runtime.*, Network.*), not for the browser.
        """
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            answer = self._receive(deadline, method)
            self._note(answer)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(method, answer["error"])
                return answer.get("result", {})

    def _note(self, event: dict[str, Any]) -> None:
        params = event.get("params", {})
        if event.get("method") == "Page.loadEventFired":
            self._loads.append(params)
        elif event.get("method") == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning"):
            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])[:300])
        elif event.get("method") == "Network.responseReceived" and params["response"]["status"] >= 400:
            response = params["response"]
            accept = response.get("requestHeaders", {}).get("Accept", "")
            self.console.append(f"HTTP {response['status']} {response['url'][-80:]} (Accept: {accept})")
        elif event.get("method") == "Runtime.exceptionThrown":
            self.console.append(str(params["exceptionDetails"].get("exception", {}).get("description", ""))[:300])

    def _receive(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        """The next message, or BrowserError at ``deadline`` (``os.read`` alone would block forever)."""
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._read], [], [], remaining)[0]:
                raise BrowserError(waiting_for, f"no answer from chromium within {self.timeout:.0f} s")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise BrowserError(waiting_for, f"chromium closed the pipe; its log ends: {tail}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def goto(self, url: str) -> None:
        """Navigate and wait for the load event (the document and all its images fetched)."""
        self._loads.clear()
        answer = self.call("Page.navigate", {"url": url}, session=True)
        if answer.get("errorText"):
            raise BrowserError("Page.navigate", f"cannot open {url}: {answer['errorText']}")
        if "loaderId" not in answer:
            return  # a same-document navigation (only the #fragment changed) has no load event
        deadline = time.monotonic() + self.timeout
        while not self._loads:
            self._note(self._receive(deadline, f"the load event of {url}"))

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session=True)
        if "exceptionDetails" in result:
            raise BrowserError("Runtime.evaluate", result["exceptionDetails"].get("text"))
        return result["result"].get("value")

    def screenshot(self, path: Path | None = None, full_page: bool = False) -> Image.Image:
        """The page as a picture, also written to ``path`` as a PNG when given; ``full_page``: beyond
        the window's height too."""
        answer = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": full_page}, session=True)
        data = base64.b64decode(answer["data"])
        if path is not None:
            path.write_bytes(data)
        return Image.open(io.BytesIO(data)).convert("RGB")

    def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        """Poll a JavaScript expression until it is truthy; its value, or BrowserError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError("wait", f"{what} not seen within {timeout:.0f} s")
            time.sleep(0.25)

    def close(self) -> None:
        """End the browser (once; a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        self.timeout = min(self.timeout, 10.0)
        try:
            self.call("Browser.close")
        except (BrowserError, OSError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._write)
        os.close(self._read)


def region_spread(picture: Image.Image, box: tuple[float, float, float, float]) -> float:
    """The standard deviation of the grey levels in ``box`` (left, top, width, height): ~0 when uniform."""
    left, top, width, height = (int(round(v)) for v in box)
    crop = picture.crop((left, top, left + width, top + height)).convert("L")
    return float(np.asarray(crop, dtype=np.float64).std())
