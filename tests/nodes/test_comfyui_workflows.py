"""The shipped workflows, and the nodes' contracts, executed by ComfyUI's own validator and executor.

All graphs of this file run in one ComfyUI process (start-up and model loading dominate on a CPU).
Widget values are shrunk for the CPU (64 px, 2 sampling steps, 3 finetune steps, 4 tuning steps); the graphs are
the shipped ones.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from testkit.comfyui.harness import run_in_comfyui
from testkit.comfyui.workflow_format import NODE_SPECS_CODE, strip_meta, ui_to_api
from tests.conftest import prepare_work_dir
from hypernet.files import COMFYUI_HYPERNET_NAME

pytestmark = pytest.mark.comfyui
API_DIR = Path(__file__).resolve().parents[2] / "workflows" / "api"
ALL_WORKFLOWS = sorted(p.stem for p in API_DIR.glob("*.json"))
WORKFLOWS = [name for name in ALL_WORKFLOWS if not name.lower().startswith("sdxl")]  # SD1.5; test_comfyui_sdxl.py runs the SDXL ones
# The file names are the titles ComfyUI's template browser shows.
KSAMPLER, HMCFG, SAVE_LORA, FINETUNE = "Personalise with KSampler", "Personalise with HM-CFG", "Save a subject LoRA", "Personalise, finetune, then HM-CFG"
TUNE = "Personalise, tune, then HM-CFG"
INFO_NODE = "20"  # Preview as Text, showing Load HyperNet's info in every workflow


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
        if kind == "SubjectHyperNet_SubjectTuning":
            inputs["steps"] = 4
        if kind in ("SaveImage", "SubjectHyperNet_SaveSubjectLora"):
            inputs["filename_prefix"] = f"{prefix}/{inputs['filename_prefix'].split('/')[-1]}"
    return prompt


def base_variant(prompt: dict, prefix: str) -> dict:
    """Personalise with KSampler, with the LoRA at strength 0 -- must equal the base model."""
    prompt = shrink(prompt, prefix)
    predict = next(n for n in prompt.values() if n["class_type"] == "SubjectHyperNet_PredictSubjectLora")
    predict["inputs"]["strength_model"] = predict["inputs"]["strength_clip"] = 0.0
    return prompt


def plain_variant(prompt: dict, prefix: str) -> dict:
    """Personalise with KSampler, with the base MODEL/CLIP wired into the sampler: no personalisation at all."""
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


def bad_variant(prompt: dict, prefix: str, hypernet: str | None = None, empty_image: bool = False) -> dict:
    prompt = shrink(prompt, prefix)
    if hypernet:
        prompt["3"]["inputs"]["hypernet_name"] = hypernet
    if empty_image:
        prompt["4"] = {"class_type": "TestEmptyImageBatch", "inputs": {}}
    return prompt


def with_seed(prompt: dict, prefix: str, seed: int) -> dict:
    prompt = shrink(prompt, prefix)
    next(n for n in prompt.values() if n["class_type"] == "SubjectHyperNet_HMCFGKSampler")["inputs"]["seed"] = seed
    return prompt


REPEATS = 20


@pytest.fixture(scope="module")
def comfy_run(comfyui_root, comfy_models, bad_hypernets, tmp_path_factory):
    work = tmp_path_factory.mktemp("comfy_workflows")
    models = prepare_work_dir(work, comfy_models)
    ks = load(KSAMPLER)
    prompts = [shrink(load(name), name) for name in WORKFLOWS]
    names = list(WORKFLOWS)
    # contracts: strength 0 == base; repeated runs identical; core LoraLoader == pack application
    names += ["strength0", "plain", "repeat_a"]
    prompts += [base_variant(ks, "strength0"), plain_variant(ks, "plain"), shrink(ks, "repeat_a")]
    # after "Save a subject LoRA" ran, the saved file is in models/loras under the first free name
    names += ["core_lora"]
    prompts += [core_lora_variant(ks, "core_lora", f"{SAVE_LORA}/subject_00001.safetensors")]
    # bad input through a real graph
    names += ["bad_model", "bad_encoder", "bad_file", "bad_empty"]
    prompts += [bad_variant(ks, "bad", bad_hypernets["model"]), bad_variant(ks, "bad", bad_hypernets["encoder"]),
                bad_variant(ks, "bad", bad_hypernets["corrupt"]), bad_variant(ks, "bad", empty_image=True)]
    items = [{"prompt": p, "reset": True} for p in prompts]
    # repeated runs of one graph with new seeds (models cached as in normal use): memory must not grow
    hm = load(HMCFG)
    names += [f"repeat_{i}" for i in range(REPEATS)]
    items += [{"prompt": with_seed(hm, "repeat", i), "reset": False} for i in range(REPEATS)]
    node_types = sorted({n["class_type"] for name in WORKFLOWS for n in load(name).values()})
    report = run_in_comfyui(comfyui_root, work, models=models, prompts=items, code=PARITY_CODE, node_types=node_types)
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
    # what the hypernetwork was trained for is shown in the graph (Preview as Text on Load HyperNet's info)
    info, = result["outputs"][INFO_NODE]["text"]
    assert info.startswith("subject_hypernet_sd15.safetensors: base sd15,") and " expects " in info, info
    if name == SAVE_LORA:
        loras = comfy_run["models"]["loras"][0]
        standard = loras / SAVE_LORA / "subject_00001.safetensors"
        compact = comfy_run["models"]["subject_loras"][0] / SAVE_LORA / "subject_00001.compact.safetensors"
        assert standard.stat().st_size > 0 and 0 < compact.stat().st_size < standard.stat().st_size
        assert result["outputs"]["22"]["text"] == [f"{SAVE_LORA}/subject_00001.safetensors"]  # the saved name, shown
    else:
        images = images_of(comfy_run, name)
        assert len(images) == 1 and images[0].shape == (64, 64, 3)


def test_trainer_says_to_copy_its_hypernetwork_under_the_name_the_workflows_load(trained_hypernet, comfy_run):
    # the fixture trained on an SD1.5 checkpoint; the file copied as the trainer says is what every shipped workflow ran on
    console = (trained_hypernet.parent / "console.txt").read_text()
    assert f"copy {trained_hypernet} to ComfyUI/models/hypernets/{COMFYUI_HYPERNET_NAME} " in console, console[-600:]
    assert {n["inputs"]["hypernet_name"] for name in WORKFLOWS for n in load(name).values() if n["class_type"] == "SubjectHyperNet_LoadHyperNet"} == {COMFYUI_HYPERNET_NAME}
    assert (comfy_run["models"]["hypernets"][0] / COMFYUI_HYPERNET_NAME).resolve() == trained_hypernet.resolve()
    assert all(comfy_run["results"][name]["success"] for name in WORKFLOWS)


def test_finetune_shows_progress(comfy_run):
    # the finetune runs 3 steps here (sampling runs 2), and reports each one
    assert [v for v, total in comfy_run["results"][FINETUNE]["progress"] if total == 3] == [1, 2, 3]


def test_the_nodes_and_the_trainer_share_one_copy_of_the_core(comfy_run):
    # the pack registers its core as 'hypernet', the name training and the tests import, so one process holds one copy
    core_modules = comfy_run["report"]["code_result"]["core_modules"]
    assert core_modules == {"copies_under_the_pack": [], "one_subject_lora_class": True}


def test_normal_runs_keep_the_console_free_of_unloaded_lora_keys(comfy_run):
    # e.g. the finetune without a CLIP input once printed one 'lora key not loaded' line per text-encoder layer. The one
    # line allowed: ComfyUI's own Load LoRA (the 'core_lora' run) on a saved file naming the bundled word embedding, A1111's
    # key that the core loader does not read (the embedding reaches core prompts as embedding:<name>)
    unloaded = [line for line in comfy_run["report"]["log"].splitlines() if "lora key not loaded" in line]
    assert all(line.endswith("lora key not loaded: bundle_emb.sks.string_to_param.*") for line in unloaded), unloaded
    assert len(unloaded) <= 1, unloaded


def test_subject_tuning_shows_progress_and_its_hypernetwork_says_it_predicts_a_word_embedding(comfy_run):
    # the tuning runs 4 steps here (sampling runs 2), and reports each one
    assert [v for v, total in comfy_run["results"][TUNE]["progress"] if total == 4] == [1, 2, 3, 4]
    info, = comfy_run["results"][TUNE]["outputs"][INFO_NODE]["text"]
    assert "also predicts a word embedding" in info, info


def test_personalised_differs_from_base_and_strength_zero_is_base(comfy_run):
    personal, = images_of(comfy_run, KSAMPLER)
    base, = images_of(comfy_run, "plain")
    zero, = images_of(comfy_run, "strength0")
    assert np.array_equal(zero, base)
    assert np.abs(personal.astype(int) - base.astype(int)).max() > 0


def test_repeated_run_gives_identical_images(comfy_run):
    assert np.array_equal(images_of(comfy_run, KSAMPLER)[0], images_of(comfy_run, "repeat_a")[0])


def test_core_lora_loader_on_the_saved_file_equals_the_pack(comfy_run):
    assert comfy_run["results"]["core_lora"]["success"], comfy_run["results"]["core_lora"]["execution_error"]
    assert np.array_equal(images_of(comfy_run, "core_lora")[0], images_of(comfy_run, KSAMPLER)[0])


PARITY_CODE = r"""
import sys, torch, json
sys.path.append(spec["repo"])
import comfy.clip_vision, comfy.sd, comfy.sd1_clip, comfy.samplers, comfy.model_management, folder_paths, os
from training.image_encoder import load_image_encoder
result = {}
clip_path = folder_paths.get_full_path("clip_vision", "CLIP-ViT-L-14.safetensors")
image = torch.rand(1, 150, 100, 3, generator=torch.Generator().manual_seed(0))
ours = load_image_encoder(clip_path)
theirs = comfy.clip_vision.load(clip_path).encode_image(image, crop=True)
result["clip_vision_max_abs_diff"] = {k: float((ours.features(image, k) - (theirs[k] if theirs[k].dim() == 3 else theirs[k].unsqueeze(1)).float()).abs().max())
                                      for k in ("last_hidden_state", "penultimate_hidden_states", "image_embeds")}

