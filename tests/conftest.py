"""Session fixtures shared by the tests that run inside a real ComfyUI tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"
sys.path.insert(0, str(REPO / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Names the shipped workflows use for the user's model files.
WORKFLOW_FILES = {
    "checkpoints": "v1-5-pruned-emaonly.safetensors",
    "clip_vision": "CLIP-ViT-L-14.safetensors",
    "hypernets": "subject_hypernet_sd15.safetensors",  # hypernet.files.COMFYUI_HYPERNET_NAME
}
SDXL_WORKFLOW_FILES = {"checkpoints": "sd_xl_base_1.0.safetensors", "hypernets": "subject_hypernet_sdxl.safetensors"}


@pytest.fixture(scope="session")
def comfyui_root() -> Path:
    from get_comfyui import ensure_comfyui

    return ensure_comfyui()


@pytest.fixture(scope="session")
def comfy_model_files(comfyui_root) -> dict[str, Path]:
    from testkit.comfyui.fixtures import build_model_files

    return build_model_files(comfyui_root, CACHE)


@pytest.fixture(scope="session")
def trained_hypernet(comfy_model_files, tmp_path_factory) -> Path:
    """A hypernetwork trained by `python -m training.train` on the fixture checkpoint and CLIP vision files, with the
    tuning encoder's word embedding (`--token-embedding true`), which Subject Prompt Encode and Subject Tuning need."""
    out = tmp_path_factory.mktemp("trained_hypernet")
    command = [
        sys.executable, "-m", "training.train", "--backbone", str(comfy_model_files["checkpoint"]),
        "--image-encoder", str(comfy_model_files["clip_vision"]), "--data", "synthetic", "--synthetic-subjects", "4",
        "--synthetic-images-per-subject", "2", "--resolution", "64", "--width", "64", "--depth", "1", "--heads", "4",
        "--iterations", "2", "--lidb-a", "16", "--lidb-b", "16", "--batch-size", "2", "--max-steps", "4",
        "--learning-rate", "3e-3", "--sample-subjects", "0", "--token-embedding", "true", "--output-dir", str(out),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    (out / "console.txt").write_text(result.stdout)  # what the trainer told the user
    return out / "hypernet.safetensors"


@pytest.fixture(scope="session")
def comfy_sdxl_files(comfyui_root) -> dict[str, Path]:
    from testkit.comfyui.fixtures import build_sdxl_model_files

    return build_sdxl_model_files(comfyui_root, CACHE)


@pytest.fixture(scope="session")
def trained_sdxl_hypernet(comfy_sdxl_files, comfy_model_files, tmp_path_factory) -> Path:
    """A hypernetwork trained by `python -m training.train` on the smallest SDXL checkpoint (2 steps: what the tests
    need is a file made by the trainer for the SDXL layout, both text encoders included). It reads the CLIP vision
    model's pooled embedding (`--hidden-state image_embeds`, the toy study's recipe), so that path runs through real
    ComfyUI nodes too; the SD1.5 one reads the default tokens."""
    out = tmp_path_factory.mktemp("trained_sdxl_hypernet")
    command = [
        sys.executable, "-m", "training.train", "--backbone", str(comfy_sdxl_files["checkpoint"]),
        "--image-encoder", str(comfy_model_files["clip_vision"]), "--data", "synthetic", "--synthetic-subjects", "2",
        "--synthetic-images-per-subject", "2", "--resolution", "64", "--width", "64", "--depth", "1", "--heads", "4",
        "--iterations", "2", "--lidb-a", "16", "--lidb-b", "16", "--batch-size", "1", "--max-steps", "2",
        "--learning-rate", "1e-2", "--sample-subjects", "0", "--hidden-state", "image_embeds", "--output-dir", str(out),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return out / "hypernet.safetensors"


@pytest.fixture(scope="session")
def subject_image(tmp_path_factory) -> Path:
    from training.synthetic import SyntheticWorld

    world = SyntheticWorld(0)
    import random

    path = tmp_path_factory.mktemp("input") / "subject.png"
    world.render(world.subjects(1, "heldout")[0], world.sample_context(random.Random(1)), 96).save(path)
    return path


@pytest.fixture(scope="session")
def comfy_models(tmp_path_factory, comfy_model_files, trained_hypernet, subject_image) -> dict[str, list[Path]]:
    """Model folders laid out as a user has them, with the file names the shipped workflows use."""
    root = tmp_path_factory.mktemp("models")
    sources = {"checkpoints": comfy_model_files["checkpoint"], "clip_vision": comfy_model_files["clip_vision"], "hypernets": trained_hypernet}
    folders = {}
    for folder, source in sources.items():
        (root / folder).mkdir()
        (root / folder / WORKFLOW_FILES[folder]).symlink_to(source)
        folders[folder] = [root / folder]
    for folder in ("loras", "subject_loras", "embeddings"):  # what the nodes write goes to the test's folders, never ComfyUI's own
        (root / folder).mkdir()
        folders[folder] = [root / folder]
    folders["__input__"] = [subject_image]
    return folders


def prepare_work_dir(work_dir: Path, models: dict[str, list[Path]]) -> dict[str, list[Path]]:
    """Copy the subject image into the ComfyUI input folder; returns the model folders without the marker."""
    (work_dir / "input").mkdir(parents=True, exist_ok=True)
    for image in models.get("__input__", []):
        shutil.copy(image, work_dir / "input" / image.name)
    return {k: v for k, v in models.items() if not k.startswith("__")}


@pytest.fixture(scope="session")
def bad_hypernets(comfy_models, trained_hypernet) -> dict[str, str]:
    """Hypernetwork files that must be refused in a graph, written beside the good one."""
    from dataclasses import replace

    from hypernet import HyperNetwork, load_hypernet, locate_targets, save_hypernet
    from training.backbone import tiny_backbone

    folder = comfy_models["hypernets"][0]
    good, info = load_hypernet(trained_hypernet)
    other = locate_targets(tiny_backbone().unet).layers  # another base model's layers
    save_hypernet(folder / "for_another_model.safetensors", HyperNetwork(info.config, other), base_arch="sd15-tiny")
    vit_h = replace(info.config, features=replace(info.config.features, dim=1280, encoder="CLIP ViT-H/14"))
    save_hypernet(folder / "for_vit_h.safetensors", HyperNetwork(vit_h, info.layers), base_arch="sd15")
    data = trained_hypernet.read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 3])
    return {"model": "for_another_model.safetensors", "encoder": "for_vit_h.safetensors", "corrupt": "truncated.safetensors"}

pytest_plugins = ["testkit.comfyui.pytest_fixtures"]
