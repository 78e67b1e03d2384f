"""Run this pack inside a real ComfyUI tree: in-process (in a subprocess runner) or as the real server.

The pack is installed as a user has it: ``<custom_nodes>/comfyui-subject-hypernet`` -> the repo (a symlink;
ComfyUI imports the folder as a package although its name has hyphens). Nothing here imports ComfyUI:
the repo's ``nodes/`` package would shadow ComfyUI's ``nodes.py`` in the pytest process.

    report = run_prompts([api_prompt], models={"checkpoints": [ckpt_dir]})
    report["prompts"][0]["images"]          # absolute paths of the saved images

    with ComfyServer(comfy_root, work_dir, models={"checkpoints": [ckpt_dir]}) as server:
        entry = server.wait_history(server.post_prompt(api_prompt)["prompt_id"])
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("runner.py")
PACK_NAME = "comfyui-subject-hypernet"
TEST_ONLY_NODES = Path(__file__).with_name("test_only_nodes")


def default_comfy_root() -> Path:
    """$COMFYUI_PATH or the cached tree, fetched by scripts/get_comfyui.py if missing."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from get_comfyui import ensure_comfyui
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return ensure_comfyui()


def install_pack(folder: Path) -> Path:
    """Link the repo (and the test-only node pack) into a custom_nodes folder; returns that folder.

    ``folder`` is a custom_nodes folder, or a ComfyUI root / work dir whose ``custom_nodes`` is meant.
    Example: ``install_pack(tmp_path)`` -> ``tmp_path/custom_nodes/comfyui-subject-hypernet -> <repo>``.
    """
    folder = Path(folder)
    custom_nodes = folder if folder.name == "custom_nodes" else folder / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    for name, target in ((PACK_NAME, REPO), ("test_only_nodes", TEST_ONLY_NODES)):
        link = custom_nodes / name
        if link.is_symlink() and link.resolve() != target.resolve():
            link.unlink()  # a stale link (e.g. another checkout)
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    return custom_nodes


def run_prompts(api_prompts: list[dict], models: dict[str, list[Path]] | None = None, *, comfy_root: Path | None = None,
                work_dir: Path | None = None, input_dir: Path | None = None, output_dir: Path | None = None,
                code: str | None = None, reset_between: bool = False, node_types: list[str] | None = None,
                timeout: int = 1200) -> dict:
    """Validate and execute API-format prompts, in order, in one fresh ComfyUI process (CPU, headless).

    ``api_prompts``: prompts ``{id: {"class_type", "inputs"}}``, or items ``{"prompt": ..., "reset": bool}``
    (``reset`` clears the executor's caches first, so every node runs again; default ``reset_between``).
    ``models``: ComfyUI folder name (checkpoints, clip_vision, loras, hypernets, ...) -> folders, searched first.
    ``code``: Python run in that process after the prompts, with ``report``, ``spec``, ``executor`` in scope
    and ComfyUI initialised (``import nodes, comfy.sd`` work); whatever it assigns to ``result`` is returned
    as ``report["code_result"]``, an exception as ``report["code_error"]``.

    Returns the JSON report: ``prompts`` (one entry per prompt: ``valid``, ``error``, ``node_errors`` (per node
    id), and if valid ``success``, ``execution_error`` (node_id, node_type, exception_type, exception_message,
    traceback), ``outputs`` (the UI outputs), ``images`` (absolute paths of saved files), ``progress``,
    ``seconds``, ``rss_mb``, ``max_rss_mb``), ``loaded_nodes``, ``import_failures``, ``log`` (stderr), ``work_dir``.
    """
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="comfyui-run-")).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    comfy_root = Path(comfy_root or default_comfy_root()).resolve()
    input_dir = Path(input_dir or work_dir / "input").resolve()
    output_dir = Path(output_dir or work_dir / "output").resolve()
    for folder in (input_dir, output_dir):
        folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "comfy_root": str(comfy_root), "custom_nodes": str(install_pack(work_dir / "custom_nodes")),
        "output_dir": str(output_dir), "input_dir": str(input_dir), "temp_dir": str(work_dir / "temp"),
        "models": {k: [str(Path(p).resolve()) for p in v] for k, v in (models or {}).items()}, "prompts": api_prompts,
        "code": code, "report_path": str(work_dir / "report.json"), "reset_between": reset_between, "repo": str(REPO),
        "node_types": node_types or [],
    }
    spec_path = work_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    (work_dir / "report.json").unlink(missing_ok=True)
    # PYTHONPATH cleared: the runner's sys.path must start with the ComfyUI root, not the repo.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, str(RUNNER), str(spec_path)], cwd=comfy_root, env=env,
                            capture_output=True, text=True, timeout=timeout)
    (work_dir / "comfyui.log").write_text(result.stdout + "\n" + result.stderr)
    if result.returncode != 0 or not (work_dir / "report.json").exists():
        raise RuntimeError(f"ComfyUI runner failed (exit {result.returncode}), log in {work_dir / 'comfyui.log'}:\n"
                           f"{result.stderr[-5000:]}")
    report = json.loads((work_dir / "report.json").read_text())
    report["log"] = result.stderr
    report["work_dir"] = str(work_dir)
    return report


