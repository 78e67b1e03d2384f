"""Headless Chromium driven over the DevTools protocol (no WebDriver needed): open a page, run JS, screenshot."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Browser:
    def __init__(self, executable: str):
        self.executable, self.port = executable, _free_port()
        self._ids = itertools.count(1)

    def __enter__(self) -> "Browser":
        import websocket

        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1600,1000", f"--user-data-dir={self.profile}",
                 f"--remote-debugging-port={self.port}", "about:blank"]
        self.process = subprocess.Popen([self.executable, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=5) as response:
                    pages = [t for t in json.loads(response.read()) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError("Chromium did not start")
            time.sleep(0.5)
        self.socket = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=120, suppress_origin=True)
        self.send("Runtime.enable")
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.socket.close()
        finally:
            self.process.kill()
            self.process.wait(10)
            shutil.rmtree(self.profile, ignore_errors=True)

    def send(self, method: str, **params) -> dict:
        message_id = next(self._ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.socket.recv())
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        """Evaluate JS (awaiting promises) and return its JSON value."""
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error: {result['exceptionDetails'].get('exception', {}).get('description', result['exceptionDetails'])}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.send("Page.enable")
        self.send("Page.navigate", url=url)

    def wait_for(self, expression: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.evaluate(expression):
                    return
            except RuntimeError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"page never satisfied: {expression}")

    def screenshot(self, path: Path, clip: tuple[float, float, float, float] | None = None) -> Path:
        """PNG of the page, or of the ``clip`` rectangle (x, y, width, height in CSS pixels)."""
        region = {"clip": dict(zip(("x", "y", "width", "height"), clip), scale=1)} if clip else {}
        data = self.send("Page.captureScreenshot", format="png", **region)["data"]
        path.write_bytes(base64.b64decode(data))
        return path


# -- ComfyUI's front end in that browser ------------------------------------------------------------

def open_comfyui(browser: Browser, url: str, pack_node: str = "SubjectHyperNet_PredictSubjectLora") -> None:
    """Open the front end and wait until it knows the pack's nodes (the server's /object_info was read)."""
    browser.goto(url)
    browser.wait_for(f"!!(window.app && window.app.graph && window.LiteGraph && window.LiteGraph.registered_node_types['{pack_node}'])", timeout=180)


def load_workflow(browser: Browser, workflow: dict, name: str) -> dict:
    """Load a UI workflow as the template browser does (stored view restored) and report what the front end made of it.

    Returns ``types``, ``missing`` (node types the front end does not know), ``output`` (its API prompt),
    ``nodes`` ({id, type, title, rect}: rect = [x, y, w, h] in graph units, title bar included, after the front
    end grew nodes to their minimum size and image nodes by their loaded preview), ``groups`` ({title, rect}), ``scale``, ``offset``, ``low_quality``
    (the front end draws nodes without text), ``lod_threshold`` (the zoom below which it does) and ``canvas``
    (its size in CSS pixels).
    """
    return browser.evaluate(f"""(async () => {{
        const canvas = window.app.canvas;
        // the level-of-detail threshold the user's setting gives (show_whole_graph switches it off)
        canvas.min_font_size_for_lod = window.app.extensionManager.setting.get("LiteGraph.Canvas.MinFontSizeForLOD");
        await window.app.loadGraphData({json.dumps(workflow)}, true, true, {json.dumps(name)});
        // image nodes grow by their preview once the image has loaded: wait for that (at most 10 s)
        const loading = () => window.app.graph._nodes.some(n => n.type === "LoadImage" && !(n.imgs?.length && n.imgs.every(i => i.complete)));
        for (let waited = 0; loading() && waited < 10000; waited += 100) await new Promise(resolve => setTimeout(resolve, 100));
        await new Promise(resolve => requestAnimationFrame(() => requestAnimationFrame(resolve)));
        const graph = window.app.graph;
        const prompt = await window.app.graphToPrompt();
        return {{
            types: graph._nodes.map(n => n.type),
            missing: graph._nodes.map(n => n.type).filter(t => !window.LiteGraph.registered_node_types[t]),
            output: prompt.output,
            nodes: graph._nodes.map(n => ({{id: n.id, type: n.type, title: n.title, rect: Array.from(n.boundingRect)}})),
            groups: graph._groups.map(g => ({{title: g.title, rect: [g.pos[0], g.pos[1], g.size[0], g.size[1]]}})),
            scale: canvas.ds.scale, offset: Array.from(canvas.ds.offset),
            low_quality: canvas.low_quality, lod_threshold: canvas._lowQualityZoomThreshold,
            canvas: [canvas.canvas.clientWidth, canvas.canvas.clientHeight],
        }};
    }})()""")


def show_whole_graph(browser: Browser, screen: tuple[float, float, float, float]) -> dict:
    """Zoom so the whole graph fits the ``screen`` rectangle (x, y, w, h, CSS pixels), text drawn at any zoom and
    the minimap hidden. Returns ``clip`` (the rectangle the graph occupies, for a screenshot), ``scale`` and
    ``offset`` (screen = (graph + offset) * scale)."""
    return browser.evaluate(f"""(async () => {{
        const [x, y, w, h] = {json.dumps(list(screen))};
        const graph = window.app.graph, canvas = window.app.canvas;
        await window.app.extensionManager.setting.set("Comfy.Minimap.Visible", false);
        canvas.min_font_size_for_lod = 0;
        const rects = [...graph._nodes.map(n => Array.from(n.boundingRect)), ...graph._groups.map(g => [g.pos[0], g.pos[1], g.size[0], g.size[1]])];
        const left = Math.min(...rects.map(r => r[0])), top = Math.min(...rects.map(r => r[1]));
        const right = Math.max(...rects.map(r => r[0] + r[2])), bottom = Math.max(...rects.map(r => r[1] + r[3]));
        const scale = Math.min(w / (right - left), h / (bottom - top));
        canvas.ds.scale = scale;
        canvas.ds.offset = [x / scale - left, y / scale - top];
        graph.setDirtyCanvas(true, true);
        await new Promise(resolve => setTimeout(resolve, 500));
        return {{clip: [x, y, (right - left) * scale, (bottom - top) * scale], scale, offset: Array.from(canvas.ds.offset)}};
    }})()""")
