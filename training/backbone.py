"""The frozen backbone (UNet, text encoder(s), tokenizer(s), VAE, noise schedule) from what a user has, offline.

Two families: SD1.5 (one CLIP-L text encoder) and SDXL (CLIP-L + OpenCLIP bigG: the UNet reads both
penultimate hidden states concatenated, plus the second encoder's pooled embedding and the size/crop
"time ids"). Sources:

1. a diffusers-format folder (``model_index.json``; SDXL folders have ``text_encoder_2``/``tokenizer_2``);
2. a single-file ``.safetensors`` checkpoint as it sits in ComfyUI's ``models/checkpoints``: the UNet/VAE
   configs are inferred from the tensor shapes (so shrunken test checkpoints of the family load too) and
   converted with diffusers' own single-file utilities; TAESD-keyed VAEs (ComfyUI's smallest checkpoints)
   map onto diffusers' ``AutoencoderTiny``; tokenizers and text-encoder configs ship in
   ``training/configs/{sd15,sdxl}`` (written by ``training/configs/make_sdxl_configs.py``);
3. the presets ``tiny`` / ``tiny-sdxl``: small random-initialised SD1.5- / SDXL-shaped backbones for tests.

Latents are always returned in the space the UNet sees (ComfyUI: VAE encode, then the latent format's
``process_in``, i.e. times 0.18215 for SD1.5 and 0.13025 for SDXL). Anything else (SDXL refiner, SD2.x,
SD3, Flux) is refused with a message naming what was found.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hypernet.files import read_safetensors

CONFIG_DIR = Path(__file__).parent / "configs" / "sd15"
SDXL_CONFIG_DIR = Path(__file__).parent / "configs" / "sdxl"
SD15_SCALING = 0.18215
SDXL_SCALING = 0.13025
UNET_PREFIX = "model.diffusion_model."
SUPPORTED = "supported are SD1.5-family and SDXL-family (base) checkpoints"
# where the two SDXL text encoders sit in a single-file checkpoint (CLIP-L in transformers layout, bigG in OpenCLIP's)
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."


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
class TextConditioning:
    """What the UNet reads from a prompt: per-token ``context`` ``(B, 77, D)``; SDXL adds ``pooled`` ``(B, P)``,
    its second text encoder's projected embedding."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None

    @staticmethod
    def cat(parts: list["TextConditioning"]) -> "TextConditioning":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return TextConditioning(torch.cat([p.context for p in parts]), pooled)


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
    text_encoder_2: nn.Module | None = None  # SDXL: OpenCLIP bigG (transformers CLIPTextModelWithProjection)
    tokenizer_2: object | None = None
    native_resolution: int = 512  # what the model was trained at; --resolution 0 means this

    @property
    def is_sdxl(self) -> bool:
        """SDXL's UNet reads pooled text and size/crop ids (diffusers' 'text_time' added embedding)."""
        return getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    @property
    def text_encoders(self) -> list[nn.Module]:
        """In kohya order (``lora_te`` / ``lora_te1``, ``lora_te2``); empty where a benchmark left them out."""
        return [encoder for encoder in (self.text_encoder, self.text_encoder_2) if encoder is not None]

    def targets(self, text_encoders: bool = True):
        """The LoRA target layers: (UNet targets, text-encoder targets or None), as the hypernetwork's layer list orders them."""
        from hypernet import locate_targets

        return locate_targets(self.unet), (locate_targets(None, self.text_encoders) if text_encoders and self.text_encoders else None)

    def noise_schedule(self):
        """The training noise schedule (DDPM alphas-cumprod) as the core's :class:`hypernet.NoiseSchedule`."""
        from hypernet import NoiseSchedule

        return NoiseSchedule(self.noise_scheduler.alphas_cumprod.float())

    def tokenize(self, prompts: list[str], device="cpu", tokenizer=None) -> torch.Tensor:
        """Token ids padded to the tokenizer's length (77), as the text encoders read them."""
        tokenizer = tokenizer or self.tokenizer
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids.to(device)

    def encoded_prompt_shape(self) -> tuple[int, int | None]:
        """(context width, pooled width or None) the UNet expects."""
        config = self.unet.config
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim if self.is_sdxl else None
        return config.cross_attention_dim, pooled

    def encode_prompts(self, prompts: list[str], device=None) -> TextConditioning:
        """SD1.5: the last hidden state. SDXL: both encoders' penultimate hidden states (no final norm),
        concatenated, and the second encoder's projected pooled embedding -- what SDXL and ComfyUI compute."""
        device = device if device is not None else next(self.text_encoder.parameters()).device
        if not self.is_sdxl:
            return TextConditioning(self.text_encoder(self.tokenize(prompts, device))[0])
        first = self.text_encoder(self.tokenize(prompts, device), output_hidden_states=True)
        second = self.text_encoder_2(self.tokenize(prompts, device, self.tokenizer_2), output_hidden_states=True)
        context = torch.cat([first.hidden_states[-2], second.hidden_states[-2].to(first.hidden_states[-2].dtype)], dim=-1)
        return TextConditioning(context, second.text_embeds)

    def time_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """SDXL's default size/crop conditioning ``(height, width, top, left, height, width)`` for the latents'
        pixel size, uncropped -- what ComfyUI sends when a prompt sets none."""
        height, width = (side * self.vae_scale_factor for side in latents.shape[-2:])
        return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=latents.device).expand(latents.shape[0], -1)

    def predict_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: TextConditioning,
                      time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's epsilon prediction; ``time_ids`` ``(B, 6)`` only matter for SDXL (default: :meth:`time_ids`)."""
        if not self.is_sdxl:
            return self.unet(latents, timesteps, conditioning.context).sample
        time_ids = (time_ids if time_ids is not None else self.time_ids(latents)).to(latents.device)
        added = {"text_embeds": conditioning.pooled, "time_ids": time_ids}
        return self.unet(latents, timesteps, conditioning.context, added_cond_kwargs=added).sample

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
        parameter = next(self.vae.parameters())  # the VAE may sit on the CPU (cached latents) while the UNet is elsewhere
        raw = (latents / self.vae_scaling_factor).to(parameter.device, parameter.dtype)
        if isinstance(self.vae, TaesdVae):
            return self.vae.decode_raw(raw)
        return self.vae.decode(raw).sample