def run_in_comfyui(comfy_root: Path, work_dir: Path, *, models: dict[str, list[Path]], prompts: list[dict],
                   code: str | None = None, reset_between: bool = False, node_types: list[str] | None = None,
                   timeout: int = 1200) -> dict:
    """:func:`run_prompts` with the ComfyUI root and work dir first (input/output under ``work_dir``)."""
    return run_prompts(prompts, models, comfy_root=comfy_root, work_dir=work_dir, code=code, reset_between=reset_between,
                       node_types=node_types, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """The real ComfyUI server (``main.py --cpu``) on a free loopback port; stopped on exit.

    Everything it writes goes under ``work_dir`` (output/, input/, user/, temp/, server.log); the ComfyUI tree
    is not written to. ``front_end_root``: a folder to serve as the web UI (e.g. comfyui-frontend-package's
    ``static``); default an empty folder, enough for the HTTP API.
    """

    def __init__(self, comfy_root: Path, work_dir: Path, models: dict[str, list[Path]] | None = None,
                 front_end_root: Path | None = None, extra_args: list[str] | None = None, start_timeout: float = 300):
        self.comfy_root, self.work_dir, self.models = Path(comfy_root).resolve(), Path(work_dir).resolve(), models or {}
        self.front_end_root, self.extra_args, self.start_timeout = front_end_root, extra_args or [], start_timeout
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log_path = self.work_dir / "server.log"

    def __enter__(self) -> "ComfyServer":
        self.work_dir.mkdir(parents=True, exist_ok=True)
        custom_nodes = install_pack(self.work_dir / "custom_nodes")
        folders = {name: "\n".join(str(Path(p).resolve()) for p in paths) for name, paths in self.models.items()}
        config_path = self.work_dir / "extra_model_paths.yaml"
        config_path.write_text(yaml.safe_dump({"tests": {"base_path": "/", **folders, "custom_nodes": str(custom_nodes)}}))
        front_end = Path(self.front_end_root or self.work_dir / "empty_front_end")
        front_end.mkdir(parents=True, exist_ok=True)
        for sub in ("output", "input", "user", "temp"):
            (self.work_dir / sub).mkdir(exist_ok=True)
        command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-api-nodes",
                   "--front-end-root", str(front_end), "--extra-model-paths-config", str(config_path),
                   "--output-directory", str(self.work_dir / "output"), "--input-directory", str(self.work_dir / "input"),
                   "--temp-directory", str(self.work_dir / "temp"), "--user-directory", str(self.work_dir / "user"),
                   "--database-url", "sqlite:///:memory:", "--disable-auto-launch", *self.extra_args]
        self._log = open(self.log_path, "w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        self.process = subprocess.Popen(command, cwd=self.comfy_root, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)  # its own process group, killed as a whole on exit
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.time() + self.start_timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited ({self.process.returncode}):\n{self.read_log()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI server did not answer within {self.start_timeout} s:\n{self.read_log()[-4000:]}")

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if not self._log.closed:
            self._log.close()

    def read_log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str) -> tuple[str, bytes]:
        """GET a file as the front end would: its content type and bytes."""
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return response.headers.get_content_type(), response.read()

    def post(self, path: str, payload) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                body = response.read()
                return response.status, json.loads(body) if body.strip() else {}
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def post_prompt(self, api_prompt: dict) -> dict:
        """POST /prompt; the server's reply plus ``http_status`` (200: has ``prompt_id``; 400: ``error``, ``node_errors``)."""
        status, body = self.post("/prompt", {"prompt": api_prompt})
        return {"http_status": status, **body}

    def wait_history(self, prompt_id: str, timeout: float = 600) -> dict:
        """Poll /history/<id> until the prompt finished; its history entry (``status``, ``outputs``)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI server died ({self.process.returncode}):\n{self.read_log()[-4000:]}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def run_prompt(self, api_prompt: dict, timeout: float = 600) -> dict:
        """post_prompt + wait_history: the history entry, or the rejection (``http_status`` != 200)."""
        reply = self.post_prompt(api_prompt)
        if reply["http_status"] != 200:
            return reply
        return self.wait_history(reply["prompt_id"], timeout)

    def image_paths(self, entry: dict) -> list[Path]:
        """Absolute paths of the images a history entry reports as saved."""
        folders = {"output": self.work_dir / "output", "input": self.work_dir / "input", "temp": self.work_dir / "temp" / "temp"}
        return [folders[image.get("type", "output")] / image["subfolder"] / image["filename"]
                for node in entry.get("outputs", {}).values() for image in node.get("images", [])]