# HM-CFG: the guider's denoised output at one (x, sigma) vs the pure formula on three separately computed predictions
import nodes as core
guider_module = sys.modules[core.NODE_CLASS_MAPPINGS["SubjectHyperNet_HMCFGGuider"].__module__]
import hypernet.guidance as guidance
bridge_module = sys.modules[guider_module.__name__.rsplit(".", 1)[0] + ".comfy_bridge"]
result["core_modules"] = {"copies_under_the_pack": sorted(k for k in sys.modules if k.endswith(".hypernet") or ".hypernet." in k),
                          "one_subject_lora_class": bridge_module.SubjectLora is sys.modules["hypernet"].SubjectLora}
model, clip, vae = core.CheckpointLoaderSimple().load_checkpoint("v1-5-pruned-emaonly.safetensors")[:3]
hypernet = core.NODE_CLASS_MAPPINGS["SubjectHyperNet_LoadHyperNet"]().load("subject_hypernet_sd15.safetensors")["result"][0]
clip_vision = core.CLIPVisionLoader().load_clip("CLIP-ViT-L-14.safetensors")[0]
image = core.LoadImage().load_image("subject.png")[0]
model_s, clip_s, lora = core.NODE_CLASS_MAPPINGS["SubjectHyperNet_PredictSubjectLora"]().predict(hypernet, clip_vision, image, model, 1.0, clip, 1.0)
encode = lambda c, text: core.CLIPTextEncode().encode(c, text)[0]
pos, neg, subj = encode(clip, "a photo of a sks toy"), encode(clip, "blurry"), encode(clip_s, "a photo of a sks toy")

