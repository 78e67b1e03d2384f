"""The toy world's pretraining: the VAE's latents carry colour (the colour anchor) and the shipped one keeps every identity
attribute readable; the base UNet's loss weights and its continuation from a saved UNet."""

import json
import random

import numpy as np
import torch

from experiments.toy_models import TOKENIZER_DIR, RenderPool, Sizes, colour_anchor_loss, denoising_loss_weights, new_vae, train_base_unet, train_vae
from training.synthetic import SyntheticWorld


def small_pool(count: int, split: str = "train", seed: int = 0) -> RenderPool:
    world = SyntheticWorld(0)
    return RenderPool.render(world, world.subjects(64, split), count, 64, seed)


def colour_error(vae, pool: RenderPool) -> float:
    """How far latent channels 0-2 (posterior mean) are from the 4x4-pooled RGB."""
    pixels = pool.floats(torch.arange(len(pool)))
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean
    return colour_anchor_loss(mean, pixels).item()


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


def test_min_snr_weights_lower_only_the_low_noise_steps():
    from hypernet import NoiseSchedule

    alphas_cumprod = NoiseSchedule.scaled_linear().alphas_cumprod
    assert torch.equal(denoising_loss_weights(alphas_cumprod, 0.0), torch.ones(1000))
    weights = denoising_loss_weights(alphas_cumprod, 5.0)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    assert torch.equal(weights[snr <= 5], torch.ones(int((snr <= 5).sum())))
    assert torch.allclose(weights[snr > 5], 5 / snr[snr > 5])
    assert weights[0] < 0.01 and 0 < (snr > 5).sum() < 300  # SD's schedule: only the first ~150 steps are above gamma 5


def tiny_text_encoder(hidden: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77)
    return CLIPTextModel(config).eval(), CLIPTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)


def test_base_unet_training_continues_from_a_saved_unet(tmp_path):
    import dataclasses

    torch.set_num_threads(min(2, torch.get_num_threads()))
    pool = small_pool(8)
    latents = torch.randn(8, 4, 16, 16)
    sizes = dataclasses.replace(Sizes.quick(), unet_steps=2, batch=2)
    text_encoder, tokenizer = tiny_text_encoder(sizes.text_hidden)
    first, _ = train_base_unet(pool, latents, text_encoder, tokenizer, sizes, torch.Generator().manual_seed(0))
    first.save_pretrained(tmp_path / "unet")
    continued_sizes = dataclasses.replace(sizes, unet_init=str(tmp_path / "unet"), unet_steps=1, unet_lr=1e-9, unet_min_snr_gamma=5.0)
    continued, _ = train_base_unet(pool, latents, text_encoder, tokenizer, continued_sizes, torch.Generator().manual_seed(0))
    fresh, _ = train_base_unet(pool, latents, text_encoder, tokenizer, dataclasses.replace(sizes, unet_lr=1e-9, unet_steps=1), torch.Generator().manual_seed(0))
    saved, resumed, restarted = (dict(m.named_parameters()) for m in (first, continued, fresh))
    name = "conv_in.weight"
    assert torch.allclose(resumed[name], saved[name], atol=1e-6)  # started from the saved weights, moved by a 1e-9 learning rate
    assert not torch.allclose(restarted[name], saved[name], atol=1e-3)  # a fresh UNet would not


def test_pretraining_continues_the_shipped_world(tmp_path):
    from diffusers import UNet2DConditionModel

    from experiments.pretrain import main
    from training.toy_model import TOY_DIR, load_toy_text_encoder

    torch.set_num_threads(min(2, torch.get_num_threads()))
    main(["--out", str(tmp_path), "--quick", "--from-shipped", "--set", "unet_steps=2", "batch=2", "pool_images=16"])
    record = json.loads((tmp_path / "pretrain.json").read_text())
    assert record["continues"] == json.loads((TOY_DIR / "pretrain.json").read_text())
    assert record["total_minutes_with_previous"] >= record["continues"]["total_minutes"]
    assert "clip_s" not in record["timings_s"] and "unet_continued_s" in record["timings_s"]  # the shipped towers were reused, not retrained
    shipped = dict(UNet2DConditionModel.from_pretrained(TOY_DIR / "unet", local_files_only=True).float().named_parameters())
    continued = dict(UNet2DConditionModel.from_pretrained(tmp_path / "base" / "unet", local_files_only=True).named_parameters())
    assert shipped.keys() == continued.keys()
    moved = max((continued[k] - shipped[k]).abs().max().item() for k in shipped)
    assert 0 < moved < 0.05  # two small steps from the shipped weights, not a fresh UNet
    from transformers import CLIPTextModel

    text = CLIPTextModel.from_pretrained(tmp_path / "base" / "text_encoder", local_files_only=True)
    shipped_text = load_toy_text_encoder()
    assert all(torch.equal(a, b) for a, b in zip(text.state_dict().values(), shipped_text.state_dict().values()))


def test_pretraining_continues_the_shipped_image_encoder_only(tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    from experiments.pretrain import main
    from experiments.study_report import pretraining_note
    from experiments.toy_models import VISION_RECORD
    from training.toy_model import TOY_DIR

    torch.set_num_threads(min(2, torch.get_num_threads()))
    main(["--out", str(tmp_path), "--quick", "--from-shipped", "--set", "unet_steps=0", "vision_steps=3", "clip_batch=4", "pool_images=16"])
    record = json.loads((tmp_path / "pretrain.json").read_text())
    assert "vision_continued_s" in record["timings_s"] and "unet_kept_s" in record["timings_s"] and "unet_continued_s" not in record["timings_s"]
    assert "the image encoder's vision tower trained further" in pretraining_note(record)
    shipped_unet = UNet2DConditionModel.from_pretrained(TOY_DIR / "unet", local_files_only=True).float().state_dict()
    kept_unet = UNet2DConditionModel.from_pretrained(tmp_path / "base" / "unet", local_files_only=True).state_dict()
    assert all(torch.equal(kept_unet[k], v) for k, v in shipped_unet.items())  # unet_steps=0: the UNet as shipped
    shipped = CLIPVisionModelWithProjection.from_pretrained(TOY_DIR / "image_encoder", local_files_only=True).float().state_dict()
    continued = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "image_encoder", local_files_only=True).state_dict()
    moved = max((continued[k] - shipped[k]).abs().max().item() for k in shipped if k in continued)
    assert 0 < moved < 0.05  # three small steps from the shipped tower, not a fresh one
    vision_record = json.loads((tmp_path / "image_encoder" / VISION_RECORD).read_text())
    assert vision_record["steps"] == 3 and vision_record["pool_images"] == 16 and np.isfinite(vision_record["last_200_loss"])
