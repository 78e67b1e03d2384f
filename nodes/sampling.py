"""HM-CFG Guider / HM-CFG KSampler: base model for composition, subject LoRA for identity, every step."""

from __future__ import annotations

import comfy.hooks
import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from hypernet.guidance import hm_cfg, sigma_in_subject_window
from hypernet.runtime import attach_lora
from .comfy_bridge import CATEGORY, check_lora_fits, lora_weights_of, model_targets, unet_keys

IMPLEMENTATIONS = ["auto", "comfy_hooks", "batched"]


class HMCFGGuider(comfy.samplers.CFGGuider):
    """``negative``/``positive`` run through the base model, ``subject`` through the LoRA-adapted one.

    ``comfy_hooks``: the subject LoRA rides on the subject conditioning as a ComfyUI weight hook (the
    core mechanism; the hooked prediction equals a LoRA-merged model). ``batched``: all three
    predictions in one UNet call, the LoRA added in activation space with a per-sample gate. ``auto``: batched
    unless another node already wraps the model function (the two cannot both wrap it), then comfy_hooks.
    """

    def __init__(self, model_patcher, subject_lora: dict, strength: float, implementation: str):
        super().__init__(model_patcher)
        if implementation == "auto":
            implementation = "comfy_hooks" if self.model_options.get("model_function_wrapper") is not None else "batched"
        self.subject_lora, self.strength, self.implementation = subject_lora, strength, implementation
        self.cfg_subject, self.subject_sigma_start, self.subject_sigma_end = 0.0, float("inf"), 0.0  # set_cfg sets the real ones
        self._unet_lora = None  # batched: the LoRA's diffusion-model part and its modules, bound at the first gated call
        self._unet_modules: dict = {}

    def set_conds(self, positive, negative, subject_positive):
        if self.implementation == "comfy_hooks":
            hooks = comfy.hooks.create_hook_lora(unet_keys(self.subject_lora), self.strength, 0.0)  # the subject prompt arrives encoded
            subject_positive = comfy.hooks.set_hooks_for_conditioning(subject_positive, hooks)
        self.inner_set_conds({"positive": positive, "negative": negative, "subject": subject_positive})

    def set_cfg(self, cfg_text: float, cfg_subject: float, subject_start: float, subject_end: float):
        self.cfg, self.cfg_subject = cfg_text, cfg_subject
        sampling = self.model_patcher.get_model_object("model_sampling")
        self.subject_sigma_start, self.subject_sigma_end = sampling.percent_to_sigma(subject_start), sampling.percent_to_sigma(subject_end)
        if self.implementation == "batched":
            self.model_options = comfy.model_patcher.create_model_options_clone(self.model_options)
            if self.model_options.get("model_function_wrapper") is not None:
                raise RuntimeError("another node already wraps the model function; use implementation 'comfy_hooks'")
            self.model_options["model_function_wrapper"] = self._gated_apply_model

    def _gated_apply_model(self, apply_model, args):
        # cond_or_uncond holds, per chunk of the batch, the index of its conditioning in calc_cond_batch's list
        x, chunks = args["input"], args["cond_or_uncond"]
        per_chunk = x.shape[0] // len(chunks)
        gate = x.new_tensor([float(self.strength if index == 2 else 0.0) for index in chunks]).repeat_interleave(per_chunk)
        if not bool(gate.any()):
            return apply_model(x, args["timestep"], **args["c"])
        if self._unet_lora is None:
            targets = model_targets(self.model_patcher)
            lora = lora_weights_of(self.subject_lora)
            self._unet_modules = targets.modules
            self._unet_lora = lora.restricted_to(targets.modules).to(x.device)
        with attach_lora(self._unet_modules, self._unet_lora, strength=gate):
            return apply_model(x, args["timestep"], **args["c"])

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        active = sigma_in_subject_window(float(timestep.flatten()[0]), self.subject_sigma_start, self.subject_sigma_end) and self.cfg_subject != 0
        conds = [self.conds.get("negative"), self.conds.get("positive")]
        if active:
            conds.append(self.conds.get("subject"))
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        uncond_pred, cond_pred = out[0], out[1]
        base_conds = [self.conds.get("positive"), self.conds.get("negative")]
        for fn in model_options.get("sampler_pre_cfg_function", []):  # as the core sampling_function calls them: cond first
            cond_pred, uncond_pred = fn({"conds": base_conds, "conds_out": [cond_pred, uncond_pred], "cond_scale": self.cfg, "timestep": timestep,
                                         "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options})
        # HM-CFG is CFG on an effective positive prediction: uncond + s (cond_eff - uncond) equals the formula, so the
        # result goes through ComfyUI's cfg_function, where sampler_cfg_function (RescaleCFG, ...) and post-CFG patches apply
        scale = self.cfg if self.cfg != 0 else 1.0
        combined = hm_cfg(uncond_pred, cond_pred, out[2] if active else None, self.cfg, self.cfg_subject)
        cond_effective = cond_pred if not active and self.cfg != 0 else uncond_pred + (combined - uncond_pred) / scale
        return comfy.samplers.cfg_function(self.inner_model, cond_effective, uncond_pred, scale, x, timestep, model_options=model_options,
                                           cond=base_conds[0], uncond=base_conds[1])


def _guider_inputs():
    return {
        "model": ("MODEL", {"tooltip": "The BASE model (not the Predict node's output)."}),
        "subject_lora": ("LORA_MODEL", {"tooltip": "The subject LoRA from Predict Subject LoRA or Rank-Relaxed Finetune."}),
        "positive": ("CONDITIONING", {"tooltip": "The prompt, encoded with the base CLIP."}),
        "negative": ("CONDITIONING", {"tooltip": "The negative prompt."}),
        "cfg_text": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip": "Prompt guidance on the base model (like KSampler's cfg)."}),
        "cfg_subject": ("FLOAT", {"default": 2.0, "min": -10.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "How strongly the subject model pulls away from the base model. 0 = base model only."}),
        "subject_start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Fraction of the schedule where the subject term starts."}),
        "subject_end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Fraction of the schedule where the subject term ends."}),
    }