def one_evaluation(model_fn, x, sigmas, extra_args=None, callback=None, disable=None):
    return model_fn(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))

sampler = comfy.samplers.KSAMPLER(one_evaluation)
sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 4).cpu()
latent = torch.zeros(1, 4, 8, 8)
noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))

def run(guider):
    return guider.sample(noise, latent, sampler, sigmas, seed=0).float()

def plain(m, positive, negative):
    g = comfy.samplers.CFGGuider(m)
    g.set_conds(positive, negative)
    g.set_cfg(1.0)
    return run(g)

base_c, base_u, subject_c = plain(model, pos, neg), plain(model, neg, neg), plain(model_s, subj, neg)
expected = guidance.hm_cfg(base_u, base_c, subject_c, 5.0, 2.0)
hm = {}
for implementation in ("comfy_hooks", "batched"):
    g = guider_module.make_guider(model, lora, pos, neg, 5.0, 2.0, 0.0, 1.0, subject_positive=subj, implementation=implementation)
    hm[implementation] = {"max_abs_diff": float((run(g) - expected).abs().max())}
hm["scale"] = float(expected.abs().max())
hm["subject_term_matters"] = float((expected - guidance.hm_cfg(base_u, base_c, None, 5.0, 2.0)).abs().max())
closed = guider_module.make_guider(model, lora, pos, neg, 5.0, 2.0, 0.5, 1.0, subject_positive=subj)  # first step is outside
hm["gate_closed_equals_cfg"] = float((run(closed) - guidance.hm_cfg(base_u, base_c, None, 5.0, 2.0)).abs().max())
# a core sampler_cfg_function patch (RescaleCFG) before HM-CFG takes effect, as it does for the core CFGGuider
rescaled = core.NODE_CLASS_MAPPINGS["RescaleCFG"]().patch(model, 0.7)[0]
rescaled_core = comfy.samplers.CFGGuider(rescaled)
rescaled_core.set_conds(pos, neg)
rescaled_core.set_cfg(5.0)
closed_rescaled = guider_module.make_guider(rescaled, lora, pos, neg, 5.0, 2.0, 0.5, 1.0, subject_positive=subj)
open_rescaled = guider_module.make_guider(rescaled, lora, pos, neg, 5.0, 2.0, 0.0, 1.0, subject_positive=subj)
hm["rescale_gate_closed_equals_core"] = float((run(closed_rescaled) - run(rescaled_core)).abs().max())
hm["rescale_changes_cfg"] = float((run(rescaled_core) - guidance.hm_cfg(base_u, base_c, None, 5.0, 2.0)).abs().max())
hm["rescale_changes_hmcfg"] = float((run(open_rescaled) - expected).abs().max())
wrapped = model.clone()
wrapped.set_model_unet_function_wrapper(lambda apply_model, args: apply_model(args["input"], args["timestep"], **args["c"]))
hm["auto_chooses"] = {"plain model": guider_module.make_guider(model, lora, pos, neg, 5.0, 2.0, 0.0, 1.0, subject_positive=subj).implementation,
                      "wrapped model": guider_module.make_guider(wrapped, lora, pos, neg, 5.0, 2.0, 0.0, 1.0, subject_positive=subj).implementation}
