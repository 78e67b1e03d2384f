"""training.image_encoder: ComfyUI-exact CLIP-vision features, the accepted file layouts and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from training.image_encoder import (
    CLIP_MEAN,
    CLIP_STD,
    ImageEncoderError,
    as_image_batch,
    load_image_encoder,
    save_image_encoder,
    tiny_config,
)

REPO = Path(__file__).resolve().parents[2]
HIDDEN = ("last_hidden_state", "penultimate_hidden_states", "image_embeds")


@pytest.fixture(scope="module")
def tiny():
    return load_image_encoder("tiny", seed=0)


def test_tiny_encoder_gives_comfyui_shaped_features_and_spec(tiny):
    images = torch.rand(2, 50, 80, 3, generator=torch.Generator().manual_seed(0))
    assert tiny.preprocess(images).shape == (2, 3, 32, 32)
    shapes = {h: tuple(tiny.features(images, h).shape) for h in HIDDEN}
    assert shapes == {"last_hidden_state": (2, 17, 32), "penultimate_hidden_states": (2, 17, 32), "image_embeds": (2, 1, 32)}
    everything = tiny.encode(images)
    for h in HIDDEN:
        assert everything[h].dtype == torch.float32 and torch.allclose(everything[h], tiny.features(images, h), atol=1e-6)
    # ComfyUI's meanings: last = encoder output before post_layernorm; penultimate = output of layer L-2;
    # image_embeds = projection(post_layernorm(class token of the last layer))
    with torch.no_grad():
        out = tiny.model(pixel_values=tiny.preprocess(images), output_hidden_states=True)
        vision = tiny.model.vision_model
        x = vision.pre_layrnorm(vision.embeddings(tiny.preprocess(images)))
        assert torch.allclose(out.hidden_states[0], x, atol=1e-6)  # hidden_states[0] is after pre_layrnorm
        assert len(out.hidden_states) == 3 and torch.allclose(everything["penultimate_hidden_states"], out.hidden_states[1])
        pooled = vision.post_layernorm(everything["last_hidden_state"][:, 0])
        assert torch.allclose(everything["image_embeds"][:, 0], tiny.model.visual_projection(pooled), atol=1e-6)
        assert not torch.allclose(everything["last_hidden_state"], vision.post_layernorm(everything["last_hidden_state"]))
    spec = tiny.spec("penultimate_hidden_states")
    assert spec == {"dim": 32, "tokens": 17, "hidden_state": "penultimate_hidden_states", "image_size": 32,
                    "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "encoder": "tiny random CLIP vision (seed 0)"}
    assert (tiny.spec("image_embeds")["dim"], tiny.spec("image_embeds")["tokens"]) == (32, 1)
    feature_spec = tiny.feature_spec()
    assert (feature_spec.dim, feature_spec.tokens, feature_spec.hidden_state) == (32, 17, "penultimate_hidden_states")
    json.dumps(spec)  # goes into the hypernetwork file's metadata
    with pytest.raises(ImageEncoderError, match="hidden_state must be one of"):
        tiny.features(images, "pooler_output")


def test_tiny_preset_is_a_function_of_the_seed_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = load_image_encoder("tiny", seed=5)
    assert torch.equal(torch.rand(3), expected)
    b, c = load_image_encoder("tiny", seed=5), load_image_encoder("tiny", seed=6)
    wa, wb, wc = (m.model.vision_model.encoder.layers[0].mlp.fc1.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_preprocessing_resizes_shortest_side_center_crops_and_quantises(tiny):
    # a 32x96 image: the crop keeps the middle third; bands outside it must not matter
    image = torch.rand(1, 32, 96, 3, generator=torch.Generator().manual_seed(1))
    changed = image.clone()
    changed[:, :, :20] = 0.0
    changed[:, :, -20:] = 1.0
    assert torch.equal(tiny.preprocess(image), tiny.preprocess(changed))
    exact = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(2))
    pixels = tiny.preprocess(exact)  # already the model size: only quantised and normalised
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    levels = (pixels * std + mean) * 255
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert torch.allclose(pixels, ((exact.movedim(-1, 1) * 255).round() / 255 - mean) / std, atol=1e-6)
    squashed = tiny.preprocess(image, crop=False)  # ComfyUI's crop="none": the whole image, squashed
    assert squashed.shape == (1, 3, 32, 32) and not torch.equal(squashed, tiny.preprocess(image))


def test_pil_uint8_grayscale_alpha_and_lists_give_the_same_features(tiny):
    rgb = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    reference = tiny.features(torch.from_numpy(rgb).float().div(255).unsqueeze(0), "last_hidden_state")
    assert torch.equal(tiny.features(Image.fromarray(rgb), "last_hidden_state"), reference)
    assert torch.equal(tiny.features(rgb, "last_hidden_state"), reference)
    rgba = np.concatenate([rgb, np.zeros((40, 56, 1), np.uint8)], -1)  # alpha is dropped, as ComfyUI does
    assert torch.equal(tiny.features(torch.from_numpy(rgba).float().div(255)[None], "last_hidden_state"), reference)
    gray = as_image_batch(Image.fromarray(rgb[..., 0]))
    assert gray.shape == (1, 40, 56, 3) and torch.equal(gray[..., 0], gray[..., 2])
    other = torch.rand(1, 90, 30, 3)
    listed = tiny.features([torch.from_numpy(rgb).float().div(255)[None], other], "last_hidden_state")
    assert listed.shape == (2, 17, 32)
    assert torch.allclose(listed[0:1], reference, atol=1e-6) and torch.allclose(listed[1:], tiny.features(other, "last_hidden_state"), atol=1e-6)
    with pytest.raises(ImageEncoderError, match=r"\(B, H, W, C\)"):
        tiny.features(torch.rand(1, 3, 32, 32), "last_hidden_state")  # channels-first is not ComfyUI's IMAGE


def _open_clip_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of the loader's conversion, written out independently for the test."""
    out = {}
    names = {"embeddings.class_embedding": "class_embedding", "embeddings.patch_embedding.weight": "conv1.weight",
             "embeddings.position_embedding.weight": "positional_embedding", "pre_layrnorm.weight": "ln_pre.weight",
             "pre_layrnorm.bias": "ln_pre.bias", "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias"}
    layer_names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
    for key, value in state.items():
        if key == "visual_projection.weight":
            out["visual.proj"] = value.t().contiguous()
            continue
        name = key[len("vision_model."):]
        if name in names:
            out["visual." + names[name]] = value
        elif name.startswith("encoder.layers."):
            index, rest = name[len("encoder.layers."):].split(".", 1)
            module, param = rest.rsplit(".", 1)
            if module in layer_names:
                out[f"visual.transformer.resblocks.{index}.{layer_names[module]}.{param}"] = value
            elif module == "self_attn.q_proj":
                parts = [state[f"vision_model.encoder.layers.{index}.self_attn.{p}.{param}"] for p in ("q_proj", "k_proj", "v_proj")]
                out[f"visual.transformer.resblocks.{index}.attn.in_proj_{param}"] = torch.cat(parts)
    out["transformer.resblocks.0.ln_1.weight"] = torch.ones(4)  # text tower keys of a full open_clip file are ignored
    return out


