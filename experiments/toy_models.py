"""Pretraining the toy world's base text-to-image model (SD1.5 family, tiny) and its image encoder, on a CPU.

- render pool: renders of training-split subjects in random contexts, with their labels, made once;
- VAE: diffusers ``AutoencoderKL`` (64 px -> 16x16x4 latents), trained to reconstruct renders;
- toy CLIP: transformers ``CLIPModel`` trained contrastively on (render, full description) pairs -- its
  vision tower is the hypernetwork's frozen image encoder and its text tower the base model's text encoder,
  as CLIP is for Stable Diffusion;
- base UNet: ``UNet2DConditionModel`` trained with the denoising loss on captions that describe the subject's
  identity in words part of the time (all of it, or some attributes) and name only the class the rest of the
  time ("a photo of a toy on a sand background, on the left, small"), plus empty captions for CFG. Like SD, it
  can then draw what words describe; personalisation binds a rare token to one identity inside that ability.
Everything is saved as a diffusers folder (+ a transformers CLIP-vision folder) that ``training.train`` loads.
"""

from __future__ import annotations

import dataclasses

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.backbone import CONFIG_DIR, ones_for_norms
from training.image_encoder import clip_normalise
from training.synthetic import BACKGROUNDS, IDENTITY_ATTRIBUTES, MARKINGS, PATTERNS, POSITIONS, SCALES, SHAPES, COLOURS, Context, Subject, SyntheticWorld

TOKENIZER_DIR = CONFIG_DIR / "tokenizer"
ATTRIBUTE_VALUES = {"shape": list(SHAPES), "primary": list(COLOURS), "secondary": list(COLOURS), "pattern": list(PATTERNS),
                    "marking": list(MARKINGS), "background": list(BACKGROUNDS), "position": list(POSITIONS), "scale": list(SCALES)}


def describe(subject: Subject, context: Context) -> str:
    """The full description CLIP-style pretraining uses (identity + context)."""
    return SyntheticWorld.caption(context, description=subject.describe())


@dataclass
class Sizes:
    """Model sizes and step counts; ``quick`` shrinks everything for a pipeline check."""

    resolution: int = 64
    pool_images: int = 48000
    vae_steps: int = 2400  # MSE on the posterior mean, lr 1e-3
    vae_refine_steps: int = 1200  # then L1 + MSE on posterior samples at lr 5e-4: sharper edges, robust to latent noise
    vae_batch: int = 8  # small batches: 3x less time per unit of reconstruction loss than 32 here
    vae_norm_groups: int = 1  # a group per channel would normalise each image's colours away in every block
    vae_colour_anchor: float = 1.0  # latent channels 0-2 are pulled toward the 4x4-pooled RGB (see train_vae)
    clip_steps: int = 3000
    vision_steps: int = 0  # > 0: the image encoder's vision tower trained further against the frozen text tower (continue_vision_tower)
    vision_lr: float = 5e-4
    unet_steps: int = 12000
    unet_lr: float = 1e-3
    unet_min_snr_gamma: float = 0.0  # >0: min-SNR-gamma loss weights (Hang et al. 2023); 0: plain MSE on the noise
    unet_init: str = ""  # a diffusers UNet folder to continue training from (a longer pretraining in parts)
    reader_steps: int = 3000
    batch: int = 32
    clip_batch: int = 128  # contrastive learning needs in-batch negatives
    vae_channels: tuple = (16, 32, 32)
    unet_channels: tuple = (48, 96, 96)
    unet_heads: int = 4
    text_hidden: int = 64
    described_share: float = 0.5  # captions naming every identity attribute
    partial_share: float = 0.25  # captions naming a random subset of them (the rest: class level or empty)
    empty_share: float = 0.1

    @classmethod
    def scaled(cls, factor: float) -> "Sizes":
        """Every step count (and the render pool, down to 8,000 images) times ``factor``: a shorter pretraining."""
        full = cls()
        steps = {f: max(10, round(getattr(full, f) * factor)) for f in ("vae_steps", "vae_refine_steps", "clip_steps", "unet_steps", "reader_steps")}
        return dataclasses.replace(full, pool_images=max(8000, round(full.pool_images * factor)), **steps)

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(pool_images=256, vae_steps=20, vae_refine_steps=10, clip_steps=20, unet_steps=30, reader_steps=30, batch=8, clip_batch=16, text_hidden=32)


