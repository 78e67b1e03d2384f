"""The end-to-end objective: denoising loss through the frozen backbone with each sample's own predicted
LoRA applied, plus the L2 penalty on the hypernetwork output and the optional extras.

    L = E || eps - eps_{theta + dW(x)}(x_t, t, c) ||^2 + lambda * ||H(x)||^2
        [+ beta * ||theta_hat - theta_preopt||^2] [+ gamma * L_nn(v)]
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from hypernet import BoundTargets, HyperNetwork, NoiseSchedule, attach_lora
from hypernet.losses import delta_w_l2, denoising_loss, nearest_neighbor_contrastive_loss, trainables_l2, weight_space_loss


@dataclass
class Batch:
    pixels: torch.Tensor  # (B, 3, H, W) in [-1, 1]: the images the denoising loss is computed on
    features: torch.Tensor  # (B, tokens, dim): frozen image-encoder features of the references
    captions: list[str]  # with the placeholder token already filled in
    subject_ids: list[str]
    time_ids: torch.Tensor | None = None  # (B, 6) SDXL size/crop conditioning; None: the backbone's default
    latents: torch.Tensor | None = None  # (B, C, h, w) cached UNet-space latents of ``pixels`` (--cache-latents)


class TokenEmbeddingOverride:
    """Forward hook replacing the placeholder token's input embedding by a per-sample predicted vector."""

    def __init__(self, embedding_module: torch.nn.Embedding, placeholder_id: int):
        self.module, self.placeholder_id = embedding_module, placeholder_id
        self.ids: torch.Tensor | None = None
        self.vectors: torch.Tensor | None = None

    def __call__(self, module, inputs, output):
        mask = (inputs[0] == self.placeholder_id).unsqueeze(-1)
        return torch.where(mask, self.vectors.to(output.dtype).unsqueeze(1), output)

    def attach(self, vectors: torch.Tensor):
        self.vectors = vectors
        return self.module.register_forward_hook(self)


