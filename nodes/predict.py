"""Predict Subject LoRA: reference image(s) -> LoRA in one hypernetwork forward pass."""

from __future__ import annotations

import comfy.model_management

from hypernet import predict_subject_lora
from .comfy_bridge import CATEGORY, apply_subject_lora, check_hypernet_fits, clip_vision_features, subject_lora_for_comfy


class PredictSubjectLora:
    DESCRIPTION = (
        "Personalises a model to the subject in the image(s) without training: the hypernetwork predicts a LoRA "
        "from CLIP-vision features. Several images in the batch are treated as views of one subject."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "hypernet": ("SUBJECT_HYPERNET", {"tooltip": "From Load HyperNet."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "The CLIP vision model the hypernetwork was trained with (its info says which)."}),
                "image": ("IMAGE", {"tooltip": "One or more reference images of ONE subject; any size, RGB, RGBA or grayscale."}),
                "model": ("MODEL", {"tooltip": "The base model the hypernetwork was trained for."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "LoRA strength on the diffusion model."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP; needed when the hypernetwork adapts the text encoder."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "LoRA strength on the text encoder."}),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP", "LORA_MODEL")
    RETURN_NAMES = ("model", "clip", "subject_lora")
    OUTPUT_TOOLTIPS = (
        "The model with the subject LoRA applied.",
        "The CLIP with the subject LoRA applied (unchanged if none was connected).",
        "The subject LoRA itself: save it, finetune it, or use it in HM-CFG.",
    )
    FUNCTION = "predict"
    CATEGORY = CATEGORY

    def predict(self, hypernet, clip_vision, image, model, strength_model, clip=None, strength_clip=1.0):
        check_hypernet_fits(hypernet, model, clip)
        features = clip_vision_features(clip_vision, image, hypernet.module.config.features.hidden_state)
        with hypernet.lock:
            hypernet.module.to(comfy.model_management.get_torch_device())
            try:
                subject = predict_subject_lora(hypernet.module, features, hypernet.info)
            finally:  # back to the offload device also when the prediction fails
                hypernet.module.to(comfy.model_management.unet_offload_device())
        subject_lora = subject_lora_for_comfy(subject)
        new_model, new_clip = apply_subject_lora(model, clip, subject_lora, strength_model, strength_clip if clip is not None else 0.0)
        return (new_model, new_clip if clip is not None else None, subject_lora)
