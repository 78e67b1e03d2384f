"""The tuning encoder's inference-time step: a few steps (default 12) that tune the predicted word embedding and
the predicted LoRA together on the reference image(s), with the denoising loss and the nearest-neighbour
regulariser keeping the embedding near a real word.

With one subject at a time there are no other subjects to push away from, so of the training-time InfoNCE
(``hypernet.losses.nearest_neighbor_contrastive_loss``) only its positive term is left: ``1 - cos(v, n)`` toward
the nearest real word ``n`` (chosen without gradient, as in training). Several subjects can be tuned in one batch
as in :mod:`hypernet.finetune` (batched LoRA, embeddings ``(S, dim)``, latents ``(S, N, C, H, W)``); each subject's
numbers see only its own samples.

The model is reached through ``denoiser(x_t, t, embeddings) -> eps``, where ``embeddings`` holds each sample's
word embedding: the callable encodes its prompt with it (and with the LoRA hooks live on the text encoder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import HyperNetError
from .finetune import noisy_batch
from .losses import denoising_loss
from .lora import LoraWeights
from .runtime import attach_lora
from .schedule import NoiseSchedule

EmbeddingDenoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TuningConfig:
    steps: int = 12
    learning_rate: float = 1e-3  # LoRA factors and embedding alike (Adam)
    nn_weight: float = 0.1
    seed: int = 0
    batch_size: int = 1  # images per subject per step

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.learning_rate <= 0 or self.nn_weight < 0:
            raise HyperNetError(f"invalid tuning settings: {self}")


@dataclass
class TuningResult:
    lora: LoraWeights
    embeddings: torch.Tensor  # (dim,) for one subject, (S, dim) for several
    losses: list[float] = field(default_factory=list)


def nearest_word_pull(embeddings: torch.Tensor, vocabulary: torch.Tensor) -> torch.Tensor:
    """Per embedding ``1 - cos(v, n)``, ``n`` its nearest row of ``vocabulary`` (real words only; chosen without gradient)."""
    v = F.normalize(embeddings.float(), dim=-1)
    vocab = F.normalize(vocabulary.float(), dim=-1)
    with torch.no_grad():
        nearest = (v @ vocab.T).argmax(dim=-1)
    return 1 - (v * vocab[nearest]).sum(dim=-1)


def tune_subject(
    modules: Mapping[str, nn.Linear],
    predicted: LoraWeights,
    embeddings: torch.Tensor,
    vocabulary: torch.Tensor,
    latents: torch.Tensor,
    denoiser: EmbeddingDenoiser,
    schedule: NoiseSchedule,
    config: TuningConfig = TuningConfig(),
    callback: Callable[[int, float], None] | None = None,
) -> TuningResult:
    """Tune ``predicted`` (its factors, all target layers) and ``embeddings`` jointly; ``callback`` may raise to cancel."""
    subjects = predicted.batch_size
    single = subjects is None
    if single:
        if latents.dim() != 4 or embeddings.dim() != 1:
            raise HyperNetError(f"one subject needs latents (N, C, H, W) and an embedding (dim,), got {tuple(latents.shape)} and {tuple(embeddings.shape)}")
        latents, embeddings = latents.unsqueeze(0), embeddings.unsqueeze(0)
        predicted = LoraWeights({n: d.unsqueeze(0) for n, d in predicted.down.items()}, {n: u.unsqueeze(0) for n, u in predicted.up.items()})
    elif latents.dim() != 5 or latents.shape[0] != subjects or embeddings.shape != (subjects, embeddings.shape[-1]):
        raise HyperNetError(f"{subjects} subjects need latents ({subjects}, N, C, H, W) and embeddings ({subjects}, dim), "
                            f"got {tuple(latents.shape)} and {tuple(embeddings.shape)}")
    if not (torch.isfinite(latents).all() and torch.isfinite(embeddings).all()):
        raise HyperNetError("subject latents or embeddings contain NaN/inf")
    device = latents.device
    count, per_subject = latents.shape[0], config.batch_size
    generator = torch.Generator().manual_seed(config.seed)
    lora = predicted.detach().clone().to(device)
    for tensor in [*lora.down.values(), *lora.up.values()]:
        tensor.requires_grad_()
    vectors = embeddings.detach().clone().float().to(device).requires_grad_()
    optimizer = torch.optim.Adam([*lora.down.values(), *lora.up.values(), vectors], lr=config.learning_rate)
    vocabulary = vocabulary.detach().to(device)
    losses: list[float] = []
    for step in range(config.steps):
        x0, noise, timesteps = noisy_batch(latents, per_subject, schedule, generator)
        with attach_lora(modules, lora.repeated(per_subject, interleave=True)):
            prediction = denoiser(schedule.add_noise(x0, noise, timesteps), timesteps, vectors.repeat_interleave(per_subject, 0))
        denoise = denoising_loss(prediction, noise).view(count, per_subject).mean(1)
        loss = (denoise + config.nn_weight * nearest_word_pull(vectors, vocabulary)).sum()
        if not torch.isfinite(loss):
            raise HyperNetError(f"tuning loss became {loss.item()} at step {step + 1}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item() / count)
        if callback is not None:
            callback(step + 1, losses[-1])
    lora, vectors = lora.detach().to("cpu"), vectors.detach().to("cpu")
    if single:
        return TuningResult(lora.select(0), vectors[0], losses)
    return TuningResult(lora, vectors, losses)
