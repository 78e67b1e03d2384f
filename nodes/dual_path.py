"""Subject Dual-Path: a MODEL whose attention branches blend the subject model with the base model reading the nearest word.

Why a MODEL clone with a ``DIFFUSION_MODEL`` wrapper: a MODEL goes into every core sampler (KSampler, CFGGuider,
SamplerCustomAdvanced, ...), where a guider would replace the user's sampler choice. Of ComfyUI's ways to change a
MODEL, the wrapper (``comfy.patcher_extension``) is the one that composes: any number of nodes can add one, while
``model_function_wrapper`` has one slot (HM-CFG's batched path, other packs use it) and an attn1/attn2 replace patch
takes a block's slot from e.g. IPAdapter and only sees q, k, v already projected with the LoRA in. The wrapper sees
the context as cross-attention reads it and ``transformer_options["cond_or_uncond"]``, which rows of the batch are
the positive prompt: those read the hard prompt on the vanilla path, every other row (the negative) its own context.
Weight patches (how Predict applies the LoRA) cannot be off for one call and on for the next, so the subject LoRA is
added in activation space with a per-sample gate, as HM-CFG's batched path does: the input MODEL is the base model.
"""

from __future__ import annotations

import logging

import comfy.patcher_extension
from comfy.ldm.modules.attention import CrossAttention

from hypernet.dual_path import attach_dual_path, vanilla_context
from hypernet.errors import HyperNetError
from hypernet.runtime import attach_lora
from .comfy_bridge import CATEGORY, check_lora_fits, model_targets

log = logging.getLogger("subject_hypernet")
WRAPPER_KEY = "subject_hypernet_dual_path"


class DualPathWrapper:
    """Around each diffusion-model call: the subject LoRA on every row, each attention branch run again with the LoRA
    off (and, for cross-attention, the hard prompt on the positive rows), outputs blended ``alpha``."""

    def __init__(self, lora, modules: dict, attention: dict, hard_prompt, alpha: float, strength: float):
        self.lora, self.modules, self.attention = lora, modules, attention
        self.hard_prompt, self.alpha, self.strength = hard_prompt, alpha, strength
        self._on_device: dict = {}

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        if x.device not in self._on_device:
            self._on_device = {x.device: self.lora.to(x.device)}
        chunks = transformer_options.get("cond_or_uncond") or []  # index 0: the positive conditioning
        hard = vanilla_context(context, [index == 0 for index in chunks], self.hard_prompt) if chunks and context is not None else context
        gate = x.new_full((x.shape[0],), self.strength)

        def vanilla(module, args, call_kwargs):
            swapped = dict(call_kwargs)
            for name in ("context", "value"):  # the branch reads the prompt (cross-attention): the hard prompt instead
                if call_kwargs.get(name) is context and context is not None:
                    swapped[name] = hard
            gate.zero_()
            try:
                return module(*args, **swapped)
            finally:
                gate.fill_(self.strength)

        with attach_lora(self.modules, self._on_device[x.device], strength=gate), attach_dual_path(self.attention, self.alpha, vanilla):
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


def dual_path_model(model, subject_lora, vanilla_positive, alpha: float, strength: float = 1.0):
    """A clone of ``model`` sampling with dual-path blending; ``model`` itself is not changed."""
    lora = check_lora_fits(subject_lora, model)
    hard_prompt = vanilla_positive[0][0]
    if len(vanilla_positive) > 1:
        log.warning("Subject Dual-Path: vanilla_positive has %d entries; the first one is the hard prompt", len(vanilla_positive))
    width = model.model.model_config.unet_config.get("context_dim")
    if width is not None and hard_prompt.shape[-1] != width:
        raise HyperNetError(f"vanilla_positive is {hard_prompt.shape[-1]} wide, this MODEL's cross-attention reads {width}: "
                            "encode it with this checkpoint's CLIP (Subject Prompt Encode's 'positive' output)")
    diffusion_model = model.model.diffusion_model
    targets = model_targets(model)
    attention = {name: module for name, module in diffusion_model.named_modules() if isinstance(module, CrossAttention)}
    patched = model.clone()
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)  # a second Dual-Path replaces the first
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                 DualPathWrapper(lora.restricted_to(targets.modules), targets.modules, attention, hard_prompt, float(alpha), float(strength)))
    return patched


class SubjectDualPath:
    DESCRIPTION = (
        "Dual-path blending: every attention layer runs twice, on the subject model (subject LoRA, the prompt with the subject's "
        "word embedding) and on the base model reading the prompt with the nearest real word, and outputs "
        "alpha * subject + (1 - alpha) * base. Gives a MODEL for KSampler or any sampler; feed it the subject prompt "
        "(Subject Prompt Encode's subject_positive)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The BASE model (not Predict's output): this node adds the subject LoRA itself, so it can switch it off on the base path."}),
                "subject_lora": ("LORA_MODEL", {"tooltip": "The subject LoRA from Predict Subject LoRA, Rank-Relaxed Finetune or a loaded one."}),
                "vanilla_positive": ("CONDITIONING", {"tooltip": "The prompt with the subject's word as its nearest real word, through the checkpoint's CLIP "
                                                                 "(Subject Prompt Encode's 'positive'). The negative prompt's rows keep the negative."}),
                "alpha": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "1 = the subject model alone, 0 = the base model reading the nearest word."}),
            },
            "optional": {
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "Subject LoRA strength on the subject path."}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with dual-path blending; sample it with the subject prompt as positive.",)
    FUNCTION = "patch"
    CATEGORY = f"{CATEGORY}/sampling"

    def patch(self, model, subject_lora, vanilla_positive, alpha, strength=1.0):
        return (dual_path_model(model, subject_lora, vanilla_positive, alpha, strength),)
