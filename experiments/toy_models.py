"""Pretraining the toy world's base text-to-image model (SD1.5 family, tiny) and its image encoder, on a CPU.

- VAE: diffusers ``AutoencoderKL`` (64 px -> 16x16x4 latents), trained to reconstruct renders.
- toy CLIP: transformers ``CLIPModel`` trained contrastively on (render, full description) pairs -- its
  vision tower is the hypernetwork's frozen image encoder and its text tower the base model's text encoder,
  as CLIP is for Stable Diffusion.
- base UNet: ``UNet2DConditionModel`` trained with the denoising loss on CLASS-LEVEL captions only
  ("a photo of a toy on a sand background, on the left, small"): it knows backgrounds, positions and scales,
  not individual subjects.
Everything is saved as a diffusers folder (+ a transformers CLIP-vision folder) that ``training.train`` loads.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.backbone import CONFIG_DIR, _ones_for_norms
from training.image_encoder import clip_normalise
from training.synthetic import COLOURS, SyntheticWorld

TOKENIZER_DIR = CONFIG_DIR / "tokenizer"


def describe(subject, context) -> str:
    """The full description CLIP-style pretraining uses (identity + context)."""
    marking = "no marking" if subject.marking == "none" else f"a {subject.marking} marking"
    return (f"a {subject.primary} and {subject.secondary} {subject.pattern} {subject.shape} with {marking} "
            f"on a {context.background} background, {context.position}, {context.scale}")


@dataclass
class Sizes:
    """Model sizes and step counts; ``quick`` shrinks everything for a pipeline check."""

    resolution: int = 64
    vae_steps: int = 1000
    clip_steps: int = 1200
    unet_steps: int = 3000
    batch: int = 16
    clip_batch: int = 32  # contrastive learning needs in-batch negatives
    vae_channels: tuple = (16, 32, 32)
    unet_channels: tuple = (32, 64, 64)
    text_hidden: int = 64

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(vae_steps=20, clip_steps=20, unet_steps=30, batch=8, clip_batch=8, text_hidden=32)


class RenderStream:
    """Endless random renders of training-split subjects in random contexts (with labels)."""

    def __init__(self, world: SyntheticWorld, subjects, resolution: int, seed: int):
        self.world, self.subjects, self.resolution = world, subjects, resolution
        self.rng = random.Random(seed)

    def batch(self, size: int):
        subjects = [self.rng.choice(self.subjects) for _ in range(size)]
        contexts = [self.world.sample_context(self.rng) for _ in range(size)]
        images = np.stack([np.asarray(self.world.render(s, c, self.resolution)) for s, c in zip(subjects, contexts)])
        pixels = torch.from_numpy(images).float().div(127.5).sub(1).permute(0, 3, 1, 2)
        return pixels, subjects, contexts


def _log(message: str) -> None:
    print(f"[toy] {message}", flush=True)


def train_vae(stream: RenderStream, sizes: Sizes):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = _ones_for_norms(AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=sizes.vae_channels, layers_per_block=1,
                                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                                        norm_num_groups=16, sample_size=sizes.resolution))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    start = time.time()
    for step in range(sizes.vae_steps):
        pixels, _, _ = stream.batch(sizes.batch)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == sizes.vae_steps - 1:
            _log(f"vae step {step + 1}/{sizes.vae_steps} mse {loss.item():.4f} ({time.time() - start:.0f}s)")
    with torch.no_grad():
        latents = torch.cat([vae.encode(stream.batch(sizes.batch)[0]).latent_dist.mode() for _ in range(4)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae.eval().requires_grad_(False)


def train_clip(stream: RenderStream, sizes: Sizes):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)
    torch.manual_seed(1)
    config = CLIPConfig(
        text_config=dict(hidden_size=sizes.text_hidden, intermediate_size=sizes.text_hidden * 4, num_hidden_layers=3, num_attention_heads=4,
                         max_position_embeddings=77, vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, image_size=sizes.resolution, patch_size=8),
        projection_dim=64,
    )
    model = _ones_for_norms(CLIPModel(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    start = time.time()
    for step in range(sizes.clip_steps):
        pixels, subjects, contexts = stream.batch(sizes.clip_batch)
        ids = tokenizer([describe(s, c) for s, c in zip(subjects, contexts)], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        loss = model(input_ids=ids, pixel_values=clip_normalise((pixels + 1) / 2), return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == sizes.clip_steps - 1:
            _log(f"clip step {step + 1}/{sizes.clip_steps} contrastive loss {loss.item():.3f} ({time.time() - start:.0f}s)")
    return model.eval().requires_grad_(False), tokenizer


def train_base_unet(stream: RenderStream, vae, text_encoder, tokenizer, sizes: Sizes):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from hypernet import NoiseSchedule

    torch.manual_seed(2)
    c = sizes.unet_channels
    unet = _ones_for_norms(UNet2DConditionModel(
        sample_size=sizes.resolution // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=c,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=sizes.text_hidden, attention_head_dim=8, norm_num_groups=16,
    ))
    scheduler = DDPMScheduler.from_pretrained(CONFIG_DIR, subfolder="scheduler", local_files_only=True)
    schedule = NoiseSchedule(scheduler.alphas_cumprod.float())
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.01)
    lr = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=sizes.unet_steps, pct_start=0.05)
    world = stream.world
    cache: dict[str, torch.Tensor] = {}

    def encode(captions):
        missing = [t for t in captions if t not in cache]
        if missing:
            ids = tokenizer(missing, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            with torch.no_grad():
                for text, hidden in zip(missing, text_encoder(ids)[0]):
                    cache[text] = hidden
        return torch.stack([cache[t] for t in captions])

    start = time.time()
    for step in range(sizes.unet_steps):
        pixels, _, contexts = stream.batch(sizes.batch)
        captions = ["" if stream.rng.random() < 0.1 else world.caption(ctx) for ctx in contexts]  # class-level only
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (len(captions),))
        loss = F.mse_loss(unet(schedule.add_noise(latents, noise, t), t, encode(captions)).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr.step()
        if step % 100 == 0 or step == sizes.unet_steps - 1:
            _log(f"base unet step {step + 1}/{sizes.unet_steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
    return unet.eval().requires_grad_(False), scheduler


def pretrain_toy_world(out: Path, sizes: Sizes, seed: int = 0) -> dict:
    """Train VAE, toy CLIP and base UNet; save ``out/base`` (diffusers) and ``out/image_encoder`` (transformers)."""
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    world = SyntheticWorld(seed)
    stream = RenderStream(world, world.subjects(2000, "train"), sizes.resolution, seed)
    timings = {}
    start = time.time()
    vae = train_vae(stream, sizes)
    timings["vae_s"] = time.time() - start
    start = time.time()
    clip, tokenizer = train_clip(stream, sizes)
    timings["clip_s"] = time.time() - start
    text_encoder = CLIPTextModel(clip.config.text_config)
    missing, _ = text_encoder.load_state_dict(clip.text_model.state_dict(), strict=False)
    assert not [m for m in missing if not m.endswith("position_ids")], missing
    text_encoder.eval().requires_grad_(False)
    start = time.time()
    unet, scheduler = train_base_unet(stream, vae, text_encoder, tokenizer, sizes)
    timings["unet_s"] = time.time() - start
    base = out / "base"
    for name, part in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder), ("tokenizer", tokenizer), ("scheduler", scheduler)):
        part.save_pretrained(base / name)
    (base / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "_note": "toy world base model"}))
    vision_config = clip.config.vision_config
    vision_config.projection_dim = clip.config.projection_dim
    vision = CLIPVisionModelWithProjection(vision_config)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    vision.save_pretrained(out / "image_encoder")
    (out / "pretrain_timings.json").write_text(json.dumps(timings))
    _log(f"pretraining done in {sum(timings.values()):.0f}s: {timings}")
    return timings