def test_comfyui_file_open_clip_file_and_transformers_folders_load_the_same_model(tiny, tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    image = torch.rand(1, 45, 61, 3, generator=torch.Generator().manual_seed(3))
    expected = tiny.encode(image)
    metadata = {"config": tiny.model.config.to_json_string(use_diff=True)}
    state = {k: v.contiguous() for k, v in tiny.model.state_dict().items() if not k.endswith("position_ids")}
    save_image_encoder(tiny, tmp_path / "clip_vision.safetensors")
    save_file(_open_clip_layout(state), tmp_path / "open_clip.safetensors", metadata=metadata)
    tiny.model.save_pretrained(tmp_path / "folder")
    full = CLIPModel(CLIPConfig(vision_config=tiny.model.config.to_dict(), text_config=dict(hidden_size=16, intermediate_size=32,
                                num_hidden_layers=1, num_attention_heads=2, vocab_size=100), projection_dim=32))
    full.vision_model.load_state_dict(tiny.model.vision_model.state_dict())
    full.visual_projection.load_state_dict(tiny.model.visual_projection.state_dict())
    full.save_pretrained(tmp_path / "clip_model")
    for source in ("clip_vision.safetensors", "open_clip.safetensors", "folder", "clip_model"):
        loaded = load_image_encoder(str(tmp_path / source))
        got = loaded.encode(image)
        for h in HIDDEN:
            assert torch.allclose(got[h], expected[h], atol=1e-6), (source, h)
        assert loaded.spec()["tokens"] == 17
    # a vision model without projection: hidden states only, image_embeds refused instead of made up
    bare = CLIPVisionModel(tiny.model.config)  # transformers 5 saves its keys without the vision_model. prefix
    bare.load_state_dict({k[len("vision_model."):]: v for k, v in tiny.model.state_dict().items() if k.startswith("vision_model.")}, strict=False)
    bare.save_pretrained(tmp_path / "no_projection")
    loaded = load_image_encoder(str(tmp_path / "no_projection"))
    assert torch.allclose(loaded.features(image, "last_hidden_state"), expected["last_hidden_state"], atol=1e-6)
    with pytest.raises(ImageEncoderError, match="no visual_projection"):
        loaded.features(image, "image_embeds")
    with pytest.raises(ImageEncoderError, match="no visual_projection"):
        load_image_encoder(str(tmp_path / "no_projection"), hidden_state="image_embeds")


def test_fp32_weights_are_rounded_where_comfyui_stores_fp16(tmp_path):
    encoder = load_image_encoder("tiny", match_comfy_storage=False)
    state = {k: v.contiguous() for k, v in encoder.model.state_dict().items() if not k.endswith("position_ids")}
    generator = torch.Generator().manual_seed(0)
    state = {k: v + 1e-3 * torch.randn(v.shape, generator=generator) for k, v in state.items()}  # not fp16-representable
    metadata = {"config": encoder.model.config.to_json_string(use_diff=True)}
    save_file(state, tmp_path / "fp32.safetensors", metadata=metadata)
    comfy_like = load_image_encoder(str(tmp_path / "fp32.safetensors"))
    exact = load_image_encoder(str(tmp_path / "fp32.safetensors"), match_comfy_storage=False)
    weights = dict(comfy_like.model.named_parameters())
    assert torch.equal(weights["vision_model.encoder.layers.0.mlp.fc1.weight"], state["vision_model.encoder.layers.0.mlp.fc1.weight"].half().float())
    assert torch.equal(weights["vision_model.embeddings.class_embedding"], state["vision_model.embeddings.class_embedding"].half().float())
    for kept in ("vision_model.pre_layrnorm.weight", "vision_model.post_layernorm.bias", "visual_projection.weight"):
        assert torch.equal(weights[kept], state[kept])  # ComfyUI creates these in fp32
    assert torch.equal(dict(exact.model.named_parameters())["vision_model.encoder.layers.0.mlp.fc1.weight"],
                       state["vision_model.encoder.layers.0.mlp.fc1.weight"])
    image = torch.rand(1, 32, 32, 3)
    assert not torch.equal(comfy_like.features(image, "last_hidden_state"), exact.features(image, "last_hidden_state"))


@pytest.mark.parametrize("content, message", [
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "is a Stable Diffusion checkpoint"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(1)}, "is a LoRA"),
    ({"text_model.embeddings.token_embedding.weight": torch.zeros(1)}, "is a CLIP text encoder"),
    ({"encoder.layer.0.layer_scale1.lambda1": torch.zeros(1)}, "DINOv2"),
    ({"foo": torch.zeros(1)}, "not a CLIP vision model.*found keys like foo"),
])
def test_foreign_safetensors_are_refused_naming_what_they_are(tmp_path, content, message):
    save_file(content, tmp_path / "model.safetensors")
    with pytest.raises(ImageEncoderError, match=message):
        load_image_encoder(str(tmp_path / "model.safetensors"))


