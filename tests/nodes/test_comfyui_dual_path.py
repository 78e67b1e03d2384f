"""Subject Dual-Path inside a real ComfyUI (0.3.75): alpha 1 is the subject model (Predict's MODEL with the prompt that
carries the word embedding), alpha 0 the base model reading the nearest-word prompt (the negative rows keep the
negative), in between a mixture of the two; a core KSampler samples the patched MODEL in a graph; the input MODEL is
left bit-identical."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from testkit.comfyui.harness import run_in_comfyui
from tests.conftest import prepare_work_dir

pytestmark = pytest.mark.comfyui


def _encode(clip: list, text: str) -> dict:
    return {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": text}}


# A user's graph: Predict Subject LoRA, the base MODEL patched by Subject Dual-Path, a core KSampler (batch of 2).
GRAPH = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "CLIP-ViT-L-14.safetensors"}},
    "3": {"class_type": "SubjectHyperNet_LoadHyperNet", "inputs": {"hypernet_name": "subject_hypernet_sd15.safetensors"}},
    "4": {"class_type": "LoadImage", "inputs": {"image": "subject.png"}},
    "5": {"class_type": "SubjectHyperNet_PredictSubjectLora", "inputs": {"hypernet": ["3", 0], "clip_vision": ["2", 0], "image": ["4", 0], "model": ["1", 0],
                                                                       "strength_model": 1.0, "clip": ["1", 1], "strength_clip": 1.0}},
    "6": _encode(["5", 1], "a photo of a sks toy on the beach"),
    "7": _encode(["1", 1], "a photo of a dog toy on the beach"),
    "8": _encode(["5", 1], "blurry"),
    "9": {"class_type": "SubjectHyperNet_SubjectDualPath", "inputs": {"model": ["1", 0], "subject_lora": ["5", 2], "vanilla_positive": ["7", 0], "alpha": 0.5}},
    "10": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
    "11": {"class_type": "KSampler", "inputs": {"model": ["9", 0], "seed": 0, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                                                "positive": ["6", 0], "negative": ["8", 0], "latent_image": ["10", 0], "denoise": 1.0}},
    "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["1", 2]}},
    "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": "dual/dual"}},
}

CODE = r"""
import dataclasses, sys, torch
import nodes as core, comfy.samplers
node = core.NODE_CLASS_MAPPINGS["SubjectHyperNet_SubjectDualPath"]()
bridge = sys.modules[type(node).__module__.rsplit(".", 1)[0] + ".comfy_bridge"]
model, clip, vae = core.CheckpointLoaderSimple().load_checkpoint("v1-5-pruned-emaonly.safetensors")[:3]
hypernet = core.NODE_CLASS_MAPPINGS["SubjectHyperNet_LoadHyperNet"]().load("subject_hypernet_sd15.safetensors")["result"][0]
clip_vision = core.CLIPVisionLoader().load_clip("CLIP-ViT-L-14.safetensors")[0]
image = core.LoadImage().load_image("subject.png")[0]
model_s, clip_s, lora = core.NODE_CLASS_MAPPINGS["SubjectHyperNet_PredictSubjectLora"]().predict(hypernet, clip_vision, image, model, 1.0, clip, 1.0)
# the fixture hypernetwork predicts no word embedding: give its subject LoRA one, as a --token-embedding hypernetwork would
vector = torch.randn(768, generator=torch.Generator().manual_seed(9)) * 0.02
with_word = bridge.subject_lora_for_comfy(dataclasses.replace(lora.subject, token_embedding=vector, placeholder="sks"))
subject_pos, vanilla_pos = core.NODE_CLASS_MAPPINGS["SubjectHyperNet_SubjectPromptEncode"]().encode(clip_s, with_word, "a photo of a sks toy on the beach", base_clip=clip)
neg = core.CLIPTextEncode().encode(clip_s, "blurry")[0]
long_vanilla = core.CLIPTextEncode().encode(clip, "a photo of a dog toy on the beach" + ", in bright light" * 20)[0]  # 154 tokens

def one_evaluation(model_fn, x, sigmas, extra_args=None, callback=None, disable=None):
    return model_fn(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))

sampler = comfy.samplers.KSAMPLER(one_evaluation)
sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 4).cpu()[1:]
latent = torch.zeros(2, 4, 8, 8)
noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))

def run(m, positive, negative):  # CFG 5: the batch holds cond and uncond rows
    guider = comfy.samplers.CFGGuider(m)
    guider.set_conds(positive, negative)
    guider.set_cfg(5.0)
    return guider.sample(noise, latent, sampler, sigmas, seed=0).float()

