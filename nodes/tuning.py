"""Subject Tuning: the tuning encoder's few-step tuning of the predicted word embedding and the subject LoRA."""

from __future__ import annotations

import torch

import comfy.model_management
import comfy.utils

from ..hypernet import NoiseSchedule, SubjectLora, TuningConfig, locate_targets, tune_subject
from ..hypernet.errors import HyperNetError
from ..hypernet.words import single_token_id
from .comfy_bridge import CATEGORY, apply_lora_model, as_rgb, check_lora_fits, lora_model_from_subject, unet_part
from .finetune import _eps_denoiser, _model_conds, _trainable_copy_of_weights, _with_text_encoder_part
from .prompt import _sd_tokenizer, _swap_token


class SubjectTuning:
    DESCRIPTION = (
        "The tuning encoder's inference-time step: the subject's predicted word embedding and its LoRA (diffusion-model "
        "part) tuned together for a few steps (12) on the image(s), the embedding kept near a real word. The inputs are not changed."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The BASE model (not the Predict node's output, which already has the LoRA)."}),
                "clip": ("CLIP", {"tooltip": "The subject-adapted CLIP (Predict Subject LoRA's clip output)."}),
                "subject_lora": ("LORA_MODEL", {"tooltip": "From Predict Subject LoRA, with a word embedding."}),
                "image": ("IMAGE", {"tooltip": "The subject image(s) to tune on."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE, to encode the images."}),
                "text": ("STRING", {"default": "a photo of sks toy", "tooltip": "The training prompt; the subject's word marks the subject."}),
                "steps": ("INT", {"default": 12, "min": 1, "max": 500, "tooltip": "Tuning steps (the tuning encoder uses a handful)."}),
                "learning_rate": ("FLOAT", {"default": 1e-3, "min": 1e-7, "max": 1.0, "step": 1e-5, "round": 1e-7, "tooltip": "Adam learning rate."}),
                "nn_weight": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": "Pull of the embedding toward its nearest real word."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Seed for noise and timesteps."}),
            }
        }

    RETURN_TYPES = ("MODEL", "LORA_MODEL")
    RETURN_NAMES = ("model", "subject_lora")
    OUTPUT_TOOLTIPS = ("The base model with the tuned subject LoRA applied.", "The tuned subject LoRA, carrying the tuned word embedding.")
    FUNCTION = "tune"
    CATEGORY = CATEGORY

    def tune(self, model, clip, subject_lora, image, vae, text, steps, learning_rate, nn_weight, seed):
        source = getattr(subject_lora, "subject", None)
        embedding = source.embedding if source is not None else None
        if embedding is None:
            raise HyperNetError("this subject LoRA has no word embedding (its hypernetwork was trained without --token-embedding); "
                                "use Rank-Relaxed Finetune instead")
        lora = check_lora_fits(subject_lora, model)
        tokenizer, key = _sd_tokenizer(clip)
        placeholder_id = single_token_id(tokenizer.tokenizer(embedding.word)["input_ids"][1:-1], embedding.word)
        if _swap_token(clip.tokenize(text), key, placeholder_id, placeholder_id)[1] == 0:
            raise HyperNetError(f"the prompt does not contain the subject's word {embedding.word!r}, e.g. 'a photo of {embedding.word} toy'")
        latents = model.model.process_latent_in(vae.encode(as_rgb(image)))
        progress = comfy.utils.ProgressBar(steps)

        def on_step(step: int, loss: float) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update(1)

        with torch.inference_mode(False), torch.enable_grad():
            work = model.clone()
            comfy.model_management.load_models_gpu([work], force_full_load=True)
            device = work.load_device
            _trainable_copy_of_weights(work.model.diffusion_model)
            clip.load_model()
            _trainable_copy_of_weights(clip.cond_stage_model)  # equal values; autograd must pass through the text encoder
            targets = locate_targets(work.model.diffusion_model)
            sampling = work.get_model_object("model_sampling")
            schedule = NoiseSchedule(1.0 / (1.0 + sampling.sigmas.detach().clone().float().cpu() ** 2))
            x0 = latents.detach().clone().to(device)
            table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.detach().float()
            real = table.abs().sum(dim=-1) > 0
            real[list(set(tokenizer.tokenizer.all_special_ids) | {placeholder_id})] = False
            base = _model_conds(work.model, clip.encode_from_tokens_scheduled(clip.tokenize(text)), x0, device)

            def denoiser(x_t, t, vectors):
                tokens = _swap_token(clip.tokenize(text), key, placeholder_id, vectors[0])[0]  # one subject: one vector
                cond = clip.encode_from_tokens(tokens).to(device)
                return _eps_denoiser(work.model, {**base, "c_crossattn": cond}, schedule)(x_t, t)

            result = tune_subject(targets.modules, unet_part(lora, targets.modules).clone(), embedding.vectors[0], table[real], x0, denoiser, schedule,
                                  TuningConfig(steps=steps, learning_rate=learning_rate, nn_weight=nn_weight, seed=seed), on_step)
        subject = SubjectLora(
            layers=source.layers, lora=_with_text_encoder_part(result.lora, lora), base_arch=source.base_arch,
            provenance={**source.provenance, "tuning": {"steps": steps, "learning_rate": learning_rate, "nn_weight": nn_weight, "seed": seed,
                                                        "final_loss": result.losses[-1] if result.losses else None}},
            token_embedding=result.embeddings, placeholder=embedding.word,
        )
        lora_model = lora_model_from_subject(subject)
        new_model, _ = apply_lora_model(model, None, lora_model, 1.0, 0.0)
        return (new_model, lora_model)
