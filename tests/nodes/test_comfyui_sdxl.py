"""SDXL inside a real ComfyUI: the shipped SDXL workflows, refusals across families, the saved kohya SDXL LoRA in
the core loader, HM-CFG, and the trainer's SDXL backbone against ComfyUI's on the same single-file checkpoint.

The checkpoint is the smallest one ComfyUI detects as SDXL (testkit/comfyui/fixtures.py): SDXL's block layout,
2048-wide context and both full-size text encoders, 320 channels at every level. All graphs run in one ComfyUI
process (loading its 2.2 GB dominates), widgets shrunk for the CPU as in test_comfyui_workflows.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from testkit.comfyui.harness import run_in_comfyui
from testkit.comfyui.workflow_format import NODE_SPECS_CODE, strip_meta, ui_to_api
from tests.conftest import SDXL_WORKFLOW_FILES, WORKFLOW_FILES, prepare_work_dir
from tests.nodes.test_comfyui_workflows import API_DIR, core_lora_variant, load, plain_variant, shrink
from tests.nodes.test_comfyui_workflows import FINETUNE as SD15_FINETUNE, HMCFG as SD15_HMCFG, KSAMPLER as SD15_KSAMPLER, SAVE_LORA as SD15_SAVE_LORA

pytestmark = pytest.mark.comfyui
SDXL_WORKFLOWS = sorted(p.stem for p in API_DIR.glob("SDXL - *.json"))
KSAMPLER, HMCFG, SAVE_LORA, FINETUNE = (f"SDXL - {name}" for name in (SD15_KSAMPLER, SD15_HMCFG, SD15_SAVE_LORA, SD15_FINETUNE))
SAVED_LORA = f"{SAVE_LORA}/subject_sdxl_00001.safetensors"


@pytest.fixture(scope="module")
def sdxl_models(comfy_models, comfy_sdxl_files, trained_sdxl_hypernet):
    """The SD1.5 models tree plus the SDXL checkpoint and hypernetwork under the names the SDXL workflows use."""
    for folder, source in (("checkpoints", comfy_sdxl_files["checkpoint"]), ("hypernets", trained_sdxl_hypernet)):
        link = comfy_models[folder][0] / SDXL_WORKFLOW_FILES[folder]
        if not link.exists():
            link.symlink_to(source)
    return comfy_models


def mixed_family_lora_variant(prompt: dict, prefix: str) -> dict:
    """The SDXL HM-CFG graph fed a subject LoRA predicted for SD1.5 (by a second, SD1.5 checkpoint)."""
    prompt = shrink(prompt, prefix)
    prompt["20"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": WORKFLOW_FILES["checkpoints"]}}
    prompt["3"]["inputs"]["hypernet_name"] = WORKFLOW_FILES["hypernets"]
    prompt["5"]["inputs"].update(model=["20", 0], clip=["20", 1])
    prompt["8"]["inputs"]["clip"] = ["1", 1]
    return prompt


def with_hypernet(prompt: dict, prefix: str, hypernet: str) -> dict:
    prompt = shrink(prompt, prefix)
    prompt["3"]["inputs"]["hypernet_name"] = hypernet
    return prompt


CODE = r"""
import gc, sys, torch
sys.path.append(spec["repo"])
import comfy.model_management, comfy.samplers, comfy.sd, comfy.utils, folder_paths
import nodes as core
from hypernet import locate_targets
from hypernet.files import kohya_to_lora
result = {}
executor.reset()
comfy.model_management.unload_all_models()
gc.collect()
ckpt = folder_paths.get_full_path("checkpoints", "sd_xl_base_1.0.safetensors")
model, clip, vae = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)[:3]
result["detected"] = {"model": type(model.model.model_config).__name__, "clip": sorted(n for n, _ in clip.cond_stage_model.named_children())}
encoders = [clip.cond_stage_model.clip_l.transformer, clip.cond_stage_model.clip_g.transformer]

