"""The shipped workflows, and the nodes' contracts, executed by ComfyUI's own validator and executor.

All graphs of this file run in one ComfyUI process (start-up and model loading dominate on a CPU).
Widget values are shrunk for the CPU (64 px, 2 sampling steps, 3 finetune steps); the graphs are the
shipped ones.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui_support.harness import run_in_comfyui
from conftest import prepare_work_dir

pytestmark = pytest.mark.comfyui
API_DIR = Path(__file__).resolve().parents[1] / "workflows" / "api"
WORKFLOWS = sorted(p.stem for p in API_DIR.glob("*.json"))


def load(name: str) -> dict:
    return json.loads((API_DIR / f"{name}.json").read_text())


def shrink(prompt: dict, prefix: str) -> dict:
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind in ("KSampler", "SubjectHyperNet_HMCFGKSampler", "BasicScheduler"):
            inputs["steps"] = 2
        if kind == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = 64
        if kind == "SubjectHyperNet_RankRelaxedFinetune":
            inputs["steps"] = 3
        if kind in ("SaveImage", "SubjectHyperNet_SaveSubjectLora"):
            inputs["filename_prefix"] = f"{prefix}/{inputs['filename_prefix'].split('/')[-1]}"
    return prompt


def base_variant(prompt: dict, prefix: str) -> dict:
    """personalize_ksampler with the LoRA at strength 0 -- must equal the base model."""
    prompt = shrink(prompt, prefix)
    predict = next(n for n in prompt.values() if n["class_type"] == "SubjectHyperNet_PredictSubjectLora")
    predict["inputs"]["strength_model"] = predict["inputs"]["strength_clip"] = 0.0
    return prompt


def plain_variant(prompt: dict, prefix: str) -> dict:
    """personalize_ksampler with the base MODEL/CLIP wired into the sampler: no personalisation at all."""
    prompt = shrink(prompt, prefix)
    for node in prompt.values():
        for key, value in node["inputs"].items():
            if isinstance(value, list) and value[0] == "5" and value[1] in (0, 1):
                node["inputs"][key] = ["1", value[1]]
    return prompt


def core_lora_variant(prompt: dict, prefix: str, lora_name: str) -> dict:
    """The same graph, personalised by the core LoraLoader reading the saved subject LoRA file."""
    prompt = plain_variant(prompt, prefix)
    prompt["20"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name, "strength_model": 1.0, "strength_clip": 1.0}}
    for node_id, node in prompt.items():
        if node_id == "20":
            continue
        for key, value in node["inputs"].items():
            if isinstance(value, list) and value[0] == "1" and value[1] in (0, 1):
                node["inputs"][key] = ["20", value[1]]
    return prompt


@pytest.fixture(scope="module")
def comfy_run(comfyui_root, comfy_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("comfy_workflows")
    models = prepare_work_dir(work, comfy_models)
    ks = load("personalize_ksampler")
    prompts = [shrink(load(name), name) for name in WORKFLOWS]
    names = list(WORKFLOWS)
    # contracts: strength 0 == base; repeated runs identical; core LoraLoader == pack application
    names += ["strength0", "plain", "repeat_a"]
    prompts += [base_variant(ks, "strength0"), plain_variant(ks, "plain"), shrink(ks, "repeat_a")]
    # after save_subject_lora ran, the saved file is in models/loras under the first free name
    names += ["core_lora"]
    prompts += [core_lora_variant(ks, "core_lora", "save_subject_lora/subject_00001.safetensors")]
    report = run_in_comfyui(comfyui_root, work, models=models, prompts=prompts, reset_between=True, code=PARITY_CODE)
    return {"report": report, "results": dict(zip(names, report["prompts"])), "work": work, "models": models}


def images_of(run, name) -> list[np.ndarray]:
    outputs = run["results"][name]["outputs"]
    paths = [run["work"] / "output" / img["subfolder"] / img["filename"] for node in outputs.values() for img in node.get("images", [])]
    return [np.asarray(Image.open(p)) for p in paths]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_shipped_workflow_runs(comfy_run, name):
    result = comfy_run["results"][name]
    assert result["valid"], result["node_errors"]
    assert result["success"], result["execution_error"]
    if name == "save_subject_lora":
        loras = comfy_run["models"]["loras"][0]
        standard = loras / "save_subject_lora" / "subject_00001.safetensors"
        compact = comfy_run["models"]["subject_loras"][0] / "save_subject_lora" / "subject_00001.compact.safetensors"
        assert standard.stat().st_size > 0 and 0 < compact.stat().st_size < standard.stat().st_size
    else:
        images = images_of(comfy_run, name)
        assert len(images) == 1 and images[0].shape == (64, 64, 3)


def test_finetune_shows_progress(comfy_run):
    # the finetune runs 3 steps here (sampling runs 2), and reports each one
    assert [v for v, total in comfy_run["results"]["personalize_finetune_hmcfg"]["progress"] if total == 3] == [1, 2, 3]


def test_personalised_differs_from_base_and_strength_zero_is_base(comfy_run):
    personal, = images_of(comfy_run, "personalize_ksampler")
    base, = images_of(comfy_run, "plain")
    zero, = images_of(comfy_run, "strength0")
    assert np.array_equal(zero, base)
    assert np.abs(personal.astype(int) - base.astype(int)).max() > 0


def test_repeated_run_gives_identical_images(comfy_run):
    assert np.array_equal(images_of(comfy_run, "personalize_ksampler")[0], images_of(comfy_run, "repeat_a")[0])


def test_core_lora_loader_on_the_saved_file_equals_the_pack(comfy_run):
    assert comfy_run["results"]["core_lora"]["success"], comfy_run["results"]["core_lora"]["execution_error"]
    assert np.array_equal(images_of(comfy_run, "core_lora")[0], images_of(comfy_run, "personalize_ksampler")[0])


PARITY_CODE = r"""
import sys, torch, json
sys.path.append(spec["repo"])
import comfy.clip_vision, comfy.sd, comfy.samplers, folder_paths
from training.image_encoder import load_image_encoder
result = {}
clip_path = folder_paths.get_full_path("clip_vision", "CLIP-ViT-L-14.safetensors")
image = torch.rand(1, 150, 100, 3, generator=torch.Generator().manual_seed(0))
ours = load_image_encoder(clip_path)
theirs = comfy.clip_vision.load(clip_path).encode_image(image, crop=True)
result["clip_vision_max_abs_diff"] = {k: float((ours.features(image, k) - (theirs[k] if theirs[k].dim() == 3 else theirs[k].unsqueeze(1)).float()).abs().max())
                                      for k in ("last_hidden_state", "penultimate_hidden_states", "image_embeds")}
"""


def test_training_features_equal_comfyui_clip_vision_features(comfy_run):
    report = comfy_run["report"]
    assert "code_error" not in report, report.get("code_error")
    diffs = report["code_result"]["clip_vision_max_abs_diff"]
    print("CLIP vision parity, max |training - ComfyUI|:", diffs)
    assert set(diffs) == {"last_hidden_state", "penultimate_hidden_states", "image_embeds"}
    assert max(diffs.values()) < 1e-3