hm["auto_on_wrapped_model"] = float((run(guider_module.make_guider(wrapped, lora, pos, neg, 5.0, 2.0, 0.0, 1.0, subject_positive=subj)) - expected).abs().max())
result["hmcfg"] = hm

# Rank-Relaxed Finetune never changes the MODEL it was given (nor another branch using it): the same prediction, bit
# for bit, after a finetune that completes, one cancelled midway (ComfyUI's interrupt) and one that raises (NaN image)
finetune_node = core.NODE_CLASS_MAPPINGS["SubjectHyperNet_RankRelaxedFinetune"]()
before_finetune = plain(model, pos, neg)
untouched = {}
finetune_node.finetune(model, lora, image, vae, subj, 3, 4, 1e-3, 0)
untouched["completed"] = float((plain(model, pos, neg) - before_finetune).abs().max())
comfy.model_management.interrupt_current_processing(True)
try:
    finetune_node.finetune(model, lora, image, vae, subj, 5, 4, 1e-3, 0)
    untouched["cancel_raised"] = False
except comfy.model_management.InterruptProcessingException:
    untouched["cancel_raised"] = True
finally:
    comfy.model_management.interrupt_current_processing(False)
untouched["cancelled"] = float((plain(model, pos, neg) - before_finetune).abs().max())
try:
    finetune_node.finetune(model, lora, image * float("nan"), vae, subj, 3, 4, 1e-3, 0)
    untouched["error"] = "no error"
except Exception as error:
    untouched["error"] = str(error)
untouched["raised"] = float((plain(model, pos, neg) - before_finetune).abs().max())
result["finetune_untouched"] = untouched

# the training package's single-file backbone computes what ComfyUI computes for the same checkpoint
from training.backbone import load_backbone
backbone = load_backbone(folder_paths.get_full_path("checkpoints", "v1-5-pruned-emaonly.safetensors"))
g = torch.Generator().manual_seed(5)
x, context, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g), torch.tensor([10.0, 700.0])
comfy.model_management.load_models_gpu([model])
with torch.no_grad():
    theirs_unet = model.model.diffusion_model(x, timesteps=t, context=context).float()
    ours_unet = backbone.unet(x, t, context).sample
    tokens = clip.tokenize("a photo of a sks toy on a red background")
    theirs_text = clip.encode_from_tokens(tokens).float()
    ids = backbone.tokenizer("a photo of a sks toy on a red background", padding="max_length", max_length=77, return_tensors="pt").input_ids
    ours_text = backbone.text_encoder(ids)[0]
    pixels = torch.rand(1, 64, 64, 3, generator=g)
    theirs_latent = model.model.process_latent_in(vae.encode(pixels)).float()
    ours_latent = backbone.encode_images(pixels.permute(0, 3, 1, 2) * 2 - 1)
result["backbone"] = {"unet": float((ours_unet - theirs_unet).abs().max()), "unet_scale": float(theirs_unet.abs().max()),
                      "text": float((ours_text - theirs_text).abs().max()), "text_scale": float(theirs_text.abs().max()),
                      "latent": float((ours_latent - theirs_latent).abs().max()), "latent_scale": float(theirs_latent.abs().max())}