# 1. the saved kohya SDXL LoRA through the core loader: every adapted weight is W + up @ down, nothing left out
lora_sd = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", spec["saved_lora"]), safe_load=True)
lora = kohya_to_lora(lora_sd)
targets = locate_targets(model.model.diffusion_model, encoders)
originals = {name: module.weight.detach().clone() for name, module in targets.modules.items()}
patched_model, patched_clip = comfy.sd.load_lora_for_models(model, clip, lora_sd, 1.0, 1.0)
comfy.model_management.load_models_gpu([patched_model, patched_clip.patcher], force_full_load=True)
ulps, changed, dtypes = [], 0, set()
for name, module in targets.modules.items():
    after, dtype = module.weight.detach(), module.weight.dtype
    # W + up @ down summed in float32 and stored in the weight's own dtype (ComfyUI keeps this checkpoint's fp16)
    expected = (originals[name].float() + lora.delta(name).float()).to(dtype).float()
    spacing = torch.finfo(dtype).eps * expected.abs().clamp_min(torch.finfo(dtype).tiny)
    ulps.append(float(((after.float() - expected).abs() / spacing).max()))
    changed += int(not torch.equal(after, originals[name]))
    dtypes.add(str(dtype))
result["core_loader"] = {"lora_layers": len(lora.names), "model_layers": len(targets.layers), "patched_keys": len(patched_model.patches) + len(patched_clip.patcher.patches),
                         "changed": changed, "max_ulps": max(ulps), "dtypes": sorted(dtypes),
                         "sgm_keys": sum(k.startswith("lora_unet_input_blocks_") for k in lora_sd), "diffusers_keys": sum(k.startswith("lora_unet_down_blocks_") for k in lora_sd)}
comfy.model_management.unload_all_models()
del patched_model, patched_clip, originals
gc.collect()

# 2. HM-CFG on SDXL: both implementations equal the formula on three separately computed predictions
guider_module = sys.modules[core.NODE_CLASS_MAPPINGS["SubjectHyperNet_HMCFGGuider"].__module__]
pack = guider_module.__name__.rsplit(".", 2)[0]
import hypernet.files as files
import hypernet.guidance as guidance
bridge = sys.modules[pack + ".nodes.comfy_bridge"]
subject = bridge.SubjectLora(targets.layers, lora, "sdxl")
subject_lora = bridge.subject_lora_for_comfy(subject)
model_s, clip_s = bridge.apply_subject_lora(model, clip, subject_lora, 1.0, 1.0)
encode = lambda c, text: core.CLIPTextEncode().encode(c, text)[0]
pos, neg, subj = encode(clip, "a photo of a sks toy"), encode(clip, "blurry"), encode(clip_s, "a photo of a sks toy")
def one_evaluation(model_fn, x, sigmas, extra_args=None, callback=None, disable=None):
    return model_fn(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
sampler = comfy.samplers.KSAMPLER(one_evaluation)
sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 4).cpu()
latent = torch.zeros(1, 4, 8, 8)
noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
run = lambda guider: guider.sample(noise, latent, sampler, sigmas, seed=0).float()
def plain(m, positive, negative):
    g = comfy.samplers.CFGGuider(m); g.set_conds(positive, negative); g.set_cfg(1.0)
    return run(g)
base_c, base_u, subject_c = plain(model, pos, neg), plain(model, neg, neg), plain(model_s, subj, neg)
expected = guidance.hm_cfg(base_u, base_c, subject_c, 5.0, 2.0)
hm = {"scale": float(expected.abs().max()), "subject_term_matters": float((expected - guidance.hm_cfg(base_u, base_c, None, 5.0, 2.0)).abs().max())}
for implementation in ("comfy_hooks", "batched"):
    g = guider_module.make_guider(model, subject_lora, pos, neg, 5.0, 2.0, 0.0, 1.0, subject_positive=subj, implementation=implementation)
    hm[implementation] = float((run(g) - expected).abs().max())
result["hmcfg"] = hm

# 3. models of other families (SD3, Flux, the refiner, SD2: their config classes, no weights needed) are refused by name
import types, comfy.supported_models as supported
stub = types.SimpleNamespace(module=types.SimpleNamespace(layers=targets.layers), info=types.SimpleNamespace(base_arch="sdxl"))  # a LoadedHyperNet
result["foreign"] = {}
for config_class in (supported.SD3, supported.Flux, supported.SDXLRefiner, supported.SD20):
    try:
        bridge.check_hypernet_fits(stub, types.SimpleNamespace(model=types.SimpleNamespace(model_config=config_class({}))), None)
        result["foreign"][config_class.__name__] = "accepted"
    except Exception as error:
        result["foreign"][config_class.__name__] = str(error)

