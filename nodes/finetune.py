"""Rank-Relaxed Finetune: sharpen a predicted subject LoRA with a few dozen denoising steps on the image(s)."""

from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.utils

from hypernet import FinetuneConfig, NoiseSchedule, SubjectLora, locate_targets, rank_relaxed_finetune
from hypernet.lora import LoraWeights
from hypernet.schedule import eps_from_denoised
from .comfy_bridge import CATEGORY, apply_subject_lora, as_rgb, check_lora_fits, subject_lora_for_comfy, model_family

log = logging.getLogger("subject_hypernet")


def trainable_copy_of_weights(module: torch.nn.Module) -> None:
    # Weights loaded by the executor are inference tensors, which autograd cannot save for backward.
    # Equal-valued ordinary tensors replace them (the values, and so the shared model, do not change).
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if param.is_inference():
                setattr(sub, name, torch.nn.Parameter(param.detach().clone(), requires_grad=False))
            else:
                param.requires_grad_(False)


def model_conds(base_model, positive, latents: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """The model inputs a prompt becomes, by ComfyUI's own ``extra_conds`` (SDXL: the pooled embedding and the size
    conditioning as ``y``), with the defaults its samplers use: the latent's pixel size, uncropped."""
    cond, options = positive[0][0], dict(positive[0][1])
    options.setdefault("width", latents.shape[-1] * 8)
    options.setdefault("height", latents.shape[-2] * 8)
    extra = base_model.extra_conds(**{**options, "cross_attn": cond.detach().clone().to(device), "noise": latents, "device": device})
    return {name: value.cond.detach().clone().to(device) for name, value in extra.items()}


def eps_denoiser(base_model, conds: dict[str, torch.Tensor], schedule: NoiseSchedule):
    """ComfyUI predicts denoised x0 from ``x0 + sigma * eps`` at noise level sigma; the loop wants eps at DDPM x_t."""

    def denoiser(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x, sigma = schedule.to_sigma_space(x_t, t)
        batch = {name: value.expand(x_t.shape[0], *value.shape[1:]) for name, value in conds.items()}
        return eps_from_denoised(x, base_model.apply_model(x, sigma.flatten(), **batch), sigma)

    return denoiser


class RankRelaxedFinetune:
    DESCRIPTION = (
        "Fast finetune (HyperDreamBooth): keeps the predicted LoRA, trains a fresh higher-rank LoRA on top for a few "
        "dozen steps on the subject image(s), and returns both merged into one LoRA. The input model is not changed."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The BASE model (not the Predict node's output, which already has the LoRA)."}),
                "subject_lora": ("LORA_MODEL", {"tooltip": "The predicted subject LoRA."}),
                "image": ("IMAGE", {"tooltip": "The subject image(s) to tune on."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE, to encode the images."}),
                "positive": ("CONDITIONING", {"tooltip": "The training prompt, e.g. 'a photo of sks dog', encoded with the subject CLIP."}),
                "steps": ("INT", {"default": 40, "min": 1, "max": 2000, "tooltip": "Training steps (the paper uses 40)."}),
                "rank": ("INT", {"default": 4, "min": 1, "max": 128, "tooltip": "Rank of the fresh LoRA trained on top of the prediction."}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-5, "round": 1e-7, "tooltip": "AdamW learning rate."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Seed for noise and timesteps."}),
            }
        }

    RETURN_TYPES = ("MODEL", "LORA_MODEL")
    RETURN_NAMES = ("model", "subject_lora")
    OUTPUT_TOOLTIPS = ("The base model with the finetuned subject LoRA applied.", "Predicted + learned LoRA merged (rank <= 1 + rank).")
    FUNCTION = "finetune"
    CATEGORY = CATEGORY

    def finetune(self, model, subject_lora, image, vae, positive, steps, rank, learning_rate, seed):
        lora = check_lora_fits(subject_lora, model)
        latents = model.model.process_latent_in(vae.encode(as_rgb(image)))
        progress = comfy.utils.ProgressBar(steps)

        def on_step(step: int, loss: float) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update(1)

        with torch.inference_mode(False), torch.enable_grad():
            work = model.clone()
            comfy.model_management.load_models_gpu([work], force_full_load=True)
            device = work.load_device
            diffusion_model = work.model.diffusion_model
            trainable_copy_of_weights(diffusion_model)
            targets = locate_targets(diffusion_model)
            sampling = work.get_model_object("model_sampling")
            schedule = NoiseSchedule.from_sigmas(sampling.sigmas.detach().clone().float().cpu())
            config = FinetuneConfig(steps=steps, rank=rank, learning_rate=learning_rate, seed=seed)
            result = rank_relaxed_finetune(
                targets.modules, lora.restricted_to(targets.modules).clone(), latents.detach().clone().to(device),
                eps_denoiser(work.model, model_conds(work.model, positive, latents.detach().clone().to(device), device), schedule), schedule, config, on_step,
            )
        merged = with_text_encoder_part(result.lora, lora)
        source = getattr(subject_lora, "subject", None)
        subject = SubjectLora(
            layers=source.layers if source is not None else _layers_of(merged),
            lora=merged,
            base_arch=source.base_arch if source is not None else model_family(model)[0],  # tuned on this model
            provenance={**(source.provenance if source is not None else {}),
                        "finetune": {"steps": steps, "rank": rank, "learning_rate": learning_rate, "seed": seed,
                                     "final_loss": result.losses[-1] if result.losses else None}},
            token_embedding=source.token_embedding if source is not None else None,  # the word still means the subject
            placeholder=source.placeholder if source is not None else "sks",
        )
        tuned_lora = subject_lora_for_comfy(subject)
        new_model, _ = apply_subject_lora(model, None, tuned_lora, 1.0, 0.0)
        return (new_model, tuned_lora)


def with_text_encoder_part(unet_lora: LoraWeights, original: LoraWeights) -> LoraWeights:
    # Conditioning arrives pre-encoded, so text-encoder layers are not tuned; keep their predicted values.
    down, up = {}, {}
    for name in original.names:
        source = unet_lora if name in unet_lora.down else original
        down[name], up[name] = source.down[name], source.up[name]
    return LoraWeights(down, up)


def _layers_of(lora: LoraWeights):
    from hypernet.targets import TargetLayer

    return [TargetLayer(n, lora.down[n].shape[-1], lora.up[n].shape[-2]) for n in lora.names]
