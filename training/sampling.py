"""Pipeline-free sampling for sample grids and the study: base, LoRA-adapted, HM-CFG or dual-path, with DDIM."""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import torch
from PIL import Image

from hypernet import attach_lora
from hypernet.dual_path import attach_dual_path
from hypernet.guidance import hm_cfg
from hypernet.lora import LoraWeights
from hypernet.words import nearest_real_word

from .backbone import TextConditioning
from .objective import TokenEmbeddingOverride


def _encode(backbone, prompts, device, text_modules=None, lora=None, token_embedding=None, placeholder: str = "sks") -> TextConditioning:
    """Prompt conditioning; with ``lora`` the text encoder is adapted, with ``token_embedding`` ``(B, dim)`` the
    placeholder word's input embedding is replaced by the predicted one (the tuning-encoder option)."""
    with ExitStack() as stack:
        if lora is not None and text_modules:
            stack.enter_context(attach_lora(text_modules, lora.restricted_to(text_modules)))
        if token_embedding is not None:
            placeholder_id = backbone.tokenizer(placeholder, add_special_tokens=False).input_ids[0]
            override = TokenEmbeddingOverride(backbone.text_encoder.get_input_embeddings(), placeholder_id)
            stack.callback(override.attach(token_embedding.to(device)).remove)
        return backbone.encode_prompts(prompts, device)


@torch.no_grad()
def sample(
    backbone,
    prompts: list[str],
    *,
    lora: LoraWeights | None = None,
    unet_modules: dict | None = None,
    text_modules: dict | None = None,
    mode: str = "lora",
    cfg_text: float = 5.0,
    cfg_subject: float = 1.5,
    steps: int = 20,
    resolution: int = 64,
    seed: int = 0,
    negative: str = "",
    token_embedding: torch.Tensor | None = None,
    placeholder: str = "sks",
    dual_alpha: float = 0.5,
) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in [0, 1]. ``lora`` is per-sample (batched) or shared; ``mode`` is
    'base' (no LoRA), 'lora' (CFG on the adapted model, text encoder adapted too), 'hmcfg' or 'dual' (CFG on the
    adapted model with every attention output blended ``dual_alpha * adapted + (1 - dual_alpha) * vanilla``, the
    vanilla path reading the prompt with the placeholder as the predicted embedding's nearest real word).
    ``token_embedding`` (per-sample ``(B, dim)`` or shared ``(dim,)``): the predicted word embedding that the
    placeholder means in the adapted model's prompts."""
    from diffusers import DDIMScheduler

    device = next(backbone.unet.parameters()).device
    dtype = next(backbone.unet.parameters()).dtype
    scheduler = DDIMScheduler.from_config(backbone.noise_scheduler.config)
    scheduler.set_timesteps(steps)
    size = len(prompts)
    if lora is not None and lora.batch_size is None:
        lora = lora.repeated(size)
    adapted = lora is not None and mode != "base"
    base_cond = _encode(backbone, prompts, device)
    base_uncond = _encode(backbone, [negative] * size, device)
    if adapted:
        if token_embedding is not None and token_embedding.dim() == 1:
            token_embedding = token_embedding.expand(size, -1)
        subject_cond = _encode(backbone, prompts, device, text_modules, lora, token_embedding, placeholder)
        subject_uncond = _encode(backbone, [negative] * size, device, text_modules, lora)
    if adapted and mode == "dual":
        hard_cond = _encode(backbone, prompts, device, token_embedding=_nearest_words(backbone, token_embedding, placeholder), placeholder=placeholder) \
            if token_embedding is not None else base_cond
    factor = backbone.vae_scale_factor if hasattr(backbone, "vae_scale_factor") else 8
    channels = backbone.unet.config.in_channels
    generator = torch.Generator().manual_seed(seed)
    latents = (torch.randn(size, channels, resolution // factor, resolution // factor, generator=generator) * scheduler.init_noise_sigma).to(device, dtype)
    unet_lora = lora.restricted_to(unet_modules) if adapted else None
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        if not adapted:
            eps_u, eps_c = backbone.predict_noise(torch.cat([x, x]), t, TextConditioning.cat([base_uncond, base_cond])).chunk(2)
            eps = eps_u + cfg_text * (eps_c - eps_u)
        elif mode == "lora":
            with attach_lora(unet_modules, unet_lora.repeated(2)):
                eps_u, eps_c = backbone.predict_noise(torch.cat([x, x]), t, TextConditioning.cat([subject_uncond, subject_cond])).chunk(2)
            eps = eps_u + cfg_text * (eps_c - eps_u)
        elif mode == "hmcfg":
            gate = torch.cat([torch.zeros(2 * size), torch.ones(size)]).to(device)
            with attach_lora(unet_modules, unet_lora.repeated(3), strength=gate):
                eps_u, eps_c, eps_s = backbone.predict_noise(torch.cat([x, x, x]), t, TextConditioning.cat([base_uncond, base_cond, subject_cond])).chunk(3)
            eps = hm_cfg(eps_u, eps_c, eps_s, cfg_text, cfg_subject)
        elif mode == "dual":
            gate = torch.ones(2 * size, device=device)  # the vanilla path switches the subject LoRA off through it
            hard_context = torch.cat([base_uncond.context, hard_cond.context])

            def vanilla(module, args, kwargs):
                gate.zero_()
                try:
                    if kwargs.get("encoder_hidden_states") is not None:  # cross-attention reads the hard prompt
                        kwargs = {**kwargs, "encoder_hidden_states": hard_context}
                    return module(*args, **kwargs)
                finally:
                    gate.fill_(1.0)

            with attach_lora(unet_modules, unet_lora.repeated(2), strength=gate), attach_dual_path(attention_modules(backbone.unet), dual_alpha, vanilla):
                eps_u, eps_c = backbone.predict_noise(torch.cat([x, x]), t, TextConditioning.cat([subject_uncond, subject_cond])).chunk(2)
            eps = eps_u + cfg_text * (eps_c - eps_u)
        else:
            raise ValueError(f"unknown sampling mode {mode!r}")
        latents = scheduler.step(eps, t, latents).prev_sample
    return backbone.decode_latents(latents).float().clamp(-1, 1).add(1).div(2).cpu()


def attention_modules(unet) -> dict:
    """The UNet's attention branches (self- and cross-attention), by module name: what dual-path blending doubles."""
    from diffusers.models.attention_processor import Attention

    return {name: module for name, module in unet.named_modules() if isinstance(module, Attention)}


def _nearest_words(backbone, token_embedding: torch.Tensor, placeholder: str) -> torch.Tensor:
    """Per sample, the input embedding of the real word nearest to the predicted one (the hard prompt's word)."""
    table = backbone.text_encoder.get_input_embeddings().weight.detach()
    placeholder_id = backbone.tokenizer(placeholder, add_special_tokens=False).input_ids[0]
    excluded = set(backbone.tokenizer.all_special_ids) | {placeholder_id}
    return torch.stack([table[nearest_real_word(vector, table, excluded)] for vector in token_embedding])


def to_pil(image: torch.Tensor) -> Image.Image:
    """``(3, H, W)`` in [0, 1] or ``(H, W, 3)`` -> PIL."""
    if image.shape[0] == 3:
        image = image.permute(1, 2, 0)
    return Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8))


def image_grid(rows: list[list[Image.Image]], cell: int) -> Image.Image:
    grid = Image.new("RGB", (cell * max(len(r) for r in rows), cell * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((cell, cell)), (x * cell, y * cell))
    return grid
