"""Subject Tuning: the tuning encoder's few-step tuning of the predicted word embedding and the subject LoRA."""

from __future__ import annotations

from contextlib import contextmanager

import torch

import comfy.model_management
import comfy.utils

from hypernet import NoiseSchedule, SubjectLora, TuningConfig, locate_targets, tune_subject
from hypernet.errors import HyperNetError
from hypernet.words import single_token_id
from .comfy_bridge import CATEGORY, apply_subject_lora, as_rgb, check_lora_fits, subject_lora_for_comfy
from .finetune import eps_denoiser, model_conds, trainable_copy_of_weights, with_text_encoder_part
from .prompt import sd_tokenizer, swap_token


@contextmanager
def backward_through_inplace_residuals():
    """Lets autograd differentiate ComfyUI's CLIP text model, which adds to its residual stream in place.

    ``comfy/clip_model.py`` computes ``x += self.mlp(self.layer_norm2(x))``: layer_norm2 saved ``x`` for backward, and
    the in-place add then changes it, so ``backward()`` refuses ("a variable needed for gradient computation has been
    modified by an inplace operation") and no gradient reaches the word embedding. While this is active, every tensor
    autograd saves that itself needs a gradient is saved as a copy, which the later in-place add cannot touch: the
    forward values are unchanged and the gradient is the one of the same model written out of place (tested against
    the trainer's text encoder). Frozen weights are not copied; the cost is one copy of the text encoder's activations.
    """
    with torch.autograd.graph.saved_tensors_hooks(lambda saved: saved.clone() if saved.requires_grad else saved, lambda saved: saved):
        yield


def word_denoiser(work, clip, text: str, word: str, latents: torch.Tensor):
    """ComfyUI's own MODEL and CLIP as the tuning loop's ``denoiser(x_t, t, vectors) -> eps``: ``text`` re-encoded by
    ``clip`` with ``word`` as the vector (ComfyUI inserts tensors in token lists as embeddings). Also the real words of
    the CLIP's vocabulary (for the pull toward the nearest one) and the model's noise schedule.
    ``work``: a clone of the MODEL, loaded, with trainable copies of its weights; ``clip``'s weights likewise."""
    tokenizer, key = sd_tokenizer(clip)
    placeholder_id = single_token_id(tokenizer.tokenizer(word)["input_ids"][1:-1], word)
    if swap_token(clip.tokenize(text), key, placeholder_id, placeholder_id)[1] == 0:
        raise HyperNetError(f"the prompt does not contain the subject's word {word!r}; write it where the subject goes, e.g. 'a photo of {word} toy'")
    device = work.load_device
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.detach().float()
    real = table.abs().sum(dim=-1) > 0  # a pruned vocabulary has zero rows
    real[list(set(tokenizer.tokenizer.all_special_ids) | {placeholder_id})] = False
    sigmas = work.get_model_object("model_sampling").sigmas.detach().clone().float().cpu()
    schedule = NoiseSchedule.from_sigmas(sigmas)
    conds = model_conds(work.model, clip.encode_from_tokens_scheduled(clip.tokenize(text)), latents, device)

    def denoiser(x_t: torch.Tensor, t: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        tokens = swap_token(clip.tokenize(text), key, placeholder_id, vectors[0])[0]  # one subject: one vector
        with backward_through_inplace_residuals():
            cond = clip.encode_from_tokens(tokens).to(device)
        return eps_denoiser(work.model, {**conds, "c_crossattn": cond}, schedule)(x_t, t)

    return denoiser, table[real], schedule


def trainable_clone(model, clip):
    """A loaded clone of ``model`` and the loaded ``clip``, their weights as equal-valued tensors autograd can save
    (the values, and so the inputs, do not change). Call inside ``torch.inference_mode(False)``."""
    work = model.clone()
    comfy.model_management.load_models_gpu([work], force_full_load=True)
    trainable_copy_of_weights(work.model.diffusion_model)
    clip.load_model()
    trainable_copy_of_weights(clip.cond_stage_model)
    return work


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
                "subject_lora": ("LORA_MODEL", {"tooltip": "From Predict Subject LoRA, with a word embedding (a hypernetwork trained with --token-embedding)."}),
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
    OUTPUT_TOOLTIPS = ("The base model with the tuned subject LoRA applied.",
                       "The tuned subject LoRA, carrying the tuned word embedding (for Subject Prompt Encode, HM-CFG, Save Subject LoRA).")
    FUNCTION = "tune"
    CATEGORY = CATEGORY

    def tune(self, model, clip, subject_lora, image, vae, text, steps, learning_rate, nn_weight, seed):
        source = getattr(subject_lora, "subject", None)
        embedding = source.embedding if source is not None else None
        if embedding is None:
            raise HyperNetError("this subject LoRA has no word embedding (its hypernetwork was trained without --token-embedding); "
                                "use Rank-Relaxed Finetune instead")
        lora = check_lora_fits(subject_lora, model)
        latents = model.model.process_latent_in(vae.encode(as_rgb(image)))
        progress = comfy.utils.ProgressBar(steps)

        def on_step(step: int, loss: float) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update(1)

        with torch.inference_mode(False), torch.enable_grad():
            work = trainable_clone(model, clip)
            x0 = latents.detach().clone().to(work.load_device)
            denoiser, vocabulary, schedule = word_denoiser(work, clip, text, embedding.word, x0)
            targets = locate_targets(work.model.diffusion_model)
            config = TuningConfig(steps=steps, learning_rate=learning_rate, nn_weight=nn_weight, seed=seed)
            result = tune_subject(targets.modules, lora.restricted_to(targets.modules).clone(), embedding.vectors[0], vocabulary, x0,
                                  denoiser, schedule, config, on_step)
        subject = SubjectLora(
            layers=source.layers, lora=with_text_encoder_part(result.lora, lora), base_arch=source.base_arch,
            provenance={**source.provenance, "tuning": {"steps": steps, "learning_rate": learning_rate, "nn_weight": nn_weight, "seed": seed,
                                                        "final_loss": result.losses[-1] if result.losses else None}},
            token_embedding=result.embeddings, placeholder=embedding.word,
        )
        tuned_lora = subject_lora_for_comfy(subject)
        new_model, _ = apply_subject_lora(model, None, tuned_lora, 1.0, 0.0)
        return (new_model, tuned_lora)
