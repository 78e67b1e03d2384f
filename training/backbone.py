"""The frozen backbone (UNet, text encoder, tokenizer, VAE, noise schedule) from what a user has, offline.

1. a diffusers-format folder (``model_index.json``);
2. a single-file SD1.5-family ``.safetensors`` checkpoint as it sits in ComfyUI's ``models/checkpoints``:
   the UNet/VAE configs are inferred from the tensor shapes (so shrunken test checkpoints of the
   family load too) and converted with diffusers' own single-file utilities; TAESD-keyed VAEs (ComfyUI's
   smallest checkpoints) map onto diffusers' ``AutoencoderTiny``; the CLIP tokenizer ships in
   ``training/configs/sd15/tokenizer``;
3. the preset ``tiny``: a small random-initialised SD1.5-shaped backbone for the demo and tests.

Latents are always returned in the space the UNet sees (ComfyUI: VAE encode, then the latent format's
``process_in``, i.e. times 0.18215 for SD1.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hypernet.files import read_safetensors

CONFIG_DIR = Path(__file__).parent / "configs" / "sd15"
SD15_SCALING = 0.18215
UNET_PREFIX = "model.diffusion_model."


class BackboneError(ValueError):
    pass


class TaesdVae(nn.Module):
    """ComfyUI's TAESD as a diffusers ``AutoencoderTiny`` with ComfyUI's scale/shift convention."""

    def __init__(self, tiny, vae_scale: float = 1.0, vae_shift: float = 0.0):
        super().__init__()
        self.tiny, self.vae_scale, self.vae_shift = tiny, vae_scale, vae_shift

    def encode_raw(self, pixels: torch.Tensor) -> torch.Tensor:  # [-1, 1] -> ComfyUI "raw" latents
        return self.tiny.encoder(pixels) / self.vae_scale + self.vae_shift

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        return self.tiny.decoder((latents - self.vae_shift) * self.vae_scale)


@dataclass
class Backbone:
    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    vae: nn.Module
    noise_scheduler: object
    arch: str
    vae_scaling_factor: float
    source: str
    vae_scale_factor: int = 8  # pixels per latent

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] ``(B, 3, H, W)`` -> UNet-space latents."""
        pixels = pixels.to(self.vae.device if hasattr(self.vae, "device") else next(self.vae.parameters()).device, next(self.vae.parameters()).dtype)
        if isinstance(self.vae, TaesdVae):
            raw = self.vae.encode_raw(pixels)
        else:
            raw = self.vae.encode(pixels).latent_dist.mode()
        return raw * self.vae_scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet-space latents -> images in [-1, 1]."""
        raw = (latents / self.vae_scaling_factor).to(next(self.vae.parameters()).dtype)
        if isinstance(self.vae, TaesdVae):
            return self.vae.decode_raw(raw)
        return self.vae.decode(raw).sample


def _ones_for_norms(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and module.weight is not None:
            nn.init.ones_(module.weight)
    return model


def _tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(CONFIG_DIR / "tokenizer", local_files_only=True)


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(CONFIG_DIR, subfolder="scheduler", local_files_only=True)


def _vae_downscale(vae) -> int:
    """Pixels per latent of a diffusers AutoencoderKL: each block after the first halves the resolution."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def sd15_random_backbone(seed: int = 0) -> Backbone:
    """Full-size SD1.5 architecture from the shipped configs, random weights (benchmarks; nothing downloaded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG_DIR / "unet"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIG_DIR / "text_encoder"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_DIR / "vae"))
    return Backbone(unet, text_encoder, _tokenizer(), vae, _scheduler(), "sd15", SD15_SCALING, "sd15-random")


def tiny_backbone(seed: int = 0) -> Backbone:
    """Small, random, SD1.5-shaped: 64 px images -> 8x8 latents, real CLIP tokenizer."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                max_position_embeddings=77, vocab_size=49408, projection_dim=32))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, sample_size=64)
    for model in (unet, text_encoder, vae):
        _ones_for_norms(model)
    return Backbone(unet, text_encoder, _tokenizer(), vae, _scheduler(), "sd15-tiny", SD15_SCALING, "tiny")


