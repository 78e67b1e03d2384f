"""Load HyperNet / Load Subject LoRA (compact)."""

from __future__ import annotations

import folder_paths

from ..hypernet import load_hypernet
from ..hypernet.files import load_compact_subject_lora
from ..hypernet.subject import SubjectLora
from .comfy_bridge import CATEGORY, HYPERNET_FOLDER, SUBJECT_LORA_FOLDER, lora_model_from_subject


class LoadSubjectHyperNet:
    DESCRIPTION = "Loads a subject hypernetwork (.safetensors from models/hypernets) and shows what it was trained for."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"hypernet_name": (folder_paths.get_filename_list(HYPERNET_FOLDER), {"tooltip": "A hypernetwork file in models/hypernets."})}}

    RETURN_TYPES = ("SUBJECT_HYPERNET", "STRING")
    RETURN_NAMES = ("hypernet", "info")
    OUTPUT_TOOLTIPS = ("The hypernetwork, for Predict Subject LoRA.", "Base model, target layers and image features this file expects.")
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/loaders"

    def load(self, hypernet_name):
        hypernet, info = load_hypernet(folder_paths.get_full_path_or_raise(HYPERNET_FOLDER, hypernet_name))
        hypernet.info = info
        return {"ui": {"text": [info.summary()]}, "result": (hypernet, info.summary())}


class LoadCompactSubjectLora:
    DESCRIPTION = "Loads a compact subject LoRA (LiDB numbers, ~100 KB) from models/subject_loras and expands it exactly."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora_name": (folder_paths.get_filename_list(SUBJECT_LORA_FOLDER), {"tooltip": "A compact subject LoRA in models/subject_loras."})}}

    RETURN_TYPES = ("LORA_MODEL",)
    RETURN_NAMES = ("subject_lora",)
    OUTPUT_TOOLTIPS = ("The subject LoRA; apply it with Apply Subject LoRA or the core Load LoRA Model node.",)
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/loaders"

    def load(self, lora_name):
        path = folder_paths.get_full_path_or_raise(SUBJECT_LORA_FOLDER, lora_name)
        trainables, basis, metadata = load_compact_subject_lora(path)
        lora = basis.expand_exact(trainables)
        subject = SubjectLora(basis.layers, lora, metadata.get("base_arch", "unknown"), trainables, basis, {"compact_file": lora_name})
        return (lora_model_from_subject(subject),)