class RenderPool:
    """Renders of some subjects in random contexts, made once, with their labels; batches are drawn from it."""

    def __init__(self, pixels: torch.Tensor, subjects: list[Subject], contexts: list[Context]):
        self.pixels, self.subjects, self.contexts = pixels, subjects, contexts  # pixels: uint8 (N, 3, H, W)

    @classmethod
    def render(cls, world: SyntheticWorld, subjects: list[Subject], count: int, resolution: int, seed: int) -> "RenderPool":
        rng = random.Random(seed)
        chosen = [rng.choice(subjects) for _ in range(count)]
        contexts = [world.sample_context(rng) for _ in range(count)]
        pixels = np.stack([np.asarray(world.render(s, c, resolution)) for s, c in zip(chosen, contexts)])
        return cls(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), chosen, contexts)

    @classmethod
    def cached(cls, path: Path, world: SyntheticWorld, subjects: list[Subject], count: int, resolution: int, seed: int) -> "RenderPool":
        if path.exists():
            saved = torch.load(path)
            return cls(saved["pixels"], [Subject(*s) for s in saved["subjects"]], [Context(*c) for c in saved["contexts"]])
        pool = cls.render(world, subjects, count, resolution, seed)
        torch.save({"pixels": pool.pixels, "subjects": [tuple(s.labels().values()) for s in pool.subjects],
                    "contexts": [tuple(c.labels().values()) for c in pool.contexts]}, path)
        return pool

    def __len__(self) -> int:
        return len(self.subjects)

    def floats(self, index: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1]."""
        return self.pixels[index].float().div(127.5).sub(1)

    def labels(self, index) -> dict[str, torch.Tensor]:
        rows = [{**self.subjects[i].labels(), **self.contexts[i].labels()} for i in index.tolist()]
        return {name: torch.tensor([values.index(r[name]) for r in rows]) for name, values in ATTRIBUTE_VALUES.items()}


def warmup_cosine(optimizer, steps: int, warmup: float = 0.05):
    """Linear warm-up over ``warmup`` of the steps, then cosine decay to zero."""
    import math

    ramp = max(1, int(steps * warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / ramp if s < ramp else 0.5 * (1 + math.cos(math.pi * (s - ramp) / max(1, steps - ramp))))


def _log(message: str) -> None:
    print(f"[toy] {message}", flush=True)


def colour_anchor_loss(posterior_mean: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """MSE between latent channels 0-2 and the image's RGB average-pooled to the latent size."""
    return F.mse_loss(posterior_mean[:, :3], F.avg_pool2d(pixels, pixels.shape[-1] // posterior_mean.shape[-1]))


def denoising_loss_weights(alphas_cumprod: torch.Tensor, min_snr_gamma: float) -> torch.Tensor:
    """Per-timestep weights of the noise-prediction MSE: ``min(SNR, gamma) / SNR`` (min-SNR-gamma, Hang et al. 2023),
    or ones for ``gamma`` 0. Low-noise steps (SNR > gamma) then weigh less, so more of the gradient goes where the
    layout and shape are decided."""
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return snr.clamp(max=min_snr_gamma) / snr if min_snr_gamma else torch.ones_like(snr)


def new_vae(sizes: Sizes):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = ones_for_norms(AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=sizes.vae_channels, layers_per_block=1,
                                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                                         norm_num_groups=sizes.vae_norm_groups, sample_size=sizes.resolution))
    with torch.no_grad():  # posterior std e^-6 from the start: latent samples (diffusers' img2img draws them) stay near the mean
        vae.quant_conv.weight[vae.config.latent_channels :].zero_()
        vae.quant_conv.bias[vae.config.latent_channels :].fill_(-12.0)
    return vae


def train_vae(vae, pool: RenderPool, steps: int, batch: int, learning_rate: float, refine: bool, colour_anchor: float, generator: torch.Generator, name: str):
    """Reconstruction training, then the scaling factor that gives latents unit variance.

    First stage: MSE through the posterior mean; ``refine``: L1 + MSE through posterior samples. ``colour_anchor``
    weighs a pull of latent channels 0-2 toward the image's 4x4 average-pooled RGB: with it the latents carry
    colour directly (as SD's do, roughly), the decoder learns in a few hundred steps what it otherwise misses
    for thousands (reconstruction MSE 0.018 vs 0.06 after 600 steps), and the UNet's latents mean colours.
    """
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate)
    schedule = warmup_cosine(optimizer, steps)
    start = time.time()
    for step in range(steps):
        pixels = pool.floats(torch.randint(0, len(pool), (batch,), generator=generator))
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample() if refine else posterior.mode()).sample
        loss = F.mse_loss(reconstruction, pixels) + (F.l1_loss(reconstruction, pixels) if refine else 0) + 1e-6 * posterior.kl().mean()
        if colour_anchor:
            loss = loss + colour_anchor * colour_anchor_loss(posterior.mean, pixels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            _log(f"{name} step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pool.floats(torch.arange(i, min(i + 256, len(pool))))).latent_dist.mode() for i in range(0, min(len(pool), 2048), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


@torch.no_grad()
def encode_pool(vae, pool: RenderPool, batch: int = 256) -> torch.Tensor:
    """UNet-space latents of every render in the pool (the VAE posterior's mode, times the scaling factor)."""
    parts = [vae.encode(pool.floats(torch.arange(i, min(i + batch, len(pool))))).latent_dist.mode() for i in range(0, len(pool), batch)]
    return torch.cat(parts) * vae.config.scaling_factor


def caption_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to CLIP's 77 positions, as every toy-world text tower reads them."""
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def train_clip(pool: RenderPool, sizes: Sizes, generator: torch.Generator):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)
    torch.manual_seed(1)
    config = CLIPConfig(
        text_config=dict(hidden_size=sizes.text_hidden, intermediate_size=sizes.text_hidden * 4, num_hidden_layers=3, num_attention_heads=4,
                         max_position_embeddings=77, vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, image_size=sizes.resolution, patch_size=8),
        projection_dim=64,
    )
    model = ones_for_norms(CLIPModel(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    schedule = warmup_cosine(optimizer, sizes.clip_steps)
    start = time.time()
    for step in range(sizes.clip_steps):
        index = torch.randint(0, len(pool), (sizes.clip_batch,), generator=generator)
        captions = [describe(pool.subjects[i], pool.contexts[i]) for i in index.tolist()]
        ids = caption_ids(tokenizer, captions)
        loss = model(input_ids=ids, pixel_values=clip_normalise((pool.floats(index) + 1) / 2), return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == sizes.clip_steps - 1:
            _log(f"clip step {step + 1}/{sizes.clip_steps} contrastive loss {loss.item():.3f} ({time.time() - start:.0f}s)")
    return model.eval().requires_grad_(False), tokenizer


VISION_RECORD = "vision_continued.json"  # in an image encoder folder that continue_vision_tower trained further


def continue_vision_tower(folder: Path, pool: RenderPool, text_encoder, tokenizer, sizes: Sizes, generator: torch.Generator) -> dict:
    """Train the vision tower in ``folder`` (and its projection) further with the contrastive loss on (render, full
    description) pairs, against the *frozen* text tower, and save it back. The text tower is the base model's text
    encoder, so the UNet's conditioning is untouched; only its pooled output gets a fresh trainable projection (the
    toy CLIP's own was not shipped). The 600-step toy CLIP left shape and marking weak in the features the
    hypernetwork reads; this sharpens them without retraining the UNet."""
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(5)
    vision = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True).float().train().requires_grad_(True)
    text_projection = torch.nn.Linear(text_encoder.config.hidden_size, vision.config.projection_dim, bias=False)
    logit_scale = torch.nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))
    tower, heads = list(vision.parameters()), list(text_projection.parameters()) + [logit_scale]
    optimizer = torch.optim.AdamW([{"params": tower, "lr": sizes.vision_lr}, {"params": heads, "lr": 1e-3}], weight_decay=0.1)
    schedule = warmup_cosine(optimizer, sizes.vision_steps)
    start, losses = time.time(), []
    for step in range(sizes.vision_steps):
        index = torch.randint(0, len(pool), (sizes.clip_batch,), generator=generator)
        captions = [describe(pool.subjects[i], pool.contexts[i]) for i in index.tolist()]
        ids = caption_ids(tokenizer, captions)
        with torch.no_grad():
            pooled = text_encoder(ids)[1]
        texts = F.normalize(text_projection(pooled), dim=-1)
        images = F.normalize(vision(pixel_values=clip_normalise((pool.floats(index) + 1) / 2)).image_embeds, dim=-1)
        logits = logit_scale.exp().clamp(max=100) * images @ texts.T
        labels = torch.arange(len(index))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tower + heads, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 200 == 0 or step == sizes.vision_steps - 1:
            _log(f"vision step {step + 1}/{sizes.vision_steps} contrastive loss {loss.item():.3f} ({time.time() - start:.0f}s)")
    vision.eval().requires_grad_(False).save_pretrained(folder)
    record = {"steps": sizes.vision_steps, "lr": sizes.vision_lr, "batch": sizes.clip_batch, "pool_images": len(pool),
              "first_loss": round(losses[0], 4), "last_200_loss": round(float(np.mean(losses[-200:])), 4)}
    (folder / VISION_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return record


def pretraining_caption(subject: Subject, context: Context, rng: random.Random, sizes: Sizes) -> str:
    """Described (all identity attributes), partly described (a random subset), class level, or empty."""
    draw = rng.random()
    if draw < sizes.empty_share:
        return ""
    draw -= sizes.empty_share
    if draw < sizes.described_share:
        return SyntheticWorld.caption(context, description=subject.describe())
    draw -= sizes.described_share
    if draw < sizes.partial_share:
        named = [a for a in IDENTITY_ATTRIBUTES if rng.random() < 0.5]
        return SyntheticWorld.caption(context, description=subject.describe(named)) if named else SyntheticWorld.caption(context)
    return SyntheticWorld.caption(context)


def train_base_unet(pool: RenderPool, latents: torch.Tensor, text_encoder, tokenizer, sizes: Sizes, generator: torch.Generator, log_every: int = 200,
                    snapshot=None, snapshot_every: int = 0):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from hypernet import NoiseSchedule

    torch.manual_seed(2)
    c = sizes.unet_channels
    if sizes.unet_init:
        unet = UNet2DConditionModel.from_pretrained(sizes.unet_init, local_files_only=True).train().requires_grad_(True)
    else:
        # Attention at the 8x8 and 4x4 latent levels only: self-attention over 256 tokens at 16x16 would cost
        # more than the rest of the UNet on a CPU, and the 16x16 level's convolutions place the details.
        unet = ones_for_norms(UNet2DConditionModel(
            sample_size=sizes.resolution // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=c,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=sizes.text_hidden, attention_head_dim=sizes.unet_heads, norm_num_groups=16,
        ))
    scheduler = DDPMScheduler.from_pretrained(CONFIG_DIR, subfolder="scheduler", local_files_only=True)
    schedule = NoiseSchedule(scheduler.alphas_cumprod.float())
    optimizer = torch.optim.AdamW(unet.parameters(), lr=sizes.unet_lr, weight_decay=0.01)
    loss_weights = denoising_loss_weights(schedule.alphas_cumprod, sizes.unet_min_snr_gamma)
    lr = warmup_cosine(optimizer, sizes.unet_steps, 0.03)
    rng = random.Random(3 if sizes.unet_init else 2)  # a continuation draws other captions than the part before it
    start = time.time()
    for step in range(sizes.unet_steps):
        index = torch.randint(0, len(pool), (sizes.batch,), generator=generator)
        captions = [pretraining_caption(pool.subjects[i], pool.contexts[i], rng, sizes) for i in index.tolist()]
        ids = caption_ids(tokenizer, captions)
        with torch.no_grad():
            context = text_encoder(ids)[0]
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (len(captions),), generator=generator)
        errors = F.mse_loss(unet(schedule.add_noise(x0, noise, t), t, context).sample, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (loss_weights[t] * errors).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr.step()
        if step % log_every == 0 or step == sizes.unet_steps - 1:
            _log(f"base unet step {step + 1}/{sizes.unet_steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
        if snapshot is not None and snapshot_every and (step + 1) % snapshot_every == 0:
            snapshot(unet, scheduler, step + 1)
    return unet.eval().requires_grad_(False), scheduler


def save_base_model(folder: Path, unet, vae, text_encoder, tokenizer, scheduler) -> None:
    for name, part in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder), ("tokenizer", tokenizer), ("scheduler", scheduler)):
        part.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "_note": "toy world base model"}))


