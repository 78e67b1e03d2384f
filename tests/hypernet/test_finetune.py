import pytest
import torch

from hypernet import FinetuneConfig, LoraWeights, NoiseSchedule, attach_lora, combine_exact, locate_targets, rank_relaxed_finetune
from hypernet.errors import HyperNetError
from testkit.tiny_models import tiny_unet


def random_lora(layers, rank, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return LoraWeights(
        {l.name: torch.randn(rank, l.in_features, generator=g) * scale for l in layers},
        {l.name: torch.randn(l.out_features, rank, generator=g) * scale for l in layers},
    )


def test_combine_exact_is_exact_at_the_summed_rank_and_truncates_optimally():
    layers = locate_targets(tiny_unet()).layers
    a, b = random_lora(layers, 1, 0), random_lora(layers, 4, 1)
    combined = combine_exact([a, b])
    for name in combined.names:
        assert combined.rank(name) == 5
        torch.testing.assert_close(combined.delta(name), a.delta(name) + b.delta(name), rtol=1e-5, atol=1e-6)
    truncated = combine_exact([a, b], max_rank=2)
    name = layers[0].name
    full = (a.delta(name) + b.delta(name)).double()
    s = torch.linalg.svdvals(full)
    err = (truncated.delta(name).double() - full).norm()
    torch.testing.assert_close(err, s[2:].norm(), rtol=1e-4, atol=1e-6)  # Eckart-Young optimum


def test_finetune_fits_the_subject_and_exports_one_exact_lora():
    unet = tiny_unet()
    bound = locate_targets(unet)
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(1, 5, 32, generator=generator)
    predicted = random_lora(bound.layers, 1, 5, scale=0.05)

    def denoiser(x_t, t):
        return unet(x_t, t, context.expand(x_t.shape[0], -1, -1)).sample

    schedule = NoiseSchedule.scaled_linear()
    seen = []
    config = FinetuneConfig(steps=30, rank=4, learning_rate=3e-3, seed=0, batch_size=2)
    weights_before = {n: m.weight.clone() for n, m in bound.modules.items()}
    result = rank_relaxed_finetune(bound.modules, predicted, latents, denoiser, schedule, config, callback=lambda s, l: seen.append((s, l)))
    assert [s for s, _ in seen] == list(range(1, 31))
    assert all(torch.equal(m.weight, weights_before[n]) for n, m in bound.modules.items())  # model untouched
    assert all(not m._forward_hooks for m in bound.modules.values())  # hooks removed

    # the result is predicted + learned, exactly, at rank 1 + 4
    name = bound.names[0]
    assert result.lora.rank(name) == 5
    torch.testing.assert_close(result.lora.delta(name), predicted.delta(name) + result.learned.delta(name), rtol=1e-4, atol=1e-6)

    # training lowered the denoising loss on the subject (fixed evaluation noise)
    def eval_loss(lora):
        g = torch.Generator().manual_seed(99)
        total = 0.0
        with torch.no_grad(), attach_lora(bound.modules, lora):
            for _ in range(8):
                noise = torch.randn(latents.shape, generator=g)
                t = torch.randint(0, 1000, (2,), generator=g)
                total += (denoiser(schedule.add_noise(latents, noise, t), t) - noise).square().mean().item()
        return total
    assert eval_loss(result.lora) < eval_loss(predicted)

    # same seed, same result
    again = rank_relaxed_finetune(bound.modules, predicted, latents, denoiser, schedule, config)
    assert again.losses == result.losses


def test_finetune_cancel_and_bad_input():
    unet = tiny_unet()
    bound = locate_targets(unet)
    predicted = random_lora(bound.layers, 1, 0)
    context = torch.zeros(1, 5, 32)

    def denoiser(x_t, t):
        return unet(x_t, t, context.expand(x_t.shape[0], -1, -1)).sample

    class Cancelled(Exception):
        pass

    def cancel_at_3(step, loss):
        if step == 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        rank_relaxed_finetune(bound.modules, predicted, torch.randn(1, 4, 8, 8), denoiser, NoiseSchedule.scaled_linear(), FinetuneConfig(steps=10), cancel_at_3)
    assert all(not m._forward_hooks for m in bound.modules.values())
    with pytest.raises(HyperNetError, match="NaN"):
        rank_relaxed_finetune(bound.modules, predicted, torch.full((1, 4, 8, 8), float("nan")), denoiser, NoiseSchedule.scaled_linear())
    with pytest.raises(HyperNetError, match="shape"):
        rank_relaxed_finetune(bound.modules, predicted, torch.randn(4, 8, 8), denoiser, NoiseSchedule.scaled_linear())


def test_subjects_tuned_together_stay_independent():
    """Tuned in one batch, a subject's LoRA depends on its own latents only, as if tuned alone."""
    unet = tiny_unet()
    bound = locate_targets(unet)
    generator = torch.Generator().manual_seed(4)
    a, b, c = (torch.randn(2, 4, 8, 8, generator=generator) for _ in range(3))
    context = torch.randn(1, 5, 32, generator=generator)
    shared = random_lora(bound.layers, 1, 5, scale=0.05)
    predicted = LoraWeights({n: torch.stack([d, d * 2]) for n, d in shared.down.items()}, {n: torch.stack([u, u]) for n, u in shared.up.items()})
    calls = []

    def denoiser(x_t, t):
        calls.append(x_t.shape[0])
        return unet(x_t, t, context.expand(x_t.shape[0], -1, -1)).sample

    config = FinetuneConfig(steps=6, rank=2, learning_rate=3e-3, seed=0, batch_size=2)
    schedule = NoiseSchedule.scaled_linear()
    with_b = rank_relaxed_finetune(bound.modules, predicted, torch.stack([a, b]), denoiser, schedule, config)
    with_c = rank_relaxed_finetune(bound.modules, predicted, torch.stack([a, c]), denoiser, schedule, config)
    assert set(calls) == {4}  # one forward per step: 2 subjects x 2 samples
    assert with_b.learned.batch_size == 2 and with_b.lora.batch_size == 2
    name = bound.names[0]
    torch.testing.assert_close(with_b.learned.select(0).delta(name), with_c.learned.select(0).delta(name), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(with_b.learned.select(1).delta(name), with_c.learned.select(1).delta(name), atol=1e-7)
    assert with_b.learned.select(1).delta(name).abs().max() > 0  # the second subject learned something too
    for i in range(2):
        torch.testing.assert_close(with_b.lora.select(i).delta(name), predicted.select(i).delta(name) + with_b.learned.select(i).delta(name), rtol=1e-4, atol=1e-6)
    assert all(not m._forward_hooks for m in bound.modules.values())
    with pytest.raises(HyperNetError, match=r"\(2, N, C, H, W\)"):
        rank_relaxed_finetune(bound.modules, predicted, a, denoiser, schedule, config)