# Subject Prompt Encode: the placeholder as the predicted word embedding, the same conditioning as the trainer's encoder
# (adapted text encoder + embedding) on the same files; the saved embedding works through ComfyUI's own embedding: syntax
import dataclasses
from pathlib import Path
from hypernet.words import nearest_real_word
from hypernet import locate_targets as locate
from training.sampling import _encode as trainer_encode
pack = guider_module.__name__.rsplit(".", 2)[0]
bridge = sys.modules[pack + ".nodes.comfy_bridge"]
vector = torch.randn(768, generator=torch.Generator().manual_seed(9)) * 0.02
with_word = bridge.subject_lora_for_comfy(dataclasses.replace(lora.subject, token_embedding=vector, placeholder="sks"))
prompt_node = core.NODE_CLASS_MAPPINGS["SubjectHyperNet_SubjectPromptEncode"]()
text = "a photo of a sks toy on a red background"
subject_cond, base_cond = prompt_node.encode(clip_s, with_word, text, base_clip=clip)
plain_subject = prompt_node.encode(clip, with_word, text)[0]  # the embedding alone, no text-encoder LoRA
saved_files = core.NODE_CLASS_MAPPINGS["SubjectHyperNet_SaveSubjectLora"]().save(with_word, "embedded/subject", True)["ui"]["text"]
via_core = core.CLIPTextEncode().encode(clip, "a photo of a embedding:embedded/subject_00001 toy on a red background")[0]
with torch.no_grad():
    ours_subject = trainer_encode(backbone, [text], "cpu", locate(None, [backbone.text_encoder]).modules, lora.subject.lora, vector.unsqueeze(0), "sks").context
    ours_plain = trainer_encode(backbone, [text], "cpu", None, None, vector.unsqueeze(0), "sks").context
    placeholder_id = backbone.tokenizer("sks", add_special_tokens=False).input_ids[0]
    nearest = nearest_real_word(vector, backbone.text_encoder.get_input_embeddings().weight, set(backbone.tokenizer.all_special_ids) | {placeholder_id})
    ids = backbone.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ours_base = backbone.text_encoder(torch.where(ids == placeholder_id, nearest, ids))[0]
bundled = comfy.sd1_clip.load_embed("subject_00001", [os.path.join(folder_paths.get_folder_paths("loras")[0], "embedded")], 768, "clip_l")
result["subject_prompt"] = {"subject": float((subject_cond[0][0].float() - ours_subject).abs().max()), "subject_scale": float(ours_subject.abs().max()),
                            "embedding_only": float((plain_subject[0][0].float() - ours_plain).abs().max()), "embedding_only_scale": float(ours_plain.abs().max()),
                            "base": float((base_cond[0][0].float() - ours_base).abs().max()), "base_scale": float(ours_base.abs().max()),
                            "embedding_moves_it": float((subject_cond[0][0] - base_cond[0][0]).abs().max()),
                            "core_embedding_syntax": float((via_core[0][0] - plain_subject[0][0]).abs().max()),
                            "bundled_in_lora": float((bundled.reshape(-1) - vector).abs().max()),
                            "saved": ["/".join(Path(f).parts[-3:]) for f in saved_files], "nearest": backbone.tokenizer.convert_ids_to_tokens(nearest)}

# Subject Tuning. The gradient of the tuning's denoising loss w.r.t. the word embedding, through ComfyUI's own MODEL and
# CLIP (the node's denoiser), equals the gradient through the trainer's UNet and text encoder on the same checkpoint
from hypernet.losses import denoising_loss
from training.objective import real_word_ids
tuning_nodes = sys.modules[pack + ".nodes.tuning"]
tuning_text = "a photo of a sks toy on a red background"
g = torch.Generator().manual_seed(11)
draw_x0, draw_noise, draw_t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700])
start = lora.subject.embedding.vectors.float()  # the predicted one: the fixture hypernetwork was trained with --token-embedding
tuning = {}

def embedding_gradient(denoiser, schedule):
    vectors = start.clone().requires_grad_()
    loss = denoising_loss(denoiser(schedule.add_noise(draw_x0, draw_noise, draw_t), draw_t, vectors), draw_noise).mean()
    return torch.autograd.grad(loss, vectors)[0]

with torch.inference_mode(False), torch.enable_grad():
    work = tuning_nodes.trainable_clone(model, clip)
    comfy_denoiser, comfy_vocabulary, comfy_schedule = tuning_nodes.word_denoiser(work, clip, tuning_text, "sks", draw_x0)
    theirs_grad = embedding_gradient(comfy_denoiser, comfy_schedule)
    trainer_denoiser = lambda x_t, t, v: backbone.unet(x_t, t, trainer_encode(backbone, [tuning_text], "cpu", None, None, v, "sks").context.expand(2, -1, -1)).sample
    ours_grad = embedding_gradient(trainer_denoiser, backbone.noise_schedule())
    # the helper is what makes it work: without it, backward through ComfyUI's CLIP refuses
    vectors, placeholder_id, key = start.clone().requires_grad_(), backbone.tokenizer("sks", add_special_tokens=False).input_ids[0], clip.tokenizer.clip_name
    tokens = clip.tokenize(tuning_text)
    tokens = {**tokens, key: [[(vectors[0], *e[1:]) if e[0] == placeholder_id else e for e in chunk] for chunk in tokens[key]]}
    try:
        clip.encode_from_tokens(tokens).float().square().sum().backward()
        tuning["without_helper"] = "no error"
    except RuntimeError as error:
        tuning["without_helper"] = str(error)
