"""A headless Chromium driven over the Chrome DevTools Protocol, for the dashboard's browser test.

No Playwright or Selenium (they download their own browsers; these machines have no internet): the system's
``chromium`` (Debian's package) runs with ``--remote-debugging-port=0``, writes the port it chose to
``DevToolsActivePort`` in its profile dir, and we talk JSON-RPC to its page target over a websocket
(trio-websocket, already installed with libp2p).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import open_websocket_url

from tests.cluster import wait_until


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class CdpError(Exception):
    """Chromium answered a command with an error, or a page script threw."""


class Page:
    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One CDP command; events that arrive before its answer are dropped (nothing here needs them)."""
        msg_id = next(self._ids)
        await self._ws.send_message(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            answer = json.loads(await self._ws.get_message())
            if answer.get("id") == msg_id:
                if "error" in answer:
                    raise CdpError(f"{method}: {answer['error']}")
                return answer["result"]  # type: ignore[no-any-return]

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def eval(self, expression: str) -> Any:
        """The value of a JS expression in the page (promises awaited)."""
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise CdpError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str) -> Any:
        """Poll a JS expression until its value is truthy in Python (the caller bounds the time with fail_after).

        A DOM node comes back as ``{}``, which Python finds false: ask for ``!!node`` or a property instead.
        """

        async def check() -> Any:
            try:
                return await self.eval(expression)
            except CdpError:  # e.g. the page is still navigating
                return None

        return await wait_until(check, interval=0.2)

    async def screenshot(self, path: Path) -> None:
        data = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        await trio.Path(path).write_bytes(base64.b64decode(data["data"]))


@contextlib.asynccontextmanager
async def open_page(chromium: str, profile: Path, *, width: int = 1400, height: int = 1800) -> AsyncIterator[Page]:
    """Start a headless Chromium with a fresh profile and yield its one page; kill it after."""
    await trio.Path(profile).mkdir(parents=True, exist_ok=True)
    args = [
        chromium,
        "--headless=new",
        "--remote-debugging-port=0",
        "--remote-allow-origins=*",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-gpu",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "about:blank",
    ]
    if os.geteuid() == 0:  # Chromium refuses to run as root inside its own sandbox
        args.insert(1, "--no-sandbox")
    process = await trio.lowlevel.open_process(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"

        async def port() -> int | None:
            if process.returncode is not None:
                raise RuntimeError(f"chromium exited with status {process.returncode}")
            text = port_file.read_text() if port_file.exists() else ""
            return int(text.split()[0]) if text.strip() else None

        debug_port = await wait_until(port, interval=0.1)
        async with httpx.AsyncClient(trust_env=False) as http:

            async def page_target() -> str | None:
                targets = (await http.get(f"http://127.0.0.1:{debug_port}/json/list")).json()
                return next((t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page"), None)

            ws_url = await wait_until(page_target, interval=0.1)
        async with open_websocket_url(ws_url, max_message_size=64 << 20) as ws:
            page = Page(ws)
            await page.send("Page.enable")
            await page.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                            mobile=False)  # fmt: skip
            yield page
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