def test_pickle_corrupt_incomplete_and_unknown_files_are_refused(tiny, tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "clip.pt")
    with pytest.raises(ImageEncoderError, match="pickle"):
        load_image_encoder(str(tmp_path / "clip.pt"))
    torch.save({"a": torch.zeros(1)}, tmp_path / "renamed.safetensors")  # a pickle (zip) under a safetensors name
    with pytest.raises(ImageEncoderError, match="pickle"):
        load_image_encoder(str(tmp_path / "renamed.safetensors"))
    path = save_image_encoder(tiny, tmp_path / "good.safetensors")
    (tmp_path / "truncated.safetensors").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageEncoderError, match="corrupt or truncated"):
        load_image_encoder(str(tmp_path / "truncated.safetensors"))
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(64))
    with pytest.raises(ImageEncoderError, match="not a valid safetensors"):
        load_image_encoder(str(tmp_path / "noise.safetensors"))
    state = load_file(path)
    save_file({k: v for k, v in state.items() if "layers.1.mlp" not in k}, tmp_path / "partial.safetensors",
              metadata={"config": tiny_config().to_json_string()})
    with pytest.raises(ImageEncoderError, match="incomplete CLIP vision model, 4 tensors missing"):
        load_image_encoder(str(tmp_path / "partial.safetensors"))
    save_file(state, tmp_path / "bare.safetensors")  # no config: width 32 is no known family, heads unknowable
    with pytest.raises(ImageEncoderError, match="width 32 is not a known family"):
        load_image_encoder(str(tmp_path / "bare.safetensors"))
    broken = dict(state)
    broken["vision_model.post_layernorm.weight"] = torch.full_like(state["vision_model.post_layernorm.weight"], float("nan"))
    save_file(broken, tmp_path / "nan.safetensors", metadata={"config": tiny_config().to_json_string()})
    with pytest.raises(ImageEncoderError, match="NaN"):
        load_image_encoder(str(tmp_path / "nan.safetensors"))
    with pytest.raises(ImageEncoderError, match="image encoder not found"):
        load_image_encoder(str(tmp_path / "missing.safetensors"))
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(ImageEncoderError, match="has no config.json"):
        load_image_encoder(str(tmp_path / "empty_folder"))
    tiny.model.save_pretrained(tmp_path / "bin_folder")
    (tmp_path / "bin_folder" / "model.safetensors").unlink()
    torch.save({}, tmp_path / "bin_folder" / "pytorch_model.bin")
    with pytest.raises(ImageEncoderError, match="pytorch_model.bin: pickle files are not loaded"):
        load_image_encoder(str(tmp_path / "bin_folder"))
    assert issubclass(ImageEncoderError, ValueError)