def toy_backbone() -> Backbone:
    """The toy world's pretrained base model (experiments/study.py), shipped in training/toy_model."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from .toy_model import TOY_DIR, load_toy_text_encoder, toy_available

    if not toy_available():
        raise BackboneError(f"the toy model is not in {TOY_DIR}; create it with python -m experiments.study")
    unet = UNet2DConditionModel.from_pretrained(TOY_DIR / "unet", local_files_only=True).float()
    vae = AutoencoderKL.from_pretrained(TOY_DIR / "vae", local_files_only=True).float()
    scheduler = DDPMScheduler.from_pretrained(TOY_DIR / "scheduler", local_files_only=True)
    return Backbone(unet, load_toy_text_encoder(), _tokenizer(), vae, scheduler, "sd15-toy", vae.config.scaling_factor, "toy",
                    vae_scale_factor=_vae_downscale(vae))


def _from_diffusers_folder(path: Path) -> Backbone:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    for part in ("unet", "text_encoder", "tokenizer", "vae", "scheduler"):
        if not (path / part).is_dir():
            raise BackboneError(f"{path} is not a complete diffusers model folder: '{part}/' is missing")
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError) as error:
        raise BackboneError(f"could not load the diffusers folder {path}: {error}") from error
    _check_supported(unet.config.cross_attention_dim, getattr(unet.config, "addition_embed_type", None), getattr(scheduler.config, "prediction_type", "epsilon"), str(path))
    return Backbone(unet, text_encoder, tokenizer, vae, scheduler, "sd15", vae.config.scaling_factor, str(path),
                    vae_scale_factor=_vae_downscale(vae))


def _check_supported(context_dim, addition_embed_type, prediction_type, where: str) -> None:
    if addition_embed_type == "text_time" or context_dim == 2048:
        raise BackboneError(f"{where}: SDXL checkpoints are not supported by the training package yet (SD1.5 family only)")
    if context_dim == 1024:
        raise BackboneError(f"{where}: this is an SD2.x model (OpenCLIP text encoder); only the SD1.5 family is supported")
    if prediction_type != "epsilon":
        raise BackboneError(f"{where}: {prediction_type} prediction is not supported; use an epsilon-prediction SD1.5 model")


def _count(keys, prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def _infer_unet_params(state: dict[str, torch.Tensor]) -> dict:
    """An LDM ``unet_config`` from the tensors: channels, levels, res blocks, attention, context width."""
    keys = [k[len(UNET_PREFIX):] for k in state if k.startswith(UNET_PREFIX)]
    shape = lambda name: state[UNET_PREFIX + name].shape  # noqa: E731
    model_channels, in_channels = shape("input_blocks.0.0.weight")[:2]
    channel_mult, attention_resolutions, transformer_depth, res_per_level = [], [], [], []
    level, count, ds, level_has_attention = 0, 0, 1, False
    for index in range(1, _count(keys, "input_blocks.")):
        block = f"input_blocks.{index}."
        if any(k.startswith(block + "0.op.") for k in keys):  # downsampler closes a level
            res_per_level.append(count)
            if level_has_attention:
                attention_resolutions.append(ds)
            level, count, ds, level_has_attention = level + 1, 0, ds * 2, False
            continue
        if count == 0:
            channel_mult.append(shape(block + "0.out_layers.3.weight")[0] // model_channels)
        count += 1
        if any(k.startswith(block + "1.proj_in.") for k in keys):
            level_has_attention = True
            transformer_depth.append(_count(keys, block + "1.transformer_blocks."))
    res_per_level.append(count)
    if level_has_attention:
        attention_resolutions.append(ds)
    if len(set(res_per_level)) != 1:
        raise BackboneError(f"unsupported UNet layout (res blocks per level {res_per_level})")
    attention_block = next((k for k in keys if k.endswith("attn2.to_k.weight")), None)
    if attention_block is None:
        raise BackboneError("the checkpoint's UNet has no cross-attention: not a text-to-image SD model")
    proj_in = next(k for k in keys if k.endswith("1.proj_in.weight"))
    return {
        "in_channels": in_channels, "out_channels": shape("out.2.weight")[0], "model_channels": model_channels,
        "channel_mult": channel_mult, "num_res_blocks": res_per_level[0], "attention_resolutions": attention_resolutions,
        "transformer_depth": max(transformer_depth) if transformer_depth else 1, "context_dim": shape(attention_block)[1],
        "num_heads": 8, "use_linear_in_transformer": state[UNET_PREFIX + proj_in].dim() == 2,
    }


def _infer_vae_params(state: dict[str, torch.Tensor]) -> dict:
    prefix = "first_stage_model."
    keys = [k[len(prefix):] for k in state if k.startswith(prefix)]
    ch = state[prefix + "encoder.conv_in.weight"].shape[0]
    levels = _count(keys, "encoder.down.")
    ch_mult = [state[prefix + f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)]
    return {"ch": ch, "ch_mult": ch_mult, "num_res_blocks": _count(keys, "encoder.down.0.block."), "z_channels": state[prefix + "decoder.conv_in.weight"].shape[1],
            "in_channels": 3, "out_ch": 3}


def _from_single_file(path: Path, dtype: torch.dtype) -> Backbone:
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm, create_vae_diffusers_config_from_ldm,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    state, _ = read_safetensors(path, "checkpoint")
    if not any(k.startswith(UNET_PREFIX) for k in state):
        kind = "a LoRA" if any(".lora_" in k for k in state) else "a CLIP vision model" if any(k.startswith("vision_model.") for k in state) else "not a Stable Diffusion checkpoint"
        raise BackboneError(f"{path.name} is {kind}: expected a single-file SD1.5 checkpoint (model.diffusion_model.*)")
    if any(k.startswith("conditioner.embedders.") for k in state) or UNET_PREFIX + "label_emb.0.0.weight" in state:
        raise BackboneError(f"{path.name} is an SDXL checkpoint: SDXL is not supported by the training package yet (SD1.5 family only)")
    if any(k.startswith("cond_stage_model.model.") for k in state):
        raise BackboneError(f"{path.name} is an SD2.x checkpoint (OpenCLIP text encoder): only the SD1.5 family is supported")
    if not any(k.startswith("cond_stage_model.transformer.") for k in state):
        raise BackboneError(f"{path.name} has no CLIP text encoder (cond_stage_model.transformer.*)")

    unet_params = _infer_unet_params(state)
    _check_supported(unet_params["context_dim"], None, "epsilon", path.name)
    taesd = any(k.startswith("first_stage_model.taesd_encoder.") for k in state)
    vae_params = {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "z_channels": 4, "in_channels": 3, "out_ch": 3} if taesd else _infer_vae_params(state)
    original = {"model": {"params": {"unet_config": {"params": unet_params}, "first_stage_config": {"params": {"ddconfig": vae_params}}, "scale_factor": SD15_SCALING}}}
    unet_config = create_unet_diffusers_config_from_ldm(original, state)
    unet_config["sample_size"] = 64
    unet = UNet2DConditionModel(**unet_config)
    _load_exact(unet, convert_ldm_unet_checkpoint(state, unet_config), f"{path.name} UNet")

    text_state = convert_ldm_clip_checkpoint(state)
    if "text_model.embeddings.token_embedding.weight" not in text_state:
        raise BackboneError(f"{path.name}: the text encoder is not a CLIP text model")
    hidden = text_state["text_model.embeddings.token_embedding.weight"].shape[1]
    layers = _count(list(text_state), "text_model.encoder.layers.")
    text_config = CLIPTextConfig.from_pretrained(CONFIG_DIR / "text_encoder", local_files_only=True)
    text_config.update({"hidden_size": hidden, "num_hidden_layers": layers,
                        "intermediate_size": text_state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                        "vocab_size": text_state["text_model.embeddings.token_embedding.weight"].shape[0]})
    text_encoder = CLIPTextModel(text_config)
    if not any(k.startswith("text_model.") for k in text_encoder.state_dict()):  # transformers >= 5 dropped the level
        text_state = {k.removeprefix("text_model."): v for k, v in text_state.items()}
    _load_exact(text_encoder, {k: v for k, v in text_state.items() if not k.endswith("position_ids")}, f"{path.name} text encoder")

    if taesd:
        tiny = AutoencoderTiny()
        converted = {}
        for key, value in state.items():
            if key.startswith("first_stage_model.taesd_encoder."):
                converted["encoder.layers." + key[len("first_stage_model.taesd_encoder."):]] = value
            elif key.startswith("first_stage_model.taesd_decoder."):
                index, rest = key[len("first_stage_model.taesd_decoder."):].split(".", 1)
                converted[f"decoder.layers.{int(index) - 1}.{rest}"] = value  # ComfyUI's layer 0 is the tanh clamp
        _load_exact(tiny, converted, f"{path.name} TAESD")
        scale = float(state.get("first_stage_model.vae_scale", torch.tensor(1.0)))
        shift = float(state.get("first_stage_model.vae_shift", torch.tensor(0.0)))
        vae: nn.Module = TaesdVae(tiny, scale, shift)
    else:
        vae_config = create_vae_diffusers_config_from_ldm(original, state)
        vae = AutoencoderKL(**vae_config)
        _load_exact(vae, convert_ldm_vae_checkpoint(state, vae_config), f"{path.name} VAE")
    return Backbone(unet, text_encoder, _tokenizer(), vae, _scheduler(), "sd15", SD15_SCALING, str(path))


def _load_exact(model: nn.Module, state: dict, what: str) -> None:
    model_keys = set(model.state_dict())
    missing = sorted(k for k in model_keys - set(state) if not k.endswith("position_ids"))
    if missing:
        raise BackboneError(f"{what}: checkpoint lacks {len(missing)} tensors (e.g. {missing[0]}); the file is incomplete or of another architecture")
    model.load_state_dict({k: v.float() for k, v in state.items() if k in model_keys}, strict=False)


def load_backbone(spec: str, *, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> Backbone:
    """The frozen backbone named by ``spec`` (preset 'tiny' or 'toy', a diffusers folder or a .safetensors file)."""
    if spec == "tiny":
        backbone = tiny_backbone(seed)
    elif spec == "toy":
        backbone = toy_backbone()
    else:
        path = Path(spec)
        if path.is_dir():
            if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
                raise BackboneError(f"{path} is not a diffusers model folder (no model_index.json)")
            backbone = _from_diffusers_folder(path)
        elif path.exists() or path.suffix:
            backbone = _from_single_file(path, dtype)
        else:
            raise BackboneError(f"backbone {spec!r}: not a preset ('tiny', 'toy'), a folder or a file")
    for model in (backbone.unet, backbone.text_encoder, backbone.vae):
        model.to(device).eval().requires_grad_(False)
    if dtype != torch.float32:  # the VAE stays float32: it overflows in fp16 and runs once per batch
        backbone.unet.to(dtype)
        backbone.text_encoder.to(dtype)
    return backbone