ours_vocabulary = backbone.text_encoder.get_input_embeddings().weight.detach()[real_word_ids(backbone, placeholder_id)]
tuning["gradient"] = {"max_abs_diff": float((theirs_grad - ours_grad).abs().max()), "scale": float(ours_grad.abs().max()),
                      "vocabulary": float((comfy_vocabulary - ours_vocabulary.float()).abs().max()) if comfy_vocabulary.shape == ours_vocabulary.shape else "shapes differ",
                      "schedule": float((comfy_schedule.alphas_cumprod - backbone.noise_schedule().alphas_cumprod).abs().max())}

# the node: a few steps move the embedding and the UNet part of the LoRA, the text-encoder part stays predicted;
# the MODEL, both CLIPs and the subject LoRA given to it stay bit-identical after a run that completes, one cancelled
# midway (ComfyUI's interrupt, seen at the end of the first of 5 steps) and one that raises (NaN image)
tuning_node = core.NODE_CLASS_MAPPINGS["SubjectHyperNet_SubjectTuning"]()

def snapshot():
    with torch.no_grad():
        return [plain(model, pos, neg), clip.encode_from_tokens(clip.tokenize(tuning_text)).float(), clip_s.encode_from_tokens(clip_s.tokenize(tuning_text)).float(),
                *lora.subject.lora.down.values(), *lora.subject.lora.up.values(), lora.subject.token_embedding.clone()]

def changed(before):
    return max(float((a - b).abs().max()) for a, b in zip(snapshot(), before))

before_tuning = snapshot()
tuned_model, tuned = tuning_node.tune(model, clip_s, lora, image, vae, "a photo of a sks toy", 3, 1e-2, 0.1, 0)
untouched = {"completed": changed(before_tuning)}
comfy.model_management.interrupt_current_processing(True)
try:
    tuning_node.tune(model, clip_s, lora, image, vae, "a photo of a sks toy", 5, 1e-2, 0.1, 0)
    untouched["cancel_raised"] = False
except comfy.model_management.InterruptProcessingException:
    untouched["cancel_raised"] = True
finally:
    comfy.model_management.interrupt_current_processing(False)
untouched["cancelled"] = changed(before_tuning)
try:
    tuning_node.tune(model, clip_s, lora, image * float("nan"), vae, "a photo of a sks toy", 3, 1e-2, 0.1, 0)
    untouched["error"] = "no error"
except Exception as error:
    untouched["error"] = str(error)
untouched["raised"] = changed(before_tuning)
try:
    tuning_node.tune(model, clip_s, lora, image, vae, "a photo of a toy", 3, 1e-2, 0.1, 0)
    untouched["missing_word"] = "no error"
except Exception as error:
    untouched["missing_word"] = str(error)
before, after = lora.subject.lora, tuned.subject.lora
tuning["untouched"] = untouched
tuning["moved"] = {"embedding": float((tuned.subject.token_embedding - lora.subject.token_embedding).abs().max()),
                   "unet": max(float((after.delta(n) - before.delta(n)).abs().max()) for n in before.names if n.startswith("lora_unet_")),
                   "text": max(float((after.delta(n) - before.delta(n)).abs().max()) for n in before.names if not n.startswith("lora_unet_")),
                   "word": tuned.subject.placeholder}
# ... and it lowers the denoising loss on the reference: the predicted and the tuned (LoRA, embedding) on the draws of
# noise and timestep the tuning used (its seed), and on fresh ones
from hypernet.finetune import noisy_batch
from hypernet.runtime import attach_lora
with torch.inference_mode(False), torch.no_grad():
    work = tuning_nodes.trainable_clone(model, clip_s)
    reference = model.model.process_latent_in(vae.encode(image[..., :3])).float()
    denoiser, _, schedule = tuning_nodes.word_denoiser(work, clip_s, "a photo of a sks toy", "sks", reference)
    modules = locate(work.model.diffusion_model).modules

    def reference_loss(subject, seed, draws):
        generator, total = torch.Generator().manual_seed(seed), 0.0
        for _ in range(draws):
            x0_, noise_, t_ = noisy_batch(reference.unsqueeze(0), 1, schedule, generator)
            with attach_lora(modules, subject.lora.restricted_to(modules)):
                total += float(denoising_loss(denoiser(schedule.add_noise(x0_, noise_, t_), t_, subject.token_embedding.reshape(1, -1).float()), noise_).mean())
        return total / draws

    tuning["loss"] = {"predicted_on_its_draws": reference_loss(lora.subject, 0, 3), "tuned_on_its_draws": reference_loss(tuned.subject, 0, 3),
                      "predicted_fresh": reference_loss(lora.subject, 123, 8), "tuned_fresh": reference_loss(tuned.subject, 123, 8)}
result["tuning"] = tuning


