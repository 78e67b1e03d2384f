"""Run this pack inside a real ComfyUI tree: in-process (through a subprocess runner) or as a server.

The pack is installed as a user has it: ``<custom_nodes>/comfyui-subject-hypernet`` -> the repo.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("runner.py")
PACK_NAME = "comfyui-subject-hypernet"


TEST_ONLY_NODES = Path(__file__).with_name("test_only_nodes")


def install_pack(custom_nodes: Path) -> Path:
    """``custom_nodes/comfyui-subject-hypernet`` -> the repo, plus the test-only node pack."""
    custom_nodes.mkdir(parents=True, exist_ok=True)
    for name, target in ((PACK_NAME, REPO), ("test_only_nodes", TEST_ONLY_NODES)):
        link = custom_nodes / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    return custom_nodes


def run_in_comfyui(comfy_root: Path, work_dir: Path, *, models: dict[str, list[Path]], prompts: list[dict],
                   code: str | None = None, reset_between: bool = False, node_types: list[str] | None = None, timeout: int = 1200) -> dict:
    """Validate and execute ``prompts`` (API format) in one ComfyUI process; returns the runner's report.

    ``models`` maps ComfyUI folder names (checkpoints, clip_vision, hypernets, loras, ...) to folders.
    ``code`` runs after the prompts with ``report``/``spec``/``executor`` in scope; it may set ``result``.
    ``reset_between`` clears the executor's cache before each prompt, so every node runs again.
    """
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("output", "input"):
        (work_dir / sub).mkdir(exist_ok=True)
    spec = {
        "comfy_root": str(Path(comfy_root).resolve()), "custom_nodes": str(install_pack(work_dir / "custom_nodes")),
        "output_dir": str(work_dir / "output"), "input_dir": str(work_dir / "input"),
        "models": {k: [str(Path(p).resolve()) for p in v] for k, v in models.items()}, "prompts": prompts, "code": code,
        "report_path": str(work_dir / "report.json"), "reset_between": reset_between, "repo": str(REPO),
        "node_types": node_types or [],
    }
    spec_path = work_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, str(RUNNER), str(spec_path.resolve())], cwd=Path(comfy_root).resolve(), env=env, capture_output=True, text=True, timeout=timeout)
    (work_dir / "comfyui.log").write_text(result.stdout + "\n" + result.stderr)
    if result.returncode != 0 or not (work_dir / "report.json").exists():
        raise RuntimeError(f"ComfyUI runner failed (exit {result.returncode}):\n{result.stderr[-5000:]}")
    report = json.loads((work_dir / "report.json").read_text())
    report["log"] = result.stderr
    return report


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """The real ComfyUI server (``main.py --cpu``) on a free loopback port; stopped on exit."""

    def __init__(self, comfy_root: Path, work_dir: Path, models: dict[str, list[Path]], front_end_root: Path | None = None):
        self.comfy_root, self.work_dir, self.models = comfy_root, work_dir, models
        self.front_end_root = front_end_root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ComfyServer":
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = {"tests": {"base_path": "/", **{name: "\n".join(str(p) for p in paths) for name, paths in self.models.items()},
                            "custom_nodes": str(install_pack(self.work_dir / "custom_nodes"))}}
        config_path = self.work_dir / "extra_model_paths.yaml"
        config_path.write_text(yaml.safe_dump(config))
        front_end = self.front_end_root or (self.work_dir / "empty_front_end")
        front_end.mkdir(parents=True, exist_ok=True)
        for sub in ("output", "input", "user"):
            (self.work_dir / sub).mkdir(exist_ok=True)
        command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-api-nodes",
                   "--front-end-root", str(front_end), "--extra-model-paths-config", str(config_path),
                   "--output-directory", str(self.work_dir / "output"), "--input-directory", str(self.work_dir / "input"),
                   "--user-directory", str(self.work_dir / "user"), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
        self.log = open(self.work_dir / "server.log", "w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        self.process = subprocess.Popen(command, cwd=self.comfy_root, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited ({self.process.returncode}):\n{self.read_log()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"ComfyUI server did not start:\n{self.read_log()[-4000:]}")

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.log.close()

    def read_log(self) -> str:
        return (self.work_dir / "server.log").read_text(errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, payload) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                body = response.read()
                return response.status, json.loads(body) if body.strip() else {}
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def run_prompt(self, prompt: dict, timeout: float = 600) -> dict:
        """POST /prompt, poll /history until done; returns the history entry (raises on a 400)."""
        status, body = self.post("/prompt", {"prompt": prompt})
        if status != 200:
            return {"http_status": status, **body}
        prompt_id = body["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")
