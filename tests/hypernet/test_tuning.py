"""The tuning encoder's few-step tuning of the predicted embedding and LoRA (hypernet.tuning)."""

import pytest
import torch

from hypernet import LoraWeights, NoiseSchedule, attach_lora, locate_targets
from hypernet.errors import HyperNetError
from hypernet.tuning import TuningConfig, nearest_word_pull, tune_subject
from testkit.tiny_models import tiny_unet


def setup(seed=0):
    unet = tiny_unet()
    bound = locate_targets(unet)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randn(1, 5, 32, generator=generator)
    vocabulary = torch.randn(40, 32, generator=generator)

    def denoiser(x_t, t, embeddings):  # the embedding is the prompt's third token
        context = prompt.expand(x_t.shape[0], -1, -1).clone()
        context[:, 2] = embeddings
        return unet(x_t, t, context).sample

    predicted = LoraWeights({l.name: torch.randn(1, l.in_features, generator=generator) * 0.05 for l in bound.layers},
                            {l.name: torch.randn(l.out_features, 1, generator=generator) * 0.05 for l in bound.layers})
    return unet, bound, denoiser, vocabulary, predicted, generator


def eval_loss(bound, denoiser, lora, embedding, latents, schedule):
    g = torch.Generator().manual_seed(99)
    total = 0.0
    with torch.no_grad(), attach_lora(bound.modules, lora):
        for _ in range(8):
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(0, 1000, (latents.shape[0],), generator=g)
            total += (denoiser(schedule.add_noise(latents, noise, t), t, embedding.expand(latents.shape[0], -1)) - noise).square().mean().item()
    return total


def test_twelve_steps_fit_the_subject_and_keep_the_embedding_near_a_real_word():
    unet, bound, denoiser, vocabulary, predicted, generator = setup()
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    embedding = torch.randn(32, generator=generator)
    schedule = NoiseSchedule.scaled_linear()
    weights = {n: m.weight.clone() for n, m in bound.modules.items()}
    seen = []
    result = tune_subject(bound.modules, predicted, embedding, vocabulary, latents, denoiser, schedule,
                          TuningConfig(steps=12, learning_rate=3e-3, nn_weight=1.0, batch_size=2), callback=lambda s, l: seen.append(s))
    assert seen == list(range(1, 13))
    assert all(torch.equal(m.weight, weights[n]) for n, m in bound.modules.items()) and all(not m._forward_hooks for m in bound.modules.values())
    assert result.embeddings.shape == (32,) and not torch.equal(result.embeddings, embedding)
    assert any(not torch.equal(result.lora.up[n], predicted.up[n]) for n in predicted.names)  # both the LoRA and the embedding moved
    assert eval_loss(bound, denoiser, result.lora, result.embeddings, latents, schedule) < eval_loss(bound, denoiser, predicted, embedding, latents, schedule)
    assert nearest_word_pull(result.embeddings, vocabulary) < nearest_word_pull(embedding, vocabulary)
    unchanged = tune_subject(bound.modules, predicted, embedding, vocabulary, latents, denoiser, schedule, TuningConfig(steps=0))
    assert torch.equal(unchanged.embeddings, embedding) and all(torch.equal(unchanged.lora.down[n], predicted.down[n]) for n in predicted.names)


def test_subjects_tuned_together_stay_independent_and_bad_input_is_refused():
    unet, bound, denoiser, vocabulary, predicted, generator = setup(1)
    a, b, c = (torch.randn(1, 4, 8, 8, generator=generator) for _ in range(3))
    embeddings = torch.randn(2, 32, generator=generator)
    both = LoraWeights({n: torch.stack([d, d]) for n, d in predicted.down.items()}, {n: torch.stack([u, u * 2]) for n, u in predicted.up.items()})
    config = TuningConfig(steps=4, learning_rate=3e-3)
    schedule = NoiseSchedule.scaled_linear()
    with_b = tune_subject(bound.modules, both, embeddings, vocabulary, torch.stack([a, b]), denoiser, schedule, config)
    with_c = tune_subject(bound.modules, both, embeddings, vocabulary, torch.stack([a, c]), denoiser, schedule, config)
    torch.testing.assert_close(with_b.embeddings[0], with_c.embeddings[0], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(with_b.embeddings[1], with_c.embeddings[1])

    class Cancelled(Exception):
        pass

    def cancel(step, loss):
        raise Cancelled()

    with pytest.raises(Cancelled):
        tune_subject(bound.modules, predicted, embeddings[0], vocabulary, a, denoiser, schedule, config, cancel)
    assert all(not m._forward_hooks for m in bound.modules.values())
    with pytest.raises(HyperNetError, match="NaN"):
        tune_subject(bound.modules, predicted, embeddings[0] * float("nan"), vocabulary, a, denoiser, schedule, config)
    with pytest.raises(HyperNetError, match="one subject needs"):
        tune_subject(bound.modules, predicted, embeddings, vocabulary, a, denoiser, schedule, config)