_OPTIONAL = {
    "subject_positive": ("CONDITIONING", {"tooltip": "The prompt encoded with the subject-adapted CLIP (Predict's CLIP output). Defaults to 'positive'."}),
    "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "Subject LoRA strength inside the subject model."}),
    "implementation": (IMPLEMENTATIONS, {"default": "auto", "tooltip": "auto: batched (fastest) unless another node wraps the model function, then comfy_hooks."}),
}


def make_guider(model, subject_lora, positive, negative, cfg_text, cfg_subject, subject_start, subject_end, subject_positive=None, strength=1.0, implementation="auto"):
    if subject_start > subject_end:
        raise ValueError(f"subject_start ({subject_start}) must not be after subject_end ({subject_end})")
    check_lora_fits(subject_lora, model)
    guider = HMCFGGuider(model, subject_lora, strength, implementation)
    guider.set_conds(positive, negative, subject_positive if subject_positive is not None else positive)
    guider.set_cfg(cfg_text, cfg_subject, subject_start, subject_end)
    return guider


class HMCFGGuiderNode:
    DESCRIPTION = "HM-CFG as a GUIDER for SamplerCustomAdvanced: base(uncond) + cfg_text*(base(cond)-base(uncond)) + cfg_subject*(subject(cond)-base(cond))."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": _guider_inputs(), "optional": dict(_OPTIONAL)}

    RETURN_TYPES = ("GUIDER",)
    OUTPUT_TOOLTIPS = ("Connect to SamplerCustomAdvanced.",)
    FUNCTION = "get_guider"
    CATEGORY = f"{CATEGORY}/sampling"

    def get_guider(self, **kwargs):
        return (make_guider(**kwargs),)


class HMCFGKSampler:
    DESCRIPTION = "KSampler with hybrid-model guidance: keeps the base model's prompt adherence while adding the subject."

    @classmethod
    def INPUT_TYPES(cls):
        required = _guider_inputs()
        required.update(
            {
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True, "tooltip": "Noise seed."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Sampling steps."}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "Sampling algorithm."}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "Noise schedule."}),
                "latent_image": ("LATENT", {"tooltip": "The latent to denoise."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Amount of denoising (1.0 = from pure noise)."}),
            }
        )
        return {"required": required, "optional": dict(_OPTIONAL)}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"
    CATEGORY = f"{CATEGORY}/sampling"

    def sample(self, seed, steps, sampler_name, scheduler, latent_image, denoise, **guider_kwargs):
        guider = make_guider(**guider_kwargs)
        model = guider_kwargs["model"]
        latent = latent_image.copy()
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
        sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name, scheduler=scheduler, denoise=denoise,
                                         model_options=model.model_options).sigmas
        callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
        result = guider.sample(
            noise, samples, comfy.samplers.sampler_object(sampler_name), sigmas,
            denoise_mask=latent.get("noise_mask"), callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
        )
        latent["samples"] = result.to(comfy.model_management.intermediate_device())
        return (latent,)
