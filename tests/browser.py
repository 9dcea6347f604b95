"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol on a pipe: no driver, no port.

Chromium started with ``--remote-debugging-pipe`` reads protocol messages (JSON, each ended by a NUL byte)
on its file descriptor 3 and writes its answers and events on descriptor 4.
"""
from __future__ import annotations

import base64
import io
import json
import os
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
    """One page in a headless Chromium; ``close`` ends the browser."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 800) -> None:
        assert CHROMIUM, "Debian's chromium is not installed (apt-get install chromium)"
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        # WebGL without a GPU: SwiftShader, which Chromium only uses in headless mode when told
        flags = ["--headless=new", "--no-sandbox", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                 f"--window-size={width},{height}", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio"]
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser} {to_browser}<&- {from_browser}>&-',
             CHROMIUM, *flags, "about:blank"],
            pass_fds=(to_browser, from_browser), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next_id = 0
        # the page's console errors, uncaught exceptions and failed requests, for failure messages
        self.console: list[str] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)
        self.call("Network.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=True)

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = False) -> dict[str, Any]:
        """Send one command and return its result (events that arrive meanwhile are dropped)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._receive()
            self._note(answer)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(method, answer["error"])
                return answer.get("result", {})

    def _note(self, event: dict[str, Any]) -> None:
        params = event.get("params", {})
        if event.get("method") == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning"):
            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])[:300])
        elif event.get("method") == "Network.responseReceived" and params["response"]["status"] >= 400:
            response = params["response"]
            accept = response.get("requestHeaders", {}).get("Accept", "")
            self.console.append(f"HTTP {response['status']} {response['url'][-80:]} (Accept: {accept})")
        elif event.get("method") == "Runtime.exceptionThrown":
            self.console.append(str(params["exceptionDetails"].get("exception", {}).get("description", ""))[:300])

    def _receive(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise BrowserError("read", "chromium closed the pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url}, session=True)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session=True)
        if "exceptionDetails" in result:
            raise BrowserError("Runtime.evaluate", result["exceptionDetails"].get("text"))
        return result["result"].get("value")

    def screenshot(self) -> Image.Image:
        data = self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

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