def ones_for_norms(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and module.weight is not None:
            nn.init.ones_(module.weight)
    return model


def _tokenizer(pad_token: str | None = None):
    """The CLIP BPE tokenizer; SDXL's second tokenizer is the same vocabulary padding with "!" (id 0)."""
    from transformers import CLIPTokenizer

    extra = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(CONFIG_DIR / "tokenizer", local_files_only=True, **extra)


def _scheduler(config_dir: Path = CONFIG_DIR):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(config_dir, subfolder="scheduler", local_files_only=True)


def _sdxl_text_config(name: str, **overrides):
    from transformers import CLIPTextConfig

    config = CLIPTextConfig.from_pretrained(SDXL_CONFIG_DIR / name, local_files_only=True)
    config.update(overrides)
    return config


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
        ones_for_norms(model)
    return Backbone(unet, text_encoder, _tokenizer(), vae, _scheduler(), "sd15-tiny", SD15_SCALING, "tiny", native_resolution=64)


def sdxl_random_backbone(seed: int = 0, text_encoders: bool = True) -> Backbone:
    """Full-size SDXL base architecture from the shipped configs, random weights (benchmarks; nothing downloaded).

    In float32 that is 14 GB; ``text_encoders=False`` leaves out CLIP-L and bigG (3.3 GB) for benchmarks that feed
    the UNet an already encoded prompt."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_CONFIG_DIR / "unet"))
    text_encoder = CLIPTextModel(_sdxl_text_config("text_encoder")) if text_encoders else None
    text_encoder_2 = CLIPTextModelWithProjection(_sdxl_text_config("text_encoder_2")) if text_encoders else None
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SDXL_CONFIG_DIR / "vae"))
    return Backbone(unet, text_encoder, _tokenizer(), vae, _scheduler(SDXL_CONFIG_DIR), "sdxl", SDXL_SCALING, "sdxl-random",
                    text_encoder_2=text_encoder_2, tokenizer_2=_tokenizer("!"), native_resolution=1024)


def sdxl_meta_modules() -> tuple[nn.Module, nn.Module, nn.Module]:
    """SDXL base's UNet and two text encoders on the meta device (shapes, no memory): for target lists and
    memory arithmetic at full size without 14 GB of weights."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_CONFIG_DIR / "unet"))
        return unet, CLIPTextModel(_sdxl_text_config("text_encoder")), CLIPTextModelWithProjection(_sdxl_text_config("text_encoder_2"))


def sdxl_target_layers():
    """The 736 target layers of SDXL base (560 UNet, 48 CLIP-L, 128 bigG), with their shapes."""
    from hypernet import locate_targets

    unet, text_encoder, text_encoder_2 = sdxl_meta_modules()
    return locate_targets(unet, [text_encoder, text_encoder_2]).layers


def tiny_sdxl_backbone(seed: int = 0) -> Backbone:
    """Small, random, SDXL-shaped: two text encoders (widths 16 + 32 -> 48-wide context, pooled from the second),
    size/crop time ids, 3 levels with 2 res blocks each (SDXL's layout, so kohya's SDXL names apply), 64 px."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    common = dict(intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, vocab_size=49408,
                  bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=16, projection_dim=16, hidden_act="quick_gelu", **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=32, hidden_act="gelu", **common))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=48, attention_head_dim=8, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, sample_size=64)
    for model in (unet, text_encoder, text_encoder_2, vae):
        ones_for_norms(model)
    return Backbone(unet, text_encoder, _tokenizer(), vae, _scheduler(SDXL_CONFIG_DIR), "sdxl-tiny", SDXL_SCALING, "tiny-sdxl",
                    text_encoder_2=text_encoder_2, tokenizer_2=_tokenizer("!"), native_resolution=64)


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
                    vae_scale_factor=_vae_downscale(vae), native_resolution=64)


# ----------------------------------------------------------------------------- diffusers folders

_FOREIGN_PIPELINES = {"StableDiffusion3Pipeline": "SD3 (MMDiT)", "FluxPipeline": "Flux", "StableDiffusionXLImg2ImgPipeline": "an SDXL refiner"}


def _from_diffusers_folder(path: Path) -> Backbone:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    pipeline = _pipeline_class(path)
    if (path / "transformer").is_dir() or pipeline in ("StableDiffusion3Pipeline", "FluxPipeline"):
        raise BackboneError(f"{path} is a {_FOREIGN_PIPELINES.get(pipeline, pipeline or 'transformer-based')} model folder "
                            f"(a transformer, no UNet); {SUPPORTED}")
    if (path / "text_encoder_2").is_dir() and not (path / "text_encoder").is_dir():
        raise BackboneError(f"{path} is an SDXL refiner folder (one OpenCLIP bigG text encoder, aesthetic-score conditioning); "
                            f"refiners are not supported: {SUPPORTED}")
    sdxl = (path / "text_encoder_2").is_dir() or pipeline.startswith("StableDiffusionXL")
    parts = ("unet", "text_encoder", "tokenizer", "vae", "scheduler") + (("text_encoder_2", "tokenizer_2") if sdxl else ())
    for part in parts:
        if not (path / part).is_dir():
            raise BackboneError(f"{path} is not a complete {'SDXL ' if sdxl else ''}diffusers model folder: '{part}/' is missing")
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", local_files_only=True) if sdxl else None
        tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True) if sdxl else None
    except (OSError, ValueError) as error:
        raise BackboneError(f"could not load the diffusers folder {path}: {error}") from error
    widths = [encoder.config.hidden_size for encoder in (text_encoder, text_encoder_2) if encoder is not None]
    _check_supported(unet.config.cross_attention_dim, getattr(unet.config, "addition_embed_type", None),
                     getattr(scheduler.config, "prediction_type", "epsilon"), str(path), widths)
    downscale = _vae_downscale(vae)
    return Backbone(unet, text_encoder, tokenizer, vae, scheduler, "sdxl" if sdxl else "sd15", vae.config.scaling_factor, str(path),
                    vae_scale_factor=downscale, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                    native_resolution=unet.config.sample_size * downscale)


def _pipeline_class(path: Path) -> str:
    index = path / "model_index.json"
    try:
        return str(json.loads(index.read_text()).get("_class_name", "")) if index.is_file() else ""
    except (OSError, ValueError):
        return ""


def _check_supported(context_dim, addition_embed_type, prediction_type, where: str, text_widths: list[int]) -> None:
    if prediction_type != "epsilon":
        raise BackboneError(f"{where}: {prediction_type} prediction is not supported; use an epsilon-prediction SD1.5 or SDXL model")
    if len(text_widths) == 2:
        if addition_embed_type != "text_time":
            raise BackboneError(f"{where}: two text encoders but the UNet lacks SDXL's size/crop (text_time) conditioning; {SUPPORTED}")
        if context_dim != sum(text_widths):
            raise BackboneError(f"{where}: the UNet reads a {context_dim}-wide context, the two text encoders give {'+'.join(map(str, text_widths))}")
        return
    if context_dim == 1280:
        raise BackboneError(f"{where}: this is an SDXL refiner (1280-wide context); refiners are not supported: {SUPPORTED}")
    if addition_embed_type == "text_time" or context_dim == 2048:
        raise BackboneError(f"{where}: an SDXL UNet with one text encoder; SDXL needs both (CLIP-L and OpenCLIP bigG)")
    if context_dim == 1024:
        raise BackboneError(f"{where}: this is an SD2.x model (OpenCLIP-H text encoder, 1024-wide context); {SUPPORTED}")
    if text_widths and context_dim != text_widths[0]:
        raise BackboneError(f"{where}: the UNet reads a {context_dim}-wide context, the text encoder gives {text_widths[0]}")


# ----------------------------------------------------------------------------- single-file checkpoints


def _count(keys, prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def checkpoint_family(keys, name: str) -> str:
    """'sd15' or 'sdxl' from a single-file checkpoint's tensor names; anything else raises, naming what it is."""
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if any(".joint_blocks." in k or k.startswith("joint_blocks.") for k in keys):
        raise BackboneError(f"{name} is an SD3 (MMDiT) checkpoint; {SUPPORTED}")
    if any(".double_blocks." in k or k.startswith("double_blocks.") for k in keys):
        raise BackboneError(f"{name} is a Flux checkpoint; {SUPPORTED}")
    if not has(UNET_PREFIX):
        kind = "a LoRA" if any(".lora_" in k for k in keys) else "a CLIP vision model" if has("vision_model.") else "not a Stable Diffusion checkpoint"
        raise BackboneError(f"{name} is {kind}: expected a single-file SD1.5 or SDXL checkpoint (model.diffusion_model.*)")
    if has("conditioner.embedders.") or UNET_PREFIX + "label_emb.0.0.weight" in keys:
        clip_l, clip_g = has(SDXL_CLIP_L_PREFIX), has(SDXL_CLIP_G_PREFIX)
        if has("conditioner.embedders.0.model.") and not has("conditioner.embedders.1."):
            raise BackboneError(f"{name} is an SDXL refiner checkpoint (one OpenCLIP bigG text encoder, aesthetic-score conditioning); "
                                f"refiners are not supported: {SUPPORTED}")
        if clip_l and clip_g:
            return "sdxl"
        found = "CLIP-L only" if clip_l else "OpenCLIP bigG only" if clip_g else "no text encoder"
        raise BackboneError(f"{name} is an SDXL checkpoint with {found}; both text encoders are needed (CLIP-L at "
                            f"{SDXL_CLIP_L_PREFIX}*, OpenCLIP bigG at {SDXL_CLIP_G_PREFIX}*)")
    if has("cond_stage_model.model."):
        raise BackboneError(f"{name} is an SD2.x checkpoint (OpenCLIP text encoder); {SUPPORTED}")
    if not has("cond_stage_model.transformer."):
        raise BackboneError(f"{name} has no CLIP text encoder (cond_stage_model.transformer.*); a checkpoint with its text encoder is needed")
    return "sd15"


def _infer_unet_params(state: dict[str, torch.Tensor]) -> dict:
    """An LDM ``unet_config`` from the tensors: channels, levels, res blocks, attention depth per level, context width."""
    keys = [k[len(UNET_PREFIX):] for k in state if k.startswith(UNET_PREFIX)]
    shape = lambda name: state[UNET_PREFIX + name].shape  # noqa: E731
    model_channels, in_channels = shape("input_blocks.0.0.weight")[:2]
    channel_mult, attention_resolutions, depth_per_level, res_per_level = [], [], [], []
    count, ds, depth = 0, 1, 0
    for index in range(1, _count(keys, "input_blocks.")):
        block = f"input_blocks.{index}."
        if any(k.startswith(block + "0.op.") for k in keys):  # downsampler closes a level
            res_per_level.append(count)
            depth_per_level.append(depth)
            if depth:
                attention_resolutions.append(ds)
            count, ds, depth = 0, ds * 2, 0
            continue
        if count == 0:
            channel_mult.append(shape(block + "0.out_layers.3.weight")[0] // model_channels)
        count += 1
        if any(k.startswith(block + "1.proj_in.") for k in keys):
            depth = max(depth, _count(keys, block + "1.transformer_blocks."))
    res_per_level.append(count)
    depth_per_level.append(depth)
    if depth:
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
        "transformer_depth": [d or 1 for d in depth_per_level], "context_dim": shape(attention_block)[1],
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


def _heads(width: int, default: int) -> int:
    """CLIP's text encoders use 64-wide heads; shrunken test files keep the shipped count where it divides."""
    if width % 64 == 0:
        return width // 64
    return default if width % default == 0 else 1


def _clip_text_config(config_dir: Path, subfolder: str, text_state: dict[str, torch.Tensor]):
    """The shipped text-encoder config, resized to the tensors (shrunken test files have other widths)."""
    from transformers import CLIPTextConfig

    get = lambda name: text_state.get("text_model." + name, text_state.get(name))  # noqa: E731
    embedding = get("embeddings.token_embedding.weight")
    if embedding is None:
        raise BackboneError("the text encoder is not a CLIP text model (no token embedding)")
    hidden = embedding.shape[1]
    config = CLIPTextConfig.from_pretrained(config_dir / subfolder, local_files_only=True)
    config.update({"hidden_size": hidden, "num_attention_heads": _heads(hidden, config.num_attention_heads),
                   "num_hidden_layers": _count([k.removeprefix("text_model.") for k in text_state], "encoder.layers."),
                   "intermediate_size": get("encoder.layers.0.mlp.fc1.weight").shape[0], "vocab_size": embedding.shape[0]})
    return config


def _load_text_encoder(model: nn.Module, text_state: dict[str, torch.Tensor], what: str) -> nn.Module:
    # transformers >= 5 dropped the 'text_model.' level of CLIPTextModel (not of CLIPTextModelWithProjection)
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        text_state = {k.removeprefix("text_model."): v for k, v in text_state.items()}
    _load_exact(model, {k: v for k, v in text_state.items() if not k.endswith("position_ids")}, what)
    return model


def _taesd(state: dict[str, torch.Tensor], name: str) -> TaesdVae:
    from diffusers import AutoencoderTiny

    with _empty_weights():
        tiny = AutoencoderTiny()
    converted = {}
    for key, value in state.items():
        if key.startswith("first_stage_model.taesd_encoder."):
            converted["encoder.layers." + key[len("first_stage_model.taesd_encoder."):]] = value
        elif key.startswith("first_stage_model.taesd_decoder."):
            index, rest = key[len("first_stage_model.taesd_decoder."):].split(".", 1)
            converted[f"decoder.layers.{int(index) - 1}.{rest}"] = value  # ComfyUI's layer 0 is the tanh clamp
    _load_exact(tiny, converted, f"{name} TAESD")
    scale = float(state.get("first_stage_model.vae_scale", torch.tensor(1.0)))
    shift = float(state.get("first_stage_model.vae_shift", torch.tensor(0.0)))
    return TaesdVae(tiny, scale, shift)


def _from_single_file(path: Path, dtype: torch.dtype) -> Backbone:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_open_clip_checkpoint,
        create_unet_diffusers_config_from_ldm, create_vae_diffusers_config_from_ldm,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    state, _ = read_safetensors(path, "checkpoint")
    family = checkpoint_family(state, path.name)
    sdxl = family == "sdxl"
    config_dir = SDXL_CONFIG_DIR if sdxl else CONFIG_DIR
    scaling = SDXL_SCALING if sdxl else SD15_SCALING

    # text encoders first: SDXL's UNet config needs the pooled width
    text_l = convert_ldm_clip_checkpoint(state)
    with _empty_weights():
        text_encoder = CLIPTextModel(_clip_text_config(config_dir, "text_encoder", text_l))
    _load_text_encoder(text_encoder, text_l, f"{path.name} text encoder")
    text_encoder_2 = None
    if sdxl:
        from transformers import CLIPTextConfig

        get = lambda name: state[SDXL_CLIP_G_PREFIX + name]  # noqa: E731  (OpenCLIP layout)
        vocab, width = get("token_embedding.weight").shape
        config = CLIPTextConfig.from_pretrained(SDXL_CONFIG_DIR / "text_encoder_2", local_files_only=True)
        config.update({"hidden_size": width, "num_hidden_layers": _count(state, SDXL_CLIP_G_PREFIX + "transformer.resblocks."),
                       "projection_dim": get("text_projection").shape[1], "intermediate_size": get("transformer.resblocks.0.mlp.c_fc.weight").shape[0],
                       "vocab_size": vocab, "num_attention_heads": _heads(width, config.num_attention_heads)})
        with _empty_weights():
            text_encoder_2 = CLIPTextModelWithProjection(config)
        text_g = convert_open_clip_checkpoint(text_encoder_2, state, prefix=SDXL_CLIP_G_PREFIX)
        _load_exact(text_encoder_2, {k: v for k, v in text_g.items() if not k.endswith("position_ids")}, f"{path.name} second text encoder (OpenCLIP bigG)")

    unet_params = _infer_unet_params(state)
    if sdxl:
        adm = state[UNET_PREFIX + "label_emb.0.0.weight"].shape[1]
        unet_params.pop("num_heads")
        unet_params.update({"num_classes": "sequential", "adm_in_channels": adm, "num_head_channels": min(64, unet_params["model_channels"])})
    widths = [text_encoder.config.hidden_size] + ([text_encoder_2.config.hidden_size] if sdxl else [])
    _check_supported(unet_params["context_dim"], "text_time" if sdxl else None, "epsilon", path.name, widths)
    taesd = any(k.startswith("first_stage_model.taesd_encoder.") for k in state)
    vae_params = {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "z_channels": 4, "in_channels": 3, "out_ch": 3} if taesd else _infer_vae_params(state)
    original = {"model": {"params": {"unet_config": {"params": unet_params}, "first_stage_config": {"params": {"ddconfig": vae_params}}, "scale_factor": scaling}}}
    unet_config = create_unet_diffusers_config_from_ldm(original, state)
    unet_config["sample_size"] = 128 if sdxl else 64
    if sdxl:  # diffusers assumes SDXL's 256; shrunken files embed their sizes in fewer dimensions
        unet_config["addition_time_embed_dim"] = (adm - text_encoder_2.config.projection_dim) // 6
    with _empty_weights():
        unet = UNet2DConditionModel(**unet_config)
    _load_exact(unet, convert_ldm_unet_checkpoint(state, unet_config), f"{path.name} UNet")

    if taesd:
        vae: nn.Module = _taesd(state, path.name)
    else:
        vae_config = create_vae_diffusers_config_from_ldm(original, state)
        with _empty_weights():
            vae = AutoencoderKL(**vae_config)
        _load_exact(vae, convert_ldm_vae_checkpoint(state, vae_config), f"{path.name} VAE")
    return Backbone(unet, text_encoder, _tokenizer(), vae, _scheduler(config_dir), family, scaling, str(path),
                    text_encoder_2=text_encoder_2, tokenizer_2=_tokenizer("!") if sdxl else None, native_resolution=1024 if sdxl else 512)


def _empty_weights():
    """Build a model without initialising its parameters (on the meta device): the checkpoint fills them all, and
    random-initialising a billion SDXL parameters first would take longer than reading them."""
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def _load_exact(model: nn.Module, state: dict, what: str) -> None:
    model_keys = set(model.state_dict())
    missing = sorted(k for k in model_keys - set(state) if not k.endswith("position_ids"))
    if missing:
        raise BackboneError(f"{what}: checkpoint lacks {len(missing)} tensors (e.g. {missing[0]}); the file is incomplete or of another architecture")
    model.load_state_dict({k: v.float() for k, v in state.items() if k in model_keys}, strict=False, assign=True)
    left_empty = [name for name, p in model.named_parameters() if p.is_meta]
    if left_empty:
        raise BackboneError(f"{what}: {len(left_empty)} parameters were not in the checkpoint (e.g. {left_empty[0]})")


# ----------------------------------------------------------------------------- entry points

PRESETS = {"tiny": tiny_backbone, "tiny-sdxl": tiny_sdxl_backbone}
PRESET_RESOLUTION = 64  # the tiny and toy presets


def native_resolution(spec: str) -> int:
    """The resolution a backbone was trained at, read without loading weights: 64 for the presets, the UNet's
    sample size times the VAE's downscale for a diffusers folder, 1024 for an SDXL single file, 512 for SD1.5."""
    if spec in PRESETS or spec == "toy":
        return PRESET_RESOLUTION
    path = Path(spec)
    if path.is_dir():
        try:
            unet = json.loads((path / "unet" / "config.json").read_text())
            vae = json.loads((path / "vae" / "config.json").read_text())
            return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
        except (OSError, ValueError, KeyError):
            return 512  # not a readable folder: loading it will say why
    tensors, _ = read_safetensors(path, "checkpoint", load_tensors=False)
    return 1024 if checkpoint_family(tensors, path.name) == "sdxl" else 512


def load_backbone(spec: str, *, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> Backbone:
    """The frozen backbone named by ``spec`` (preset 'tiny', 'tiny-sdxl' or 'toy', a diffusers folder or a .safetensors file)."""
    if spec in PRESETS:
        backbone = PRESETS[spec](seed)
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
            raise BackboneError(f"backbone {spec!r}: not a preset ({', '.join([*PRESETS, 'toy'])}), a folder or a file")
    for model in (backbone.unet, *backbone.text_encoders, backbone.vae):
        model.to(device).eval().requires_grad_(False)
    if dtype != torch.float32:  # the VAE stays float32: it overflows in fp16 and runs once per batch
        backbone.unet.to(dtype)
        for encoder in backbone.text_encoders:
            encoder.to(dtype)
    return backbone