# 4. what ComfyUI computes on this checkpoint, then the training package's backbone on the same file
comfy.model_management.unload_all_models()
g = torch.Generator().manual_seed(5)
x, context, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 2048, generator=g), torch.tensor([10.0, 700.0])
pooled = torch.randn(2, 1280, generator=g)
sizes = [dict(width=64, height=96, crop_w=8, crop_h=0, target_width=64, target_height=96), dict(width=1024, height=1024)]
prompt = "a photo of a sks toy on a red background"
pixels = torch.rand(1, 64, 64, 3, generator=g)
comfy.model_management.load_models_gpu([model])
with torch.no_grad():
    y = torch.cat([model.model.encode_adm(pooled_output=pooled[i:i + 1], **sizes[i]) for i in range(2)])
    theirs = {"unet": model.model.diffusion_model(x, timesteps=t, context=context, y=y).float()}
    cond, theirs_pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    theirs.update(text=cond.float(), pooled=theirs_pooled.float(), latent=model.model.process_latent_in(vae.encode(pixels)).float())
del model, clip, vae, model_s, clip_s, encoders, targets, subject_lora, subject
comfy.model_management.unload_all_models()
gc.collect()
from training.backbone import load_backbone
backbone = load_backbone(ckpt)
time_ids = torch.tensor([[96, 64, 0, 8, 96, 64], [1024, 1024, 0, 0, 1024, 1024]], dtype=torch.float32)
with torch.no_grad():
    from training.backbone import TextConditioning
    ours = {"unet": backbone.predict_noise(x, t, TextConditioning(context, pooled), time_ids)}
    conditioning = backbone.encode_prompts([prompt])
    ours.update(text=conditioning.context, pooled=conditioning.pooled, latent=backbone.encode_images(pixels.permute(0, 3, 1, 2) * 2 - 1))