def save_image_encoder(folder: Path, clip) -> None:
    from transformers import CLIPVisionModelWithProjection

    vision_config = clip.config.vision_config
    vision_config.projection_dim = clip.config.projection_dim
    vision = CLIPVisionModelWithProjection(vision_config)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    vision.save_pretrained(folder)


def text_encoder_of(clip):
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(clip.config.text_config)
    missing, _ = text_encoder.load_state_dict(clip.text_model.state_dict(), strict=False)
    assert not [m for m in missing if not m.endswith("position_ids")], missing
    return text_encoder.eval().requires_grad_(False)


SHIPPED_MARK = "seeded_from_shipped.json"


def seeded_from_shipped(out: Path) -> bool:
    return (out / SHIPPED_MARK).exists()


def seeded_record(out: Path) -> dict:
    """The pretraining record of the world ``out`` was seeded from (read when seeded, so a resumed run keeps it)."""
    return json.loads((out / SHIPPED_MARK).read_text())["pretrain"]


def seed_from_shipped_world(out: Path, toy_dir: Path | None = None) -> Path:
    """Put the shipped toy world's VAE, text tower, tokenizer, image encoder and reader (fp32) into ``out``, where
    :func:`pretrain_toy_world` reuses them, and its UNet into ``out/unet_init``: a longer UNet pretraining of the
    shipped world without the folders of the run that made it. Returns the UNet folder to pass as ``unet_init``.
    A folder seeded before is kept as it is, so a resumed run continues from what it started with."""
    if seeded_from_shipped(out):
        return out / "unet_init"
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer, CLIPVisionModelWithProjection

    from training.toy_model import TOY_DIR, load_toy_text_encoder

    toy_dir = Path(toy_dir or TOY_DIR)
    base = out / "base"
    AutoencoderKL.from_pretrained(toy_dir / "vae", local_files_only=True).float().save_pretrained(base / "vae")
    load_toy_text_encoder(toy_dir).save_pretrained(base / "text_encoder")
    CLIPTokenizer.from_pretrained(CONFIG_DIR / "tokenizer", local_files_only=True).save_pretrained(base / "tokenizer")
    CLIPVisionModelWithProjection.from_pretrained(toy_dir / "image_encoder", local_files_only=True).float().save_pretrained(out / "image_encoder")
    shutil.copyfile(toy_dir / "reader.safetensors", out / "reader.safetensors")
    UNet2DConditionModel.from_pretrained(toy_dir / "unet", local_files_only=True).float().save_pretrained(out / "unet_init")
    (out / SHIPPED_MARK).write_text(json.dumps({"from": str(toy_dir), "pretrain": json.loads((toy_dir / "pretrain.json").read_text())}, indent=1) + "\n")
    return out / "unet_init"