# Save Subject LoRA: two saves at once (two queues, two tabs) must get two names, each file whole
import os, threading
from safetensors.torch import load_file
saver, barrier, saved = core.NODE_CLASS_MAPPINGS["SubjectHyperNet_SaveSubjectLora"](), threading.Barrier(2), {}

def save_one(value):
    lora = {f"lora_unet_x{i}.lora_down.weight": torch.full((64, 65536), float(value)) for i in range(2)}  # 32 MB: the writes overlap
    barrier.wait(timeout=60)
    saved[value] = saver.save(lora, "concurrent/subject", False)["result"][0]

threads = [threading.Thread(target=save_one, args=(value,)) for value in (1, 2)]
[t.start() for t in threads]
[t.join() for t in threads]
loras_dir = folder_paths.get_folder_paths("loras")[0]
result["concurrent_saves"] = {str(value): [name, float(load_file(os.path.join(loras_dir, name))["lora_unet_x1.lora_down.weight"][-1, -1])]
                              for value, name in saved.items()}
""" + NODE_SPECS_CODE + """
result["node_specs"] = node_specs
"""


def test_training_features_equal_comfyui_clip_vision_features(comfy_run):
    report = comfy_run["report"]
    assert "code_error" not in report, report.get("code_error")
    diffs = report["code_result"]["clip_vision_max_abs_diff"]
    print("CLIP vision parity, max |training - ComfyUI|:", diffs)
    assert set(diffs) == {"last_hidden_state", "penultimate_hidden_states", "image_embeds"}
    assert max(diffs.values()) < 1e-3


@pytest.mark.parametrize("case, node, message", [
    ("bad_model", "SubjectHyperNet_PredictSubjectLora", "trained for another base model"),
    ("bad_encoder", "SubjectHyperNet_PredictSubjectLora", "expects image features of shape (batch, 257, 1280)"),
    ("bad_file", "SubjectHyperNet_LoadHyperNet", "corrupt or truncated"),
    ("bad_empty", "SubjectHyperNet_PredictSubjectLora", "need at least one reference image"),
])
def test_bad_input_gives_a_clear_error_on_the_right_node(comfy_run, case, node, message):
    error = comfy_run["results"][case]["execution_error"]
    assert error is not None and error["node_type"] == node
    assert message in error["exception_message"]


def test_repeated_runs_do_not_grow_memory(comfy_run):
    rss = [comfy_run["results"][f"repeat_{i}"]["rss_mb"] for i in range(REPEATS)]
    assert all(comfy_run["results"][f"repeat_{i}"]["success"] for i in range(REPEATS))
    print(f"RSS over {REPEATS} runs (MB): first {rss[0]:.0f}, 5th {rss[4]:.0f}, last {rss[-1]:.0f}")
    assert rss[-1] - rss[4] < 40, rss  # steady state after warm-up: no per-run leak


def test_hmcfg_guider_equals_the_pure_function_of_three_model_predictions(comfy_run):
    result = comfy_run["report"]["code_result"]
    print("HM-CFG parity:", result["hmcfg"])
    hm = result["hmcfg"]
    tolerance = 2e-5 * hm["scale"]  # float32 rounding: ComfyUI batches the predictions differently in each route
    for implementation in ("comfy_hooks", "batched"):
        assert hm[implementation]["max_abs_diff"] < tolerance, hm
    assert hm["subject_term_matters"] > 1000 * tolerance  # the comparison is not vacuous
    assert hm["gate_closed_equals_cfg"] < tolerance
    # RescaleCFG patched into the MODEL acts inside HM-CFG: the gate closed, HM-CFG is the core guider on that model
    assert hm["rescale_changes_cfg"] > 100 * tolerance and hm["rescale_changes_hmcfg"] > 100 * tolerance
    assert hm["rescale_gate_closed_equals_core"] < tolerance
    # the default picks the batched path, and the hooks path where another node already wraps the model function
    assert hm["auto_chooses"] == {"plain model": "batched", "wrapped model": "comfy_hooks"}
    assert hm["auto_on_wrapped_model"] < tolerance


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_describes_the_same_graph_as_its_api_twin(comfy_run, name):
    ui = json.loads((API_DIR.parent / f"{name}.json").read_text())
    assert ui_to_api(ui, comfy_run["report"]["code_result"]["node_specs"]) == strip_meta(load(name))


def test_training_backbone_computes_what_comfyui_computes_for_the_same_checkpoint(comfy_run):
    parity = comfy_run["report"]["code_result"]["backbone"]
    print("backbone parity (max abs diff / scale):", parity)
    for part in ("unet", "text", "latent"):
        assert parity[part] <= 1e-4 * max(1.0, parity[f"{part}_scale"]), parity
        assert parity[f"{part}_scale"] > 1e-3  # not a comparison of zeros


def test_subject_prompt_encode_equals_the_trainers_encoding_and_the_saved_embedding_works_in_core_nodes(comfy_run):
    assert "code_error" not in comfy_run["report"], comfy_run["report"].get("code_error")
    parity = comfy_run["report"]["code_result"]["subject_prompt"]
    print("subject prompt parity:", parity)
    for part in ("embedding_only", "base"):  # the word as the embedding, or as its nearest word: float rounding apart
        assert parity[part] <= 1e-4 * max(1.0, parity[f"{part}_scale"]), parity
        assert parity[f"{part}_scale"] > 1e-3
    # with the text-encoder LoRA too: ComfyUI merges it into the CLIP weights it stores in fp16 (2^-11 relative rounding),
    # the trainer adds it in activation space in fp32
    assert parity["subject"] <= 1e-3 * parity["subject_scale"] and parity["subject"] < 1e-2 * parity["embedding_moves_it"], parity
    assert parity["embedding_moves_it"] > 1e-3  # the subject and base conditionings differ where the word is
    assert parity["core_embedding_syntax"] <= 1e-5  # CLIPTextEncode with embedding:<saved name> gives the same conditioning
    assert parity["bundled_in_lora"] == 0.0  # ComfyUI's embedding loader reads the vector bundled in the LoRA file
    assert sorted(parity["saved"]) == sorted(["loras/embedded/subject_00001.safetensors", "subject_loras/embedded/subject_00001.compact.safetensors",
                                              "embeddings/embedded/subject_00001.safetensors"])


def test_finetune_leaves_the_input_model_bit_identical_when_it_completes_is_cancelled_or_raises(comfy_run):
    assert "code_error" not in comfy_run["report"], comfy_run["report"].get("code_error")
    untouched = comfy_run["report"]["code_result"]["finetune_untouched"]
    print("finetune and the input MODEL:", untouched)
    assert untouched["cancel_raised"] and "NaN" in untouched["error"]
    assert untouched["completed"] == untouched["cancelled"] == untouched["raised"] == 0.0


def test_two_saves_at_once_get_two_names_and_whole_files(comfy_run):
    assert "code_error" not in comfy_run["report"], comfy_run["report"].get("code_error")
    saves = comfy_run["report"]["code_result"]["concurrent_saves"]
    assert sorted(name for name, _ in saves.values()) == ["concurrent/subject_00001.safetensors", "concurrent/subject_00002.safetensors"]
    assert {value for _, value in saves.values()} == {1.0, 2.0}  # neither overwrote the other


def test_subject_tuning_gradient_reaches_the_word_embedding_through_comfyuis_clip_as_through_the_trainers_encoder(comfy_run):
    assert "code_error" not in comfy_run["report"], comfy_run["report"].get("code_error")
    tuning = comfy_run["report"]["code_result"]["tuning"]
    print("subject tuning, d(denoising loss)/d(word embedding):", tuning["gradient"])
    gradient = tuning["gradient"]
    assert gradient["scale"] > 1e-6  # a gradient reaches the embedding at all
    assert gradient["max_abs_diff"] <= 1e-4 * gradient["scale"], gradient  # and it is the trainer's, to float rounding
    assert gradient["vocabulary"] == 0.0 and gradient["schedule"] < 1e-5, gradient  # the same real words, the same noise schedule
    # ComfyUI's CLIP still adds in place: without backward_through_inplace_residuals there is no gradient
    assert "modified by an inplace operation" in tuning["without_helper"], tuning["without_helper"]


def test_subject_tuning_moves_the_embedding_and_the_unet_lora_only_and_lowers_the_loss_on_the_reference(comfy_run):
    assert "code_error" not in comfy_run["report"], comfy_run["report"].get("code_error")
    tuning = comfy_run["report"]["code_result"]["tuning"]
    print("subject tuning:", tuning["moved"], tuning["loss"])
    moved, loss = tuning["moved"], tuning["loss"]
    assert moved["embedding"] > 1e-4 and moved["unet"] > 1e-6 and moved["text"] == 0.0 and moved["word"] == "sks", moved
    assert loss["tuned_on_its_draws"] < loss["predicted_on_its_draws"], loss  # 3 steps, on the noise and timesteps it trained on
    assert "does not contain the subject's word 'sks'" in tuning["untouched"]["missing_word"]


def test_subject_tuning_leaves_its_inputs_bit_identical_when_it_completes_is_cancelled_or_raises(comfy_run):
    assert "code_error" not in comfy_run["report"], comfy_run["report"].get("code_error")
    untouched = comfy_run["report"]["code_result"]["tuning"]["untouched"]
    print("subject tuning and its inputs:", untouched)
    assert untouched["cancel_raised"] and "NaN" in untouched["error"]
    # the MODEL's prediction, both CLIPs' encodings and the given subject LoRA (factors and embedding)
    assert untouched["completed"] == untouched["cancelled"] == untouched["raised"] == 0.0