result["backbone"] = {part: {"diff": float((ours[part] - theirs[part]).abs().max()), "scale": float(theirs[part].abs().max())} for part in theirs}
result["backbone"]["arch"] = backbone.arch
""" + NODE_SPECS_CODE + """
result["node_specs"] = node_specs
"""


@pytest.fixture(scope="module")
def sdxl_run(comfyui_root, sdxl_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("comfy_sdxl")
    models = prepare_work_dir(work, sdxl_models)
    ks = load(KSAMPLER)
    # the save workflow first, so its file is in models/loras for the core-loader variant; caches kept between
    # prompts (the checkpoint is loaded once), every node of every graph still validated and executed once
    names = [SAVE_LORA] + [n for n in SDXL_WORKFLOWS if n != SAVE_LORA]
    prompts = [shrink(load(name), name) for name in names]
    names += ["plain", "core_lora", "sd15_hypernet_on_sdxl", "sdxl_hypernet_on_sd15", "sd15_lora_in_sdxl_hmcfg"]
    prompts += [plain_variant(ks, "plain"), core_lora_variant(ks, "core_lora", SAVED_LORA),
                with_hypernet(ks, "bad", WORKFLOW_FILES["hypernets"]), with_hypernet(load(SD15_KSAMPLER), "bad", SDXL_WORKFLOW_FILES["hypernets"]),
                mixed_family_lora_variant(load(HMCFG), "bad")]
    node_types = sorted({n["class_type"] for name in SDXL_WORKFLOWS for n in load(name).values()})
    code = f"spec['saved_lora'] = {SAVED_LORA!r}\n" + CODE
    report = run_in_comfyui(comfyui_root, work, models=models, prompts=[{"prompt": p, "reset": False} for p in prompts], code=code,
                            node_types=node_types, timeout=3000)
    return {"report": report, "results": dict(zip(names, report["prompts"])), "work": work, "models": models}


def image_of(run, name) -> np.ndarray:
    path, = run["results"][name]["images"]
    return np.asarray(Image.open(path))


def code_result(run) -> dict:
    assert "code_error" not in run["report"], run["report"].get("code_error")
    return run["report"]["code_result"]


def test_fixture_is_detected_as_sdxl_with_both_text_encoders(sdxl_run):
    assert code_result(sdxl_run)["detected"] == {"model": "SDXL", "clip": ["clip_g", "clip_l"]}


@pytest.mark.parametrize("name", SDXL_WORKFLOWS)
def test_shipped_sdxl_workflow_runs(sdxl_run, name):
    result = sdxl_run["results"][name]
    assert result["valid"], result["node_errors"]
    assert result["success"], result["execution_error"]
    if name == SAVE_LORA:
        standard = sdxl_run["models"]["loras"][0] / SAVED_LORA
        compact = sdxl_run["models"]["subject_loras"][0] / SAVE_LORA / "subject_sdxl_00001.compact.safetensors"
        assert standard.stat().st_size > 0 and 0 < compact.stat().st_size < standard.stat().st_size
    else:
        assert image_of(sdxl_run, name).shape == (64, 64, 3)


def test_sdxl_finetune_reports_every_step(sdxl_run):
    assert [v for v, total in sdxl_run["results"][FINETUNE]["progress"] if total == 3] == [1, 2, 3]


def test_core_lora_loader_on_the_saved_sdxl_file_equals_the_pack_and_differs_from_the_base(sdxl_run):
    for name in ("plain", "core_lora"):
        assert sdxl_run["results"][name]["success"], sdxl_run["results"][name]["execution_error"]
    personal = image_of(sdxl_run, KSAMPLER)
    assert np.array_equal(image_of(sdxl_run, "core_lora"), personal)
    assert np.abs(personal.astype(int) - image_of(sdxl_run, "plain").astype(int)).max() > 0


def test_core_loader_adapts_every_sdxl_layer_by_exactly_up_times_down(sdxl_run):
    loader = code_result(sdxl_run)["core_loader"]
    print("core loader on the saved SDXL LoRA:", loader)
    assert loader["lora_layers"] == loader["model_layers"] == loader["patched_keys"] == loader["changed"] == 736  # 560 UNet + 48 CLIP-L + 128 bigG
    assert loader["sgm_keys"] > 0 and loader["diffusers_keys"] == 0  # kohya's SDXL naming
    assert loader["max_ulps"] <= 1.0  # equal to W + up @ down up to the rounding of the stored dtype
    assert "lora key not loaded" not in sdxl_run["report"]["log"]


@pytest.mark.parametrize("case, node, message", [
    ("sd15_hypernet_on_sdxl", "SubjectHyperNet_PredictSubjectLora", "this hypernetwork was made for SD1.5, but the connected MODEL is SDXL"),
    ("sdxl_hypernet_on_sd15", "SubjectHyperNet_PredictSubjectLora", "this hypernetwork was made for SDXL, but the connected MODEL is SD1.5"),
    ("sd15_lora_in_sdxl_hmcfg", "SubjectHyperNet_HMCFGKSampler", "this subject LoRA was made for SD1.5, but the connected MODEL is SDXL"),
])
def test_other_family_is_refused_naming_both(sdxl_run, case, node, message):
    error = sdxl_run["results"][case]["execution_error"]
    assert error is not None and error["node_type"] == node, error
    assert message in error["exception_message"]


@pytest.mark.parametrize("comfy_class, named", [("SD3", "SD3"), ("Flux", "Flux"), ("SDXLRefiner", "SDXL refiner (ComfyUI model type SDXLRefiner)"),
                                                ("SD20", "SD2.x (ComfyUI model type SD20)")])
def test_models_of_unsupported_families_are_refused_naming_what_was_found(sdxl_run, comfy_class, named):
    message = code_result(sdxl_run)["foreign"][comfy_class]
    assert message == f"this hypernetwork was made for SDXL, but the connected MODEL is {named}. This pack supports the SD1.5 and SDXL families."


def test_sdxl_hmcfg_guider_equals_the_pure_function_of_three_model_predictions(sdxl_run):
    hm = code_result(sdxl_run)["hmcfg"]
    print("SDXL HM-CFG parity:", hm)
    tolerance = 2e-5 * hm["scale"]
    assert hm["comfy_hooks"] < tolerance and hm["batched"] < tolerance, hm
    assert hm["subject_term_matters"] > 1000 * tolerance


def test_training_sdxl_backbone_computes_what_comfyui_computes_for_the_same_checkpoint(sdxl_run):
    parity = code_result(sdxl_run)["backbone"]
    print("SDXL backbone parity (max abs diff / scale):", parity)
    assert parity.pop("arch") == "sdxl"
    assert set(parity) == {"unet", "text", "pooled", "latent"}
    for part, numbers in parity.items():
        assert numbers["diff"] <= 1e-4 * max(1.0, numbers["scale"]), (part, numbers)
        assert numbers["scale"] > 1e-3, part  # not a comparison of zeros


@pytest.mark.parametrize("name", SDXL_WORKFLOWS)
def test_sdxl_ui_workflow_describes_the_same_graph_as_its_api_twin(sdxl_run, name):
    ui = json.loads((API_DIR.parent / f"{name}.json").read_text())
    assert ui_to_api(ui, code_result(sdxl_run)["node_specs"]) == strip_meta(load(name))
