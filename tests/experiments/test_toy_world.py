"""The toy world's VAE: its latents carry colour (the colour anchor), and the shipped one keeps every identity attribute readable."""

import random

import numpy as np
import torch
import torch.nn.functional as F

from experiments.toy_models import RenderPool, Sizes, new_vae, train_vae
from training.synthetic import SyntheticWorld


def small_pool(count: int, split: str = "train", seed: int = 0) -> RenderPool:
    world = SyntheticWorld(0)
    return RenderPool.render(world, world.subjects(64, split), count, 64, seed)


def colour_error(vae, pool: RenderPool) -> float:
    """How far latent channels 0-2 (posterior mean) are from the 4x4-pooled RGB."""
    pixels = pool.floats(torch.arange(len(pool)))
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean
    return F.mse_loss(mean[:, :3], F.avg_pool2d(pixels, 4)).item()


def test_a_new_vae_starts_with_a_near_deterministic_posterior():
    vae = new_vae(Sizes.quick())
    with torch.no_grad():
        posterior = vae.encode(torch.rand(2, 3, 64, 64) * 2 - 1).latent_dist
    assert posterior.std.max().item() < 0.01


def test_colour_anchor_makes_the_latents_carry_the_pooled_colour():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    pool = small_pool(48)
    errors = {}
    for anchor in (0.0, 1.0):
        vae = train_vae(new_vae(Sizes.quick()), pool, 25, 8, 1e-3, False, anchor, torch.Generator().manual_seed(0), "test")
        errors[anchor] = colour_error(vae, pool)
        assert vae.config.scaling_factor > 0
    assert errors[1.0] < 0.5 * errors[0.0], errors


def test_the_shipped_vae_keeps_the_colours_the_reader_reads():
    """Regression guard: the first shipped VAE lost colour (primary 0.54, secondary 0.43 through a round trip)."""
    from diffusers import AutoencoderKL

    from experiments.toy_metrics import reader_accuracy
    from training.toy_model import TOY_DIR, load_toy_reader

    world = SyntheticWorld(0)
    rng = random.Random(5)
    subjects = world.subjects(48, "heldout")
    contexts = [world.sample_context(rng) for _ in subjects]
    pixels = torch.from_numpy(np.stack([np.asarray(world.render(s, c, 64)) for s, c in zip(subjects, contexts)])).permute(0, 3, 1, 2).float() / 127.5 - 1
    vae = AutoencoderKL.from_pretrained(TOY_DIR / "vae", local_files_only=True).float().eval()
    with torch.no_grad():
        round_trip = vae.decode(vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1)
    accuracy = reader_accuracy(load_toy_reader().float(), round_trip, subjects, contexts)
    assert accuracy["primary"] >= 0.9 and accuracy["secondary"] >= 0.75 and accuracy["shape"] >= 0.9, accuracy
