"""Rank-relaxed fast finetune (HyperDreamBooth): sharpen a predicted subject LoRA in a few dozen steps.

The predicted (rank-r) delta stays fixed on top of the frozen model -- equivalent to merging it into
the weights, without touching them -- and a fresh LoRA of higher rank is trained with the denoising
loss on the subject image(s). The result is exported as one standard LoRA: per layer, the predicted
and learned deltas summed and re-factored exactly (rank <= r_pred + r_new) by :func:`combine_exact`.

The model is reached only through a ``denoiser(x_t, t) -> eps`` callable, so ComfyUI and diffusers can
both drive the loop; the callable owns the conditioning (and re-encodes the prompt when text-encoder
layers are adapted, since their hooks are live during the call). The caller keeps the model frozen.

Several subjects can be tuned at once (one batched forward per step instead of one per subject): give a
batched ``predicted`` LoRA (one per subject) and latents ``(S, N, C, H, W)``. Each subject's LoRA sees only its
own samples and the loss is the sum of the subjects' losses, so every subject's gradient, and with a per-element
optimiser its whole trajectory, is that of a run on its own (only the noise draws differ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from .errors import HyperNetError
from .losses import denoising_loss
from .lora import LoraWeights, combine_exact
from .runtime import attach_lora
from .schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 40
    rank: int = 4
    learning_rate: float = 1e-4
    seed: int = 0
    batch_size: int = 1
    min_timestep: int = 0
    max_timestep: int = 1000
    max_export_rank: int | None = None  # None: exact (rank_pred + rank)

    def __post_init__(self) -> None:
        if self.steps < 0 or self.rank < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise HyperNetError(f"invalid finetune settings: {self}")
        if not 0 <= self.min_timestep < self.max_timestep:
            raise HyperNetError("need 0 <= min_timestep < max_timestep")


@dataclass
class FinetuneResult:
    lora: LoraWeights  # predicted + learned, as one exact LoRA
    learned: LoraWeights  # the new higher-rank LoRA alone
    losses: list[float] = field(default_factory=list)


def fresh_lora(modules: Mapping[str, nn.Linear], names: list[str], rank: int, generator: torch.Generator, device,
               subjects: int | None = None) -> LoraWeights:
    """LoRA's usual init: random ``down`` (std 1/sqrt(in)), zero ``up``, so training starts at the input model.
    ``subjects``: one such LoRA per subject (a leading batch dimension)."""
    lead = () if subjects is None else (subjects,)
    down, up = {}, {}
    for name in names:
        linear = modules[name]
        down[name] = (torch.randn(*lead, rank, linear.in_features, generator=generator) / math.sqrt(linear.in_features)).to(device).requires_grad_()
        up[name] = torch.zeros(*lead, linear.out_features, rank, device=device).requires_grad_()
    return LoraWeights(down, up)


def noisy_batch(latents: torch.Tensor, per_subject: int, schedule: NoiseSchedule, generator: torch.Generator,
                min_timestep: int = 0, max_timestep: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training step's samples from ``latents`` ``(S, N, C, H, W)``: ``per_subject`` images of each subject
    (subject-major), their noise and timesteps, all on the latents' device."""
    count, device = latents.shape[0], latents.device
    index = torch.randint(latents.shape[1], (count, per_subject), generator=generator)
    x0 = latents[torch.arange(count).unsqueeze(1), index.to(device)].flatten(0, 1)
    noise = torch.randn(x0.shape, generator=generator).to(device, x0.dtype)
    high = schedule.num_timesteps if max_timestep is None else min(max_timestep, schedule.num_timesteps)
    timesteps = torch.randint(min_timestep, high, (count * per_subject,), generator=generator).to(device)
    return x0, noise, timesteps


def rank_relaxed_finetune(
    modules: Mapping[str, nn.Linear],
    predicted: LoraWeights,
    latents: torch.Tensor,
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    config: FinetuneConfig = FinetuneConfig(),
    callback: StepCallback | None = None,
) -> FinetuneResult:
    """Train a fresh rank-``config.rank`` LoRA over the predicted one; ``callback`` may raise to cancel.

    ``latents`` are the subject image(s) in the denoiser's latent space, ``(N, C, H, W)``; for a batched
    ``predicted`` (S subjects at once) ``(S, N, C, H, W)``, and the denoiser is then called on ``S * batch_size``
    samples, subject-major. ``losses`` are per step, averaged over subjects.
    """
    subjects = predicted.batch_size
    if subjects is None:
        if latents.dim() != 4 or latents.shape[0] == 0:
            raise HyperNetError(f"need subject latents of shape (N, C, H, W) with N >= 1, got {tuple(latents.shape)}")
        latents = latents.unsqueeze(0)
    elif latents.dim() != 5 or latents.shape[0] != subjects or latents.shape[1] == 0:
        raise HyperNetError(f"{subjects} subjects at once need latents of shape ({subjects}, N, C, H, W) with N >= 1, got {tuple(latents.shape)}")
    if not torch.isfinite(latents).all():
        raise HyperNetError("subject latents contain NaN/inf")
    device = latents.device
    count, per_subject = latents.shape[0], config.batch_size
    generator = torch.Generator().manual_seed(config.seed)
    learned = fresh_lora(modules, predicted.names, config.rank, generator, device, subjects)
    optimizer = torch.optim.AdamW(list(learned.down.values()) + list(learned.up.values()), lr=config.learning_rate, weight_decay=0.0)
    fixed = predicted.detach().to(device)
    if subjects is None:  # shared factors fit any batch: hook them once
        handles = [attach_lora(modules, fixed), attach_lora(modules, learned)]
    else:
        handles = [attach_lora(modules, fixed.repeated(per_subject, interleave=True))]
    losses: list[float] = []
    try:
        for step in range(config.steps):
            x0, noise, timesteps = noisy_batch(latents, per_subject, schedule, generator, config.min_timestep, config.max_timestep)
            x_t = schedule.add_noise(x0, noise, timesteps)
            if subjects is None:
                prediction = denoiser(x_t, timesteps)
            else:
                with attach_lora(modules, learned.repeated(per_subject, interleave=True)):
                    prediction = denoiser(x_t, timesteps)
            per_subject_loss = denoising_loss(prediction, noise).view(count, per_subject).mean(1)
            loss = per_subject_loss.sum()
            if not torch.isfinite(loss):
                raise HyperNetError(f"finetune loss became {loss.item()} at step {step + 1}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item() / count)
            if callback is not None:
                callback(step + 1, losses[-1])
    finally:
        for handle in handles:
            handle.remove()
    learned = learned.detach()
    return FinetuneResult(combine_exact([fixed.to("cpu"), learned.to("cpu")], config.max_export_rank), learned, losses)
