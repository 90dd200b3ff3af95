"""Headless Debian ``chromium`` driven over the DevTools protocol (a websocket, via aiohttp).

Small and synchronous on purpose: ``Browser.start()`` launches chromium with a fresh profile,
``browser.page()`` attaches to its tab, and ``Page`` offers ``goto``, ``evaluate`` (awaits
promises, returns JSON values), ``screenshot`` and the console/exception messages seen so far.
Used by ``tests/comfy/test_browser.py`` and ``tools/build_examples.py`` (``from devtools.cdp import Browser``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


class CDPError(RuntimeError):
    pass


class Page:
    """One tab: a websocket session with an event loop of its own."""

    def __init__(self, ws_url: str):
        import aiohttp

        self.loop = asyncio.new_event_loop()
        self._id = 0
        self._pending: dict[int, asyncio.Future] = {}
        self.events: list[dict[str, Any]] = []
        self.console: list[dict[str, Any]] = []  # {"type", "text", "url"}

        async def connect():
            self.session = aiohttp.ClientSession()
            self.ws = await self.session.ws_connect(ws_url, max_msg_size=0, heartbeat=None)
            self.reader = asyncio.ensure_future(self._read())

        self.loop.run_until_complete(connect())
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
                continue
            self.events.append(data)
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.consoleAPICalled":
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                frames = (params.get("stackTrace") or {}).get("callFrames") or [{}]
                self.console.append({"type": params.get("type"), "text": text, "url": frames[0].get("url", "")})
            elif method == "Runtime.exceptionThrown":
                d = params.get("exceptionDetails", {})
                text = (d.get("exception") or {}).get("description") or d.get("text", "")
                self.console.append({"type": "exception", "text": text, "url": d.get("url", "")})
            elif method == "Log.entryAdded":
                e = params.get("entry", {})
                self.console.append({"type": e.get("level"), "text": e.get("text", ""), "url": e.get("url", "")})

    async def _call(self, method: str, params: dict | None, timeout: float) -> dict:
        self._id += 1
        fut = self.loop.create_future()
        self._pending[self._id] = fut
        await self.ws.send_str(json.dumps({"id": self._id, "method": method, "params": params or {}}))
        data = await asyncio.wait_for(fut, timeout)
        if "error" in data:
            raise CDPError(f"{method}: {data['error']}")
        return data.get("result", {})

    def call(self, method: str, params: dict | None = None, timeout: float = 60.0) -> dict:
        return self.loop.run_until_complete(self._call(method, params, timeout))

    def pump(self, seconds: float) -> None:
        """Let events arrive for ``seconds``."""
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def evaluate(self, expression: str, timeout: float = 60.0) -> Any:
        r = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                           "returnByValue": True, "timeout": int(timeout * 1000)},
                      timeout=timeout + 5)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise CDPError((d.get("exception") or {}).get("description") or d.get("text", "evaluation failed"))
        return r.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, interval: float = 0.25) -> Any:
        """Poll ``expression`` until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for: {expression}")
            self.pump(interval)

    def goto(self, url: str, timeout: float = 60.0) -> None:
        self.call("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete'", timeout)

    def set_viewport(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def screenshot(self, path: str, fmt: str = "png", clip: dict | None = None, quality: int | None = None) -> str:
        params: dict[str, Any] = {"format": fmt}
        if clip:
            params["clip"] = dict(clip, scale=clip.get("scale", 1))
        if quality is not None:
            params["quality"] = quality
        data = self.call("Page.captureScreenshot", params)["data"]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path

    def close(self) -> None:
        async def shut():
            self.reader.cancel()
            await self.ws.close()
            await self.session.close()

        try:
            self.loop.run_until_complete(shut())
        finally:
            self.loop.close()


class Browser:
    """A headless chromium process with a fresh ``--user-data-dir``; a context manager."""

    def __init__(self, executable: str | None = None, width: int = 1400, height: int = 900):
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise RuntimeError("no chromium executable found (Debian: apt-get install -y chromium)")
        self.size = (width, height)
        self.proc: subprocess.Popen | None = None
        self.profile: str | None = None
        self.pages: list[Page] = []

    def start(self, timeout: float = 60.0) -> "Browser":
        self.profile = tempfile.mkdtemp(prefix="inversion-chromium-")
        cmd = [self.executable, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
               f"--window-size={self.size[0]},{self.size[1]}", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + timeout
        while not (os.path.exists(port_file) and open(port_file).read().count("\n") >= 1):
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        self.port = int(open(port_file).read().splitlines()[0])
        return self

    def page(self) -> Page:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as r:
            targets = [t for t in json.loads(r.read()) if t.get("type") == "page"]
        if not targets:
            raise RuntimeError("chromium has no page target")
        page = Page(targets[0]["webSocketDebuggerUrl"])
        page.set_viewport(*self.size)
        self.pages.append(page)
        return page

    def stop(self) -> None:
        for p in self.pages:
            try:
                p.close()
            except Exception:  # the browser may already be gone
                pass
        self.pages = []
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.proc = None
        if self.profile:
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = None

    def __enter__(self) -> "Browser":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
