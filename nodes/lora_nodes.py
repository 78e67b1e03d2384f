"""Save Subject LoRA / Apply Subject LoRA."""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from hypernet.files import save_to_free_name, write_safetensors_atomic
from .comfy_bridge import CATEGORY, SUBJECT_LORA_FOLDER, apply_subject_lora


def _checked_prefix(prefix: str) -> str:
    prefix = prefix.strip().replace("\\", "/")
    if not prefix or prefix.startswith("/") or ".." in prefix.split("/"):
        raise ValueError(f"invalid filename prefix {prefix!r}: use a plain name, optionally with sub-folders")
    return prefix


class SaveSubjectLora:
    DESCRIPTION = (
        "Saves a subject LoRA as a standard kohya LoRA in models/loras (the core Load LoRA node, A1111 and diffusers load it) "
        "and, when it came from a LiDB hypernetwork, also the ~100 KB compact form in models/subject_loras. A predicted word "
        "embedding goes inside both and, as a textual-inversion file of the same name, into models/embeddings "
        "(prompts then say embedding:<name>)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "subject_lora": ("LORA_MODEL", {"tooltip": "From Predict Subject LoRA or Rank-Relaxed Finetune."}),
                "filename_prefix": ("STRING", {"default": "subject", "tooltip": "File name prefix; a number is appended, nothing is overwritten."}),
                "save_compact": ("BOOLEAN", {"default": True, "tooltip": "Also write the compact LiDB form (only for unfinetuned hypernetwork predictions)."}),
            }
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("The saved file's name as the Load LoRA node lists it.",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = f"{CATEGORY}/lora"

    def save(self, subject_lora, filename_prefix, save_compact):
        # <prefix>_00001.safetensors, the first number not taken; safe against two saves at once
        loras_dir = folder_paths.get_folder_paths("loras")[0]
        prefix = _checked_prefix(filename_prefix)
        subject = getattr(subject_lora, "subject", None)
        if subject is not None:
            written = [save_to_free_name(loras_dir, prefix, ".safetensors", subject.save)]
            if save_compact and subject.can_save_compact:
                compact_dir = folder_paths.get_folder_paths(SUBJECT_LORA_FOLDER)[0]
                written.append(save_to_free_name(compact_dir, prefix, ".compact.safetensors", subject.save_compact))
            if subject.embedding is not None:  # same name as the LoRA, so "embedding:<lora name>" finds it
                embeddings_dir = Path(folder_paths.get_folder_paths("embeddings")[0])
                target = embeddings_dir / os.path.relpath(written[0], loras_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists():  # never replace another embedding: take the next free name instead
                    written.append(save_to_free_name(embeddings_dir, prefix, ".safetensors", subject.save_embedding))
                else:
                    written.append(subject.save_embedding(target))
        else:  # a LORA_MODEL from elsewhere: write its kohya dict as is
            written = [save_to_free_name(loras_dir, prefix, ".safetensors", lambda path: write_safetensors_atomic(dict(subject_lora), {"format": "kohya"}, path))]
        name = os.path.relpath(written[0], loras_dir)
        return {"ui": {"text": [str(p) for p in written]}, "result": (name,)}


class ApplySubjectLora:
    DESCRIPTION = "Applies a LORA_MODEL to MODEL and CLIP exactly as the core LoRA loader applies a file."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base model."}),
                "subject_lora": ("LORA_MODEL", {"tooltip": "The subject LoRA."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "Strength on the diffusion model."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The CLIP, when the LoRA adapts the text encoder."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "Strength on the text encoder."}),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The adapted model.", "The adapted CLIP (None if no CLIP was connected).")
    FUNCTION = "apply"
    CATEGORY = f"{CATEGORY}/lora"

    def apply(self, model, subject_lora, strength_model, clip=None, strength_clip=1.0):
        return apply_subject_lora(model, clip, subject_lora, strength_model, strength_clip if clip is not None else 0.0)