def dual(alpha, vanilla=vanilla_pos):
    return node.patch(model, with_word, vanilla, alpha)[0]

state_before = (repr(model.model_options), repr(model.wrappers), len(model.patches))
before = run(model, vanilla_pos, neg)  # the base model reading the nearest word
adapted = run(model_s, subject_pos, neg)  # Predict's MODEL (LoRA merged by ComfyUI) with the word embedding
out = {a: run(dual(a), subject_pos, neg) for a in (1.0, 0.0, 0.5)}
long_expected = run(model, long_vanilla, neg)
long_dual = run(dual(0.0, long_vanilla), subject_pos, neg)
latent_image = core.EmptyLatentImage().generate(64, 64, 2)[0]
sampled = core.KSampler().sample(dual(0.5), 0, 2, 7.0, "euler", "normal", subject_pos, neg, latent_image, 1.0)[0]["samples"]
leftover_hooks = sum(len(m._forward_hooks) for m in model.model.diffusion_model.modules())
after = run(model, vanilla_pos, neg)
try:
    node.patch(model, with_word, [[torch.zeros(1, 77, 1024), {}]], 0.5)
    wrong_width = "no error"
except Exception as error:
    wrong_width = str(error)
result = {"scale": float(adapted.abs().max()), "alpha1_vs_adapted": float((out[1.0] - adapted).abs().max()),
          "alpha0_vs_vanilla": float((out[0.0] - before).abs().max()), "gap": float((adapted - before).abs().max()),
          "half_vs_adapted": float((out[0.5] - adapted).abs().max()), "half_vs_vanilla": float((out[0.5] - before).abs().max()),
          "long_alpha0_vs_vanilla": float((long_dual - long_expected).abs().max()),
          "ksampler_finite": bool(torch.isfinite(sampled).all()), "ksampler_shape": list(sampled.shape), "leftover_hooks": leftover_hooks,
          "input_model_prediction_change": float((after - before).abs().max()),
          "input_model_state_same": state_before == (repr(model.model_options), repr(model.wrappers), len(model.patches)),
          "wrong_width": wrong_width}
"""


@pytest.fixture(scope="module")
def dual_run(comfyui_root, comfy_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("comfy_dual_path")
    models = prepare_work_dir(work, comfy_models)
    report = run_in_comfyui(comfyui_root, work, models=models, prompts=[{"prompt": GRAPH, "reset": True}], code=CODE)
    assert "code_error" not in report, report.get("code_error")
    print("dual path in ComfyUI:", report["code_result"])
    return report


def test_alpha_one_is_the_subject_model_and_alpha_zero_the_base_model_reading_the_nearest_word(dual_run):
    result = dual_run["code_result"]
    tolerance = 2e-5 * result["scale"]  # float32 rounding: Predict merges the LoRA into the weights, the node adds it per activation
    assert result["alpha1_vs_adapted"] < tolerance, result
    assert result["alpha0_vs_vanilla"] < tolerance, result  # the negative rows read the negative on the vanilla path
    assert result["long_alpha0_vs_vanilla"] < tolerance, result  # a hard prompt of another length (154 vs 77 tokens)
    assert result["gap"] > 1000 * tolerance  # the two models predict differently, so the checks above can fail


def test_alpha_between_differs_from_both_paths(dual_run):
    result = dual_run["code_result"]
    assert result["half_vs_adapted"] > 0.1 * result["gap"] and result["half_vs_vanilla"] > 0.1 * result["gap"], result


def test_core_ksampler_samples_the_patched_model_in_a_graph(dual_run):
    entry = dual_run["prompts"][0]
    assert entry["valid"], entry["node_errors"]
    assert entry["success"], entry["execution_error"]
    images = [np.asarray(Image.open(path)) for path in entry["images"]]
    assert len(images) == 2 and all(image.shape == (64, 64, 3) for image in images)
    result = dual_run["code_result"]
    assert result["ksampler_finite"] and result["ksampler_shape"] == [2, 4, 8, 8]


def test_input_model_is_bit_identical_and_no_hook_is_left_behind(dual_run):
    result = dual_run["code_result"]
    assert result["input_model_prediction_change"] == 0.0 and result["input_model_state_same"], result
    assert result["leftover_hooks"] == 0


def test_a_hard_prompt_from_another_text_encoder_is_refused_with_a_message(dual_run):
    assert "1024 wide, this MODEL's cross-attention reads 768" in dual_run["code_result"]["wrong_width"]