@pytest.mark.parametrize("field", ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                                   "patch_size", "projection_dim", "hidden_act", "layer_norm_eps"])
def test_damaged_config_metadata_is_a_file_format_error_naming_file_and_field(tiny, tmp_path, field):
    from hypernet.errors import FileFormatError

    path = save_image_encoder(tiny, tmp_path / "clip_vision.safetensors")
    state, config = load_file(path), tiny_config().to_dict()
    refused = 0
    for bad in (None, 0, -1, "x", [], 1.5, True, 10**9):
        damaged = {k: v for k, v in config.items() if k != field} if bad is None else {**config, field: bad}
        save_file(state, tmp_path / "damaged.safetensors", metadata={"config": json.dumps(damaged)})
        try:
            load_image_encoder(str(tmp_path / "damaged.safetensors"))
        except FileFormatError as error:  # ZeroDivisionError, TypeError, MemoryError ... fail the test
            refused += 1
            assert "damaged.safetensors" in str(error) and (field in str(error) or "'config'" in str(error)), str(error)
    assert refused >= 5
    for raw in ("", "null", "[1]", "{broken"):
        save_file(state, tmp_path / "damaged.safetensors", metadata={"config": raw})
        with pytest.raises(FileFormatError, match="damaged.safetensors has an invalid metadata field 'config'"):
            load_image_encoder(str(tmp_path / "damaged.safetensors"))


# ------------------------------------------------------------------------------------- ComfyUI parity

COMFY_SIDE = textwrap.dedent("""
    import sys
    root, weights, inputs, output = sys.argv[1:5]
    sys.path.insert(0, root)  # before anything else: this repo's nodes/ package must not shadow ComfyUI's nodes.py
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_management
    import comfy.clip_vision
    import torch
    from safetensors.torch import load_file, save_file

    images = load_file(inputs)
    clip = comfy.clip_vision.load(weights)
    out = {}
    encoded = clip.encode_image(images["image"], crop=True)
    for key in ("last_hidden_state", "penultimate_hidden_states", "image_embeds"):
        out["features." + key] = encoded[key].float().contiguous()
    for name, image in images.items():
        for crop in (True, False):
            out[f"pre.{name}.{crop}"] = comfy.clip_vision.clip_preprocess(image, size=clip.image_size, crop=crop).contiguous()
    state = clip.model.state_dict()  # the weights ComfyUI computes with, at the precision it stores them
    for key in ("vision_model.encoder.layers.0.mlp.fc1.weight", "vision_model.embeddings.position_embedding.weight",
                "vision_model.pre_layrnorm.weight", "vision_model.post_layernorm.bias", "visual_projection.weight"):
        out["weight." + key] = state[key].float().contiguous()
    out["dtype_fp16." + "layers"] = torch.tensor(int(state["vision_model.encoder.layers.0.mlp.fc1.weight"].dtype == torch.float16))
    save_file(out, output)
""")