def pretrain_toy_world(out: Path, sizes: Sizes, seed: int = 0) -> dict:
    """Render pool, VAE, toy CLIP, base UNet and the attribute reader; each stage is kept in ``out`` and reused
    when present. Saves ``out/base`` (diffusers), ``out/image_encoder`` (transformers), ``out/reader.safetensors``."""
    from diffusers import AutoencoderKL

    from .toy_metrics import save_reader, train_reader

    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "pretrain_timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    world = SyntheticWorld(seed)
    def generator(offset: int) -> torch.Generator:  # one per stage, so a resumed pretraining draws the same batches
        return torch.Generator().manual_seed(seed * 100 + offset)

    def stage(name: str, done: bool, work):
        if done:
            return
        start = time.time()
        work()
        timings[f"{name}_s"] = round(time.time() - start, 1)
        timings_path.write_text(json.dumps(timings, indent=1))

    pool_path = out / "pool.pt"
    stage("render", pool_path.exists(), lambda: RenderPool.cached(pool_path, world, world.subjects(None, "train"), sizes.pool_images, sizes.resolution, seed))
    pool = RenderPool.cached(pool_path, world, [], 0, sizes.resolution, seed)
    base = out / "base"
    def vae_stage(refine: bool):
        vae = AutoencoderKL.from_pretrained(out / "vae_stage1", local_files_only=True) if refine else new_vae(sizes)
        steps, learning_rate, name = (sizes.vae_refine_steps, 5e-4, "vae refine") if refine else (sizes.vae_steps, 1e-3, "vae")
        vae = train_vae(vae, pool, steps, sizes.vae_batch, learning_rate, refine, sizes.vae_colour_anchor, generator(4 if refine else 1), name)
        vae.save_pretrained(base / "vae" if refine else out / "vae_stage1")

    stage("vae", (out / "vae_stage1").exists() or (base / "vae").exists(), lambda: vae_stage(refine=False))
    stage("vae_refine", (base / "vae").exists(), lambda: vae_stage(refine=True))
    vae = AutoencoderKL.from_pretrained(base / "vae", local_files_only=True).eval().requires_grad_(False)
    latents_path = out / "latents.pt"
    stage("encode", latents_path.exists(), lambda: torch.save(encode_pool(vae, pool), latents_path))
    latents = torch.load(latents_path)

    def reader_stage():
        with torch.no_grad():
            decoded = torch.cat([vae.decode(latents[i : i + 256] / vae.config.scaling_factor).sample.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
                                 for i in range(0, len(latents), 256)])
        save_reader(train_reader(pool, decoded, sizes.reader_steps, 64, _log), out / "reader.safetensors")

    stage("reader", (out / "reader.safetensors").exists(), reader_stage)
    clip_dir = out / "clip"

    def clip_stage():
        model, tokenizer = train_clip(pool, sizes, generator(2))
        model.save_pretrained(clip_dir)
        tokenizer.save_pretrained(clip_dir)

    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    if seeded_from_shipped(out):  # the shipped world's towers (seed_from_shipped_world): no toy CLIP to train
        text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder", local_files_only=True).eval().requires_grad_(False)
        tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer", local_files_only=True)
    else:
        stage("clip", (clip_dir / "config.json").exists(), clip_stage)
        clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval().requires_grad_(False)
        tokenizer = CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True)
        text_encoder = text_encoder_of(clip)
        if not (out / "image_encoder" / "config.json").exists():
            save_image_encoder(out / "image_encoder", clip)
            for name, part in (("text_encoder", text_encoder), ("tokenizer", tokenizer)):
                part.save_pretrained(base / name)

    if sizes.vision_steps:
        stage("vision_continued", (out / "image_encoder" / VISION_RECORD).exists(),
              lambda: continue_vision_tower(out / "image_encoder", pool, text_encoder, tokenizer, sizes, generator(5)))

    def unet_stage():
        def snapshot(unet, scheduler, step):  # intermediate base models, to watch what the UNet can draw
            unet.save_pretrained(out / "snapshots" / f"unet_{step:06d}")

        batches = generator(13 if sizes.unet_init else 3)  # a continuation draws other batches than the part before it
        unet, scheduler = train_base_unet(pool, latents, text_encoder, tokenizer, sizes, batches, snapshot=snapshot, snapshot_every=sizes.unet_steps // 6)
        save_base_model(base, unet, vae, text_encoder, tokenizer, scheduler)

    if sizes.unet_init and not sizes.unet_steps:  # a continuation of other parts only: the UNet as it was
        stage("unet_kept", (base / "model_index.json").exists(), unet_stage)
    else:
        stage("unet_continued" if sizes.unet_init else "unet", (base / "model_index.json").exists(), unet_stage)

    _log(f"pretraining done: {timings}")
    return timings
