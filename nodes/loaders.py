"""Load HyperNet / Load Subject LoRA (compact)."""

from __future__ import annotations

import folder_paths

from hypernet import load_hypernet
from hypernet.files import COMFYUI_HYPERNET_NAME, MAKE_A_HYPERNET, load_compact_subject_lora, load_subject_embedding
from hypernet.subject import SubjectLora
from .comfy_bridge import CATEGORY, HYPERNET_FOLDER, SUBJECT_LORA_FOLDER, LoadedHyperNet, subject_lora_for_comfy


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

    @classmethod
    def VALIDATE_INPUTS(cls, hypernet_name):
        # Replaces ComfyUI's bare "value not in list" with where the file goes and how to make one.
        return missing_hypernet(hypernet_name) or True

    def load(self, hypernet_name):
        problem = missing_hypernet(hypernet_name)
        if problem:
            raise FileNotFoundError(problem)
        module, info = load_hypernet(folder_paths.get_full_path_or_raise(HYPERNET_FOLDER, hypernet_name))
        return {"ui": {"text": [info.summary()]}, "result": (LoadedHyperNet(module, info), info.summary())}


def missing_hypernet(name: str | None) -> str | None:
    """None if models/hypernets has ``name``, else what to do about it."""
    available = folder_paths.get_filename_list(HYPERNET_FOLDER)
    if name is None or name in available:  # None: the name comes from a link, checked when the node runs
        return None
    folders = folder_paths.get_folder_paths(HYPERNET_FOLDER)
    found = f"found: {', '.join(available[:5])}{' ...' if len(available) > 5 else ''}" if available else "none there"
    return (f"no hypernetwork '{name}' in {' or '.join(folders)} ({found}). To make one: {MAKE_A_HYPERNET} (README: Training "
            f"a hypernetwork); copy the hypernet.safetensors it writes into {'that folder' if len(folders) == 1 else 'one of them'} "
            f"as {COMFYUI_HYPERNET_NAME}, the name the example workflows load, then press R in ComfyUI to refresh the list.")


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
        embedding = load_subject_embedding(path)
        subject = SubjectLora(basis.layers, lora, metadata.get("base_arch", "unknown"), trainables, basis, {"compact_file": lora_name},
                              token_embedding=None if embedding is None else embedding.vectors[0], placeholder=embedding.word if embedding else "sks")
        return (subject_lora_for_comfy(subject),)
