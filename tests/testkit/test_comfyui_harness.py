"""The test harness itself, proved on core ComfyUI nodes only: the random fixture files load as the real
formats, graphs run in-process and through the real server, results are deterministic, errors are reported
per node, and the server is stopped afterwards.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
from PIL import Image

from testkit.comfyui.fixtures import CHECKPOINT_NAME, CLIP_VISION_NAME
from testkit.comfyui.harness import PACK_NAME, ComfyServer, run_prompts

pytestmark = pytest.mark.comfyui


def core_graph(prefix: str, ckpt_name: str = CHECKPOINT_NAME, seed: int = 42) -> dict:
    """checkpoint -> 2 text encodes -> empty 64x64 latent -> KSampler (2 steps) -> VAE decode -> save."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a red toy car", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                                                   "seed": seed, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"{prefix}/core"}},
    }


CLIP_VISION_GRAPH = {
    "1": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_VISION_NAME}},
    "2": {"class_type": "LoadImage", "inputs": {"image": "subject.png"}},
    "3": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["1", 0], "image": ["2", 0], "crop": "center"}},
    "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},  # an output node, so that 1-3 execute
}

# Runs in the ComfyUI process after the prompts: reads the encoder output the executor cached for node "3" of
# the last prompt, and checks what ComfyUI detects the fixture checkpoint as.
INSPECT_CODE = r"""
import comfy.sd, folder_paths
encoded = executor.caches.outputs.get("3").outputs[0][0]
model, clip, vae = comfy.sd.load_checkpoint_guess_config(folder_paths.get_full_path("checkpoints", spec["ckpt_name"]))[:3]
result = {
    "clip_vision": {k: list(encoded[k].shape) for k in ("last_hidden_state", "penultimate_hidden_states", "image_embeds")},
    "model_config": type(model.model.model_config).__name__,
    "clip_parts": sorted(n for n, _ in clip.cond_stage_model.named_children()),
    "vae_is_taesd": type(vae.first_stage_model).__name__,
}
"""


@pytest.fixture(scope="module")
def inprocess(comfyui_root, comfy_model_dirs, tmp_path_factory):
    """All in-process graphs of this file, in one ComfyUI process (start-up dominates on a CPU)."""
    work = tmp_path_factory.mktemp("harness_inprocess")
    (work / "input").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (150, 100, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(work / "input" / "subject.png")
    prompts = [core_graph("first"), {"prompt": core_graph("again"), "reset": True},
               core_graph("broken", ckpt_name="no_such_model.safetensors"), CLIP_VISION_GRAPH]
    code = f"spec['ckpt_name'] = {CHECKPOINT_NAME!r}\n" + INSPECT_CODE
    report = run_prompts(prompts, comfy_model_dirs, comfy_root=comfyui_root, work_dir=work, code=code)
    assert "code_error" not in report, report["code_error"]
    return report


def test_pack_is_imported_by_comfyui_without_errors(inprocess):
    assert inprocess["comfyui_version"] == "0.3.75"
    assert PACK_NAME not in inprocess["import_failures"], inprocess["log"][-3000:]


def test_fixture_files_are_detected_as_sd15_with_clip_l_and_taesd(inprocess):
    info = inprocess["code_result"]
    assert info["model_config"] == "SD15"
    assert info["clip_parts"] == ["clip_l"]
    assert info["vae_is_taesd"] == "TAESD"


def test_core_graph_saves_an_image_of_the_requested_size(inprocess):
    first = inprocess["prompts"][0]
    assert first["valid"], first["node_errors"]
    assert first["success"], first["execution_error"]
    path, = first["images"]
    assert Image.open(path).size == (64, 64)
    assert first["max_rss_mb"] > 0


def test_same_prompt_twice_gives_identical_pixels(inprocess):
    first, again = inprocess["prompts"][:2]
    assert again["success"], again["execution_error"]
    a, b = (np.asarray(Image.open(entry["images"][0])) for entry in (first, again))
    assert a.std() > 0  # not a constant image: the random weights really act
    assert np.array_equal(a, b)


def test_unknown_checkpoint_is_a_validation_error_naming_the_node(inprocess):
    broken = inprocess["prompts"][2]
    assert not broken["valid"] and "success" not in broken
    error, = broken["node_errors"]["1"]["errors"]
    assert broken["node_errors"]["1"]["class_type"] == "CheckpointLoaderSimple"
    assert error["type"] == "value_not_in_list" and "no_such_model.safetensors" in error["details"]


def test_clip_vision_loader_accepts_the_vit_l_fixture_and_encodes(inprocess):
    entry = inprocess["prompts"][3]
    assert entry["success"], entry["execution_error"]
    assert inprocess["code_result"]["clip_vision"] == {
        "last_hidden_state": [1, 257, 1024], "penultimate_hidden_states": [1, 257, 1024], "image_embeds": [1, 768]}


def test_server_runs_the_core_graph_and_shuts_down(comfyui_root, comfy_model_dirs, inprocess, tmp_path):
    with ComfyServer(comfyui_root, tmp_path / "server", comfy_model_dirs) as server:
        reply = server.post_prompt(core_graph("server"))
        assert reply["http_status"] == 200, reply
        entry = server.wait_history(reply["prompt_id"])
        assert entry["status"]["status_str"] == "success", entry["status"]
        path, = server.image_paths(entry)
        served = np.asarray(Image.open(path))
        # the same graph gives the same pixels through the server as in-process
        assert np.array_equal(served, np.asarray(Image.open(inprocess["prompts"][0]["images"][0])))

        rejected = server.post_prompt(core_graph("server", ckpt_name="no_such_model.safetensors"))
        assert rejected["http_status"] == 400 and list(rejected["node_errors"]) == ["1"]
        process, port = server.process, server.port
    assert process.poll() is not None
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    assert "To see the GUI go to" in server.read_log()