FP32_IN_FILE = ("vision_model.encoder.layers.0.mlp.fc1.weight", "vision_model.embeddings.position_embedding.weight",
                "vision_model.pre_layrnorm.weight", "vision_model.post_layernorm.bias", "visual_projection.weight")


def write_random_vit_l(path: Path) -> None:
    """ViT-L/14 224 (the smallest size ComfyUI detects), random: fp16 except a few fp32 tensors that are not
    fp16-representable, so the file tests which weights ComfyUI rounds."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CLIPVisionModelWithProjection(config).state_dict().items() if not k.endswith("position_ids")}
    # 300M independent normals take ~10 s to draw; overlapping windows of one 8M pool are random enough here
    generator = torch.Generator().manual_seed(0)
    pool = torch.randn(1 << 23, generator=generator)
    state = {}
    for key, shape in shapes.items():
        offset = int(torch.randint(0, pool.numel() - shape.numel() + 1, (), generator=generator))
        value = pool[offset : offset + shape.numel()].view(shape)
        if "layer_norm" in key or "layrnorm" in key:
            value = 1.0 + 0.1 * value if key.endswith("weight") else 0.05 * value
        else:
            value = 0.02 * value
        state[key] = value.clone() if key in FP32_IN_FILE else value.half()
    save_file(state, path)


@pytest.mark.comfyui
def test_features_equal_comfyui_clip_vision_on_the_same_vit_l_file(tmp_path, comfyui_root):
    root = comfyui_root  # obtained as for every ComfyUI test (tests/conftest.py)
    weights = tmp_path / "CLIP-ViT-L-14-random.safetensors"
    try:
        write_random_vit_l(weights)
        generator = torch.Generator().manual_seed(1)
        images = {
            "image": torch.rand(1, 150, 101, 4, generator=generator),  # RGBA, portrait, downscaled + cropped
            "wide": torch.rand(2, 60, 300, 3, generator=generator),  # upscaled + cropped, a batch
            "exact": torch.rand(1, 224, 224, 3, generator=generator),  # no resize
        }
        save_file(images, tmp_path / "inputs.safetensors")
        (tmp_path / "comfy_side.py").write_text(COMFY_SIDE)
        start = time.perf_counter()
        comfy = subprocess.Popen([sys.executable, str(tmp_path / "comfy_side.py"), str(root), str(weights), str(tmp_path / "inputs.safetensors"),
                                  str(tmp_path / "out.safetensors")], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
        ours = load_image_encoder(str(weights))
        our_features = ours.encode(images["image"])
        log, _ = comfy.communicate(timeout=300)
        assert comfy.returncode == 0, log[-3000:]
        theirs = load_file(tmp_path / "out.safetensors")
        report = {}
        for key in HIDDEN:
            expected = theirs["features." + key]
            expected = expected.unsqueeze(1) if expected.dim() == 2 else expected
            assert our_features[key].shape == expected.shape, key
            report[key] = float((our_features[key] - expected).abs().max())
            scale = float(expected.abs().max())
            assert report[key] <= 1e-4 * max(1.0, scale), (key, report[key], scale)
        for name, image in images.items():
            for crop in (True, False):
                assert torch.allclose(ours.preprocess(image, crop=crop), theirs[f"pre.{name}.{crop}"], atol=1e-6, rtol=0), (name, crop)
        assert int(theirs["dtype_fp16.layers"]) == 1  # ComfyUI's default CLIP-vision storage on CPU is fp16
        parameters = dict(ours.model.named_parameters())
        for key in FP32_IN_FILE:
            assert torch.equal(parameters[key], theirs["weight." + key]), key
        print(f"ComfyUI parity, ViT-L/14 random ({time.perf_counter() - start:.1f} s): max abs diff {report}")
    finally:
        weights.unlink(missing_ok=True)
