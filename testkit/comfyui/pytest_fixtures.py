"""Session fixtures for tests that run inside a real ComfyUI tree (registered by tests/conftest.py, which
defines ``comfyui_root`` and ``comfy_model_files``).

- ``comfy_model_dirs``: a fresh models tree linking the fixture files (checkpoints, clip_vision, loras, hypernets),
  in the ``{folder_name: [folder]}`` form ``run_prompts(models=...)`` and ``ComfyServer(models=...)`` take.
- ``comfyui_required()``: whether a missing prerequisite (e.g. Chromium for the browser tests) must fail rather
  than skip: under CI (``CI`` or ``COMFYUI_TESTS_REQUIRED`` set), CI must not hide a broken setup.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testkit.comfyui.fixtures import layout_models


def comfyui_required() -> bool:
    return any(os.environ.get(name, "").lower() not in ("", "0", "false") for name in ("CI", "COMFYUI_TESTS_REQUIRED"))


@pytest.fixture(scope="session")
def comfy_model_dirs(comfy_model_files, tmp_path_factory) -> dict[str, list[Path]]:
    return layout_models(tmp_path_factory.mktemp("models"), comfy_model_files)
