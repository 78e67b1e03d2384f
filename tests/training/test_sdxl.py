"""SDXL outside ComfyUI: target list and file sizes at full size, kohya's SDXL naming, diffusers' SDXL LoRA loader,
the trainer's SDXL backbone (prompt encoding, time ids, folders, native resolution, caches) and a tiny-sdxl run.

ComfyUI's side (workflows, the core LoRA loader, parity with the trainer on one checkpoint) is test_comfyui_sdxl.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from hypernet import FeatureSpec, HyperNetConfig, HyperNetwork, LidbConfig, expand_compact_subject_lora, load_hypernet, load_subject_lora, locate_targets
from hypernet.lidb import LidbBasis
from hypernet.subject import SubjectLora, predict_subject_lora
from hypernet.targets import family_of_layers, from_sgm_name, layer_component, to_sgm_name
from training.backbone import TextConditioning, load_backbone, native_resolution, sdxl_target_layers, tiny_sdxl_backbone

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def tiny_sdxl():
    return tiny_sdxl_backbone(seed=3)


def test_full_size_sdxl_targets_lidb_size_and_file_sizes(tmp_path):
    layers = sdxl_target_layers()
    prefixes = [layer_component(layer.name) for layer in layers]
    assert (prefixes.count("lora_unet"), prefixes.count("lora_te1"), prefixes.count("lora_te2")) == (560, 48, 128)
    assert family_of_layers(layers) == "sdxl"
    by_name = {layer.name: layer for layer in layers}
    assert (by_name["lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_k"].in_features,
            by_name["lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_k"].out_features) == (2048, 1280)
    assert by_name["lora_te2_text_model_encoder_layers_31_self_attn_out_proj"].in_features == 1280
    basis = LidbBasis(layers, LidbConfig())  # r=1, a=100, b=50
    assert basis.num_trainables() == 110_400
    generator = torch.Generator().manual_seed(0)
    trainables = {layer.name: torch.randn(basis.config.trainables_per_layer(layer), generator=generator) for layer in layers}
    subject = SubjectLora(layers, basis.expand_exact(trainables), "sdxl", trainables, basis)
    compact = subject.save_compact(tmp_path / "subject.compact.safetensors").stat().st_size
    standard = subject.save(tmp_path / "subject.safetensors").stat().st_size
    print(f"SDXL subject LoRA: compact {compact} bytes, standard (fp32, rank 1) {standard} bytes")
    assert 441_600 < compact <= 450_000  # 110,400 float32 numbers + metadata
    assert 7_000_000 < standard < 8_000_000
    expanded, _, _ = expand_compact_subject_lora(tmp_path / "subject.compact.safetensors")
    reloaded, metadata = load_subject_lora(tmp_path / "subject.safetensors")
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert all(torch.equal(expanded.delta(n), reloaded.delta(n)) for n in by_name)


def test_kohya_sdxl_names_are_the_sgm_blocks():
    assert to_sgm_name("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q") == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert to_sgm_name("lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_out_0") == "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0"
    assert to_sgm_name("lora_unet_mid_block_attentions_0_transformer_blocks_3_attn1_to_v") == "lora_unet_middle_block_1_transformer_blocks_3_attn1_to_v"
    assert to_sgm_name("lora_unet_up_blocks_0_attentions_2_transformer_blocks_0_attn2_to_k") == "lora_unet_output_blocks_2_1_transformer_blocks_0_attn2_to_k"
    assert to_sgm_name("lora_unet_up_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q") == "lora_unet_output_blocks_3_1_transformer_blocks_1_attn1_to_q"
    assert to_sgm_name("lora_te2_text_model_encoder_layers_0_self_attn_q_proj") == "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    names = [layer.name for layer in sdxl_target_layers()]
    sgm = [to_sgm_name(n) for n in names]
    assert len(set(sgm)) == len(names) and [from_sgm_name(n) for n in sgm] == names


def tiny_sdxl_subject(backbone, seed=0):
    layers = locate_targets(backbone.unet, backbone.text_encoders).layers
    config = HyperNetConfig(features=FeatureSpec(dim=16, tokens=4), width=32, depth=1, heads=4, iterations=2, lidb=LidbConfig(a=8, b=6))
    torch.manual_seed(seed)
    hypernet = HyperNetwork(config, layers)
    with torch.no_grad():
        for p in hypernet.heads.weights:
            p.normal_(0, 0.05)
    return predict_subject_lora(hypernet, torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(seed)), base_arch="sdxl-tiny"), layers


def test_diffusers_sdxl_pipeline_loads_the_standard_file_as_w_plus_up_down(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    backbone = tiny_sdxl_backbone(seed=4)
    subject, layers = tiny_sdxl_subject(backbone)
    path = subject.save(tmp_path / "subject.safetensors")
    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys) and not any(k.startswith("lora_unet_down_blocks_") for k in keys)
    pipe = StableDiffusionXLPipeline(vae=backbone.vae, text_encoder=backbone.text_encoder, text_encoder_2=backbone.text_encoder_2,
                                     tokenizer=backbone.tokenizer, tokenizer_2=backbone.tokenizer_2, unet=backbone.unet,
                                     scheduler=backbone.noise_scheduler)
    bound = locate_targets(pipe.unet, [pipe.text_encoder, pipe.text_encoder_2])
    originals = {name: module.weight.detach().clone() for name, module in bound.modules.items()}
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()  # peft wraps each adapted linear and folds the LoRA into it, the original module kept as its base layer
    changed = 0
    for name in bound.names:
        weight = bound.modules[name].weight.detach()
        torch.testing.assert_close(weight, originals[name] + subject.lora.delta(name), rtol=1e-5, atol=1e-6)
        changed += int(not torch.equal(weight, originals[name]))
    assert changed == len(layers) == 152  # every layer of the file, UNet and both text encoders


def test_prompt_encoding_uses_both_penultimate_states_and_the_second_encoders_pooled_embedding(tiny_sdxl):
    prompts = ["a photo of a sks toy", ""]
    with torch.no_grad():
        conditioning = tiny_sdxl.encode_prompts(prompts)
        first = tiny_sdxl.text_encoder(tiny_sdxl.tokenize(prompts, "cpu"), output_hidden_states=True).hidden_states[-2]
        ids_2 = tiny_sdxl.tokenize(prompts, "cpu", tiny_sdxl.tokenizer_2)
        second = tiny_sdxl.text_encoder_2(ids_2, output_hidden_states=True)
    assert ids_2[1, 2:].eq(0).all()  # the second tokenizer pads with "!" (id 0), as SDXL's does
    assert torch.equal(conditioning.context, torch.cat([first, second.hidden_states[-2]], dim=-1))
    assert torch.equal(conditioning.pooled, second.text_embeds) and conditioning.context.shape == (2, 77, 48)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 800])
    default = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)
    with torch.no_grad():
        implicit = tiny_sdxl.predict_noise(x, t, conditioning)
        explicit = tiny_sdxl.predict_noise(x, t, conditioning, default)
        cropped = tiny_sdxl.predict_noise(x, t, conditioning, torch.tensor([[96, 64, 16, 0, 64, 64]] * 2, dtype=torch.float32))
        no_pooled = tiny_sdxl.predict_noise(x, t, TextConditioning(conditioning.context, torch.zeros_like(conditioning.pooled)))
    assert torch.equal(implicit, explicit)
    assert (implicit - cropped).abs().max() > 1e-4 and (implicit - no_pooled).abs().max() > 1e-4  # both really reach the UNet


def test_batches_carry_the_original_size_and_crop_and_mirror_the_crop_when_flipped(tmp_path):
    from training.data import SubjectFolderDataset
    from training.inputs import SubjectBatches

    (tmp_path / "dog").mkdir()
    Image.new("RGB", (120, 60), (200, 10, 10)).save(tmp_path / "dog" / "a.png")  # landscape: resized to 64 x 128, cropped
    data = SubjectFolderDataset(tmp_path, 32, flip_prob=0.0)
    pixels, original, crop = data.target(0)
    assert pixels.shape == (3, 32, 32) and original == (60, 120) and crop == (0, 16)
    _, _, flipped_crop = data.target(0, flipped=True)
    assert flipped_crop == (0, 64 - 16 - 32)
    sample = data.get(0, torch.Generator().manual_seed(0))
    batch = SubjectBatches.assemble([sample], None, None, "cpu")
    assert batch.time_ids.tolist() == [[60.0, 120.0, 0.0, 16.0, 32.0, 32.0]]


def save_diffusers_folder(backbone, folder: Path, sdxl: bool = True) -> Path:
    parts = {"unet": backbone.unet, "text_encoder": backbone.text_encoder, "tokenizer": backbone.tokenizer, "vae": backbone.vae,
             "scheduler": backbone.noise_scheduler}
    if sdxl:
        parts.update(text_encoder_2=backbone.text_encoder_2, tokenizer_2=backbone.tokenizer_2)
    for name, part in parts.items():
        part.save_pretrained(folder / name) if hasattr(part, "save_pretrained") else part.save_config(folder / name)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"}))
    return folder


def test_sdxl_diffusers_folder_round_trip_native_resolution_and_folder_refusals(tiny_sdxl, tmp_path):
    from training.backbone import BackboneError

    folder = save_diffusers_folder(tiny_sdxl, tmp_path / "sdxl")
    loaded = load_backbone(str(folder))
    assert loaded.is_sdxl and loaded.arch == "sdxl" and native_resolution(str(folder)) == 64 == loaded.native_resolution
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
    with torch.no_grad():
        ours, theirs = loaded.encode_prompts(["a sks toy"]), tiny_sdxl.encode_prompts(["a sks toy"])
        assert torch.allclose(ours.context, theirs.context, atol=1e-6) and torch.allclose(ours.pooled, theirs.pooled, atol=1e-6)
        assert torch.allclose(loaded.predict_noise(x, t, ours), tiny_sdxl.predict_noise(x, t, theirs), atol=1e-6)
    refiner = tmp_path / "refiner"
    save_diffusers_folder(tiny_sdxl, refiner)
    for part in ("text_encoder", "tokenizer"):
        for file in (refiner / part).iterdir():
            file.unlink()
        (refiner / part).rmdir()
    with pytest.raises(BackboneError, match="SDXL refiner folder"):
        load_backbone(str(refiner))
    (tmp_path / "sd3" / "transformer").mkdir(parents=True)
    (tmp_path / "sd3" / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    with pytest.raises(BackboneError, match=r"SD3 \(MMDiT\) model folder .*supported are SD1.5-family and SDXL-family"):
        load_backbone(str(tmp_path / "sd3"))


def test_cached_latents_and_features_are_what_a_step_computes(tmp_path):
    from training.config import PRESETS, TrainConfig
    from training.data import SubjectFolderDataset
    from training.image_encoder import load_image_encoder
    from training.inputs import EncodedCache, SubjectBatches
    from training.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tmp_path, 2, 2, size=64, seed=1)
    config = TrainConfig(**{**PRESETS["tiny-sdxl"], "flip_prob": 0.5, "batch_size": 3})
    data = SubjectFolderDataset(tmp_path, 64, flip_prob=0.5)
    backbone, encoder = tiny_sdxl_backbone(), load_image_encoder("tiny")
    cache = EncodedCache(data, backbone, encoder, config)
    assert len(cache.latents) == 2 * len(data) and len(cache.features) == 4
    generator = torch.Generator().manual_seed(5)
    samples = [data.get(i, generator) for i in range(3)]
    cached = SubjectBatches.assemble(samples, encoder, config, "cpu", cache)
    fresh = SubjectBatches.assemble(samples, encoder, config, "cpu")
    with torch.no_grad():
        assert torch.allclose(cached.latents, backbone.encode_images(fresh.pixels), atol=1e-5)
    assert torch.allclose(cached.features, fresh.features, atol=1e-5)
    assert next(backbone.vae.parameters()).device.type == "cpu" and fresh.latents is None


def test_tiny_sdxl_preset_trains_with_the_memory_options_and_exports_sdxl_files(tmp_path):
    command = [sys.executable, "-m", "training.train", "--preset", "tiny-sdxl", "--synthetic-subjects", "4", "--synthetic-images-per-subject", "2",
               "--max-steps", "3", "--log-every", "1", "--sample-subjects", "1", "--sample-steps", "2", "--gradient-checkpointing",
               "--cache-latents", "--cache-features", "--output-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in rows)
    hypernet, info = load_hypernet(tmp_path / "hypernet.safetensors")
    assert info.base_arch == "sdxl-tiny" and json.loads((tmp_path / "config.json").read_text())["resolution"] == 64
    components = {layer_component(layer.name) for layer in info.layers}
    assert components == {"lora_unet", "lora_te1", "lora_te2"}
    standard, metadata = load_subject_lora(tmp_path / "subject_lora.safetensors")
    compact, layers, _ = expand_compact_subject_lora(tmp_path / "subject_lora.compact.safetensors")
    assert layers == hypernet.layers and metadata["ss_base_model_version"] == "sdxl-tiny"
    assert all(torch.equal(standard.delta(n), compact.delta(n)) for n in compact.names)
    assert (tmp_path / "samples" / "final.png").stat().st_size > 0


@pytest.mark.parametrize("spec, expected", [("tiny", 64), ("tiny-sdxl", 64), ("toy", 64)])
def test_resolution_zero_means_the_backbones_native_resolution(spec, expected):
    from training.config import load_config

    assert load_config(["--backbone", spec]).resolution == expected
    assert load_config(["--backbone", spec, "--resolution", "96"]).resolution == 96