def sample_timesteps(num_timesteps: int, size: int, high_noise_bias: float, generator: torch.Generator) -> torch.Tensor:
    """``size`` training timesteps; the noisier half (``t >= num_timesteps // 2``) is drawn ``high_noise_bias`` times as
    often as the rest. In the noise-prediction loss a sample's identity (what the LoRA carries) shows as an error on
    the clean image scaled by the signal-to-noise ratio, so the noisy steps where layout and colours are decided weigh
    little; drawing them more often gives them more of the gradient."""
    if high_noise_bias == 1.0:  # the plain uniform draw, bit-identical to runs made before the option existed
        return torch.randint(0, num_timesteps, (size,), generator=generator)
    weights = torch.ones(num_timesteps, dtype=torch.float64)
    weights[num_timesteps // 2:] = high_noise_bias
    return torch.multinomial(weights, size, replacement=True, generator=generator)


def real_word_ids(backbone, placeholder_id: int) -> torch.Tensor:
    """Vocabulary rows the nearest-neighbour loss may pick: real words only, not special tokens, the
    placeholder itself, or rows a pruned vocabulary left at zero."""
    tokenizer = backbone.tokenizer
    table = backbone.text_encoder.get_input_embeddings().weight.detach()
    excluded = set(tokenizer.all_special_ids) | {placeholder_id}
    keep = (table.abs().sum(dim=1) > 0).cpu()
    keep[list(excluded)] = False
    return keep.nonzero().flatten()


class HyperNetObjective:
    """Computes the loss of one batch; holds the frozen backbone pieces and the bound target layers."""

    def __init__(self, backbone, unet_targets: BoundTargets, text_targets: BoundTargets | None, config, schedule: NoiseSchedule, preopt: dict | None = None):
        self.backbone, self.config, self.schedule = backbone, config, schedule
        self.unet_modules = unet_targets.modules
        self.text_modules = text_targets.modules if text_targets is not None else {}
        self.preopt = preopt or {}
        tokenizer = backbone.tokenizer
        placeholder_ids = tokenizer(config.placeholder, add_special_tokens=False).input_ids
        if config.token_embedding and backbone.is_sdxl:
            raise ValueError("the predicted token embedding (--token-embedding) is not supported for SDXL's two text encoders yet")
        if config.token_embedding and len(placeholder_ids) != 1:
            raise ValueError(f"placeholder {config.placeholder!r} is {len(placeholder_ids)} tokens; the embedding option needs a single-token placeholder")
        self.placeholder_id = placeholder_ids[0]
        self.embedding_override = TokenEmbeddingOverride(backbone.text_encoder.get_input_embeddings(), self.placeholder_id) if config.token_embedding else None
        self.vocabulary_ids = real_word_ids(backbone, self.placeholder_id) if config.token_embedding and config.nn_weight > 0 else None

    def tokenize(self, captions: list[str], device) -> torch.Tensor:
        return self.backbone.tokenize(captions, device)

    @contextmanager
    def step(self, hypernet: HyperNetwork, batch: Batch, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        """Loss terms of one batch; run backward inside the block. The LoRA hooks stay attached until the
        block ends, because gradient checkpointing re-runs the forward pass during backward."""
        with ExitStack() as hooks:
            yield self._terms(hypernet, batch, generator, hooks)

    def _terms(self, hypernet: HyperNetwork, batch: Batch, generator: torch.Generator, hooks: ExitStack) -> dict[str, torch.Tensor]:
        backbone, config = self.backbone, self.config
        device = batch.pixels.device
        out = hypernet(batch.features)
        size = batch.pixels.shape[0]
        with torch.no_grad():
            latents = batch.latents if batch.latents is not None else backbone.encode_images(batch.pixels)
        noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
        timesteps = sample_timesteps(self.schedule.num_timesteps, size, self.config.timestep_bias, generator).to(device)
        noisy = self.schedule.add_noise(latents, noise, timesteps)
        dropped = torch.rand(size, generator=generator) < config.prompt_dropout
        captions = ["" if drop else caption for caption, drop in zip(batch.captions, dropped.tolist())]

        if self.text_modules:
            hooks.enter_context(attach_lora(self.text_modules, out.lora.restricted_to(self.text_modules)))
        if self.embedding_override is not None:
            hooks.callback(self.embedding_override.attach(out.token_embedding).remove)
        learn_text = bool(self.text_modules) or self.embedding_override is not None
        with torch.set_grad_enabled(learn_text and torch.is_grad_enabled()):  # nothing to learn in a plain text encoder
            conditioning = backbone.encode_prompts(captions, device)
        hooks.enter_context(attach_lora(self.unet_modules, out.lora.restricted_to(self.unet_modules)))
        prediction = backbone.predict_noise(noisy, timesteps, conditioning, batch.time_ids)

        denoise = denoising_loss(prediction, noise).mean()
        reg = (delta_w_l2(out.lora) if config.reg_target == "delta_w" else trainables_l2(out.trainables)).mean()
        loss = denoise + config.reg_weight * reg
        terms = {"denoise": denoise.detach(), "reg": reg.detach()}
        if config.weight_space_weight > 0 and self.preopt:
            known = [i for i, s in enumerate(batch.subject_ids) if s in self.preopt]
            if known:
                targets = {n: torch.stack([self.preopt[batch.subject_ids[i]][n] for i in known]).to(device) for n in out.trainables}
                ws = weight_space_loss({n: p[known] for n, p in out.trainables.items()}, targets).mean()
                loss = loss + config.weight_space_weight * ws
                terms["weight_space"] = ws.detach()
        if self.embedding_override is not None and config.nn_weight > 0 and size > 1:
            vocabulary = backbone.text_encoder.get_input_embeddings().weight.detach()[self.vocabulary_ids.to(device)]
            nn_loss, _ = nearest_neighbor_contrastive_loss(out.token_embedding, vocabulary, config.nn_temperature, groups=batch.subject_ids)
            loss = loss + config.nn_weight * nn_loss
            terms["nn"] = nn_loss.detach()
        terms["loss"] = loss
        return terms


HypernetObjective = HyperNetObjective  # the name ../shared/tools/swap_diagnostic.py imports
