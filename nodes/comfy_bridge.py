"""What every node needs from ComfyUI: model folders, the target layers of a MODEL/CLIP, LORA_MODEL
conversion, CLIP-vision features. Kept here so the node classes stay a few lines each."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

import torch

import comfy.model_management
import comfy.sd
import folder_paths

from hypernet import FeatureError, HyperNetInfo, HyperNetwork, SubjectLora, TargetMismatchError, locate_targets
from hypernet.files import kohya_to_lora, lora_to_kohya
from hypernet.lora import LoraWeights
from hypernet.targets import (UNET_COMPONENT, BoundTargets, TargetLayer, base_family, describe_mismatch, family_name, family_of_layers,
                                layer_component, unet_naming_for)

log = logging.getLogger("subject_hypernet")

CATEGORY = "subject_hypernet"
HYPERNET_FOLDER = "hypernets"
SUBJECT_LORA_FOLDER = "subject_loras"  # compact (LiDB) subject LoRAs; standard ones go to "loras"
_LISTED_EXTENSIONS = {".safetensors", ".ckpt", ".pt", ".pth", ".bin"}  # pickles are listed so we can refuse them clearly


def register_model_folders() -> None:
    """``models/hypernets`` and ``models/subject_loras``. Folders from extra_model_paths.yaml (read before
    custom nodes load) stay first, so saves go where the user configured."""
    for name in (HYPERNET_FOLDER, SUBJECT_LORA_FOLDER):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=False)
        paths, _ = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(_LISTED_EXTENSIONS))


class SubjectLoraDict(dict):
    """A core ``LORA_MODEL`` (a kohya state dict, so core nodes can apply/save it) that also carries
    the :class:`SubjectLora` it came from, for our nodes (compact saving, exact factors)."""

    subject: SubjectLora | None = None


def subject_lora_for_comfy(subject: SubjectLora) -> SubjectLoraDict:
    state = SubjectLoraDict(lora_to_kohya(subject.lora, naming=unet_naming_for(subject.base_arch)))
    state.subject = subject
    return state


def lora_weights_of(subject_lora: dict) -> LoraWeights:
    subject = getattr(subject_lora, "subject", None)
    if subject is not None:
        return subject.lora
    return kohya_to_lora(dict(subject_lora), "LORA_MODEL input")


def text_encoders_of(clip) -> list[torch.nn.Module]:
    """The CLIP text transformers inside a ComfyUI CLIP, in kohya order (clip_l, then clip_g)."""
    if clip is None:
        return []
    model = clip.cond_stage_model
    return [getattr(model, name).transformer for name in ("clip_l", "clip_g") if hasattr(model, name)]


def model_targets(model, clip=None) -> BoundTargets:
    return locate_targets(model.model.diffusion_model, text_encoders_of(clip))


# ComfyUI's model classes (comfy.supported_models) -> the families the pack knows; subclasses (SSD-1B, Segmind
# Vega, KOALA are SDXL distillations) inherit their parent's family.
_COMFY_FAMILIES = {"SD15": "sd15", "SDXL": "sdxl", "SDXLRefiner": "sdxl_refiner", "SD20": "sd2", "SD21UnclipL": "sd2", "SD21UnclipH": "sd2"}
SUPPORTED_FAMILIES = ("sd15", "sdxl")


def model_family(model) -> tuple[str, str]:
    """(family, ComfyUI's model class name) of a MODEL, e.g. ('sdxl', 'SDXL'), ('sdxl', 'Segmind_Vega'), ('Flux', 'Flux')."""
    config_class = type(model.model.model_config)
    family = next((_COMFY_FAMILIES[c.__name__] for c in config_class.__mro__ if c.__name__ in _COMFY_FAMILIES), config_class.__name__)
    return family, config_class.__name__


def _describe_model(model) -> str:
    family, comfy_name = model_family(model)
    return family_name(family) + (f" (ComfyUI model type {comfy_name})" if family_name(family) != comfy_name else "")


def _refuse_other_family(made_for: str, thing: str, model) -> None:
    """Raise when the ``thing`` ('hypernetwork', 'subject LoRA') made for ``made_for`` (a base arch or family) does not
    belong to the connected model's family, naming both."""
    family, _ = model_family(model)
    wanted = base_family(made_for)
    if wanted == family and family in SUPPORTED_FAMILIES:
        return
    if family in SUPPORTED_FAMILIES:
        advice = f"Connect a {family_name(wanted)} checkpoint, or use a {thing} made for {family_name(family)}."
    else:
        advice = f"This pack supports the {' and '.join(family_name(f) for f in SUPPORTED_FAMILIES)} families."
    raise TargetMismatchError(f"this {thing} was made for {family_name(wanted)}, but the connected MODEL is {_describe_model(model)}. {advice}")


def _made_for(base_arch: str | None, layers) -> str:
    """The base a file says it was made for, or (files from elsewhere, 'unknown') the family its layers imply."""
    return base_arch if base_arch and base_arch != "unknown" else family_of_layers(layers)


@dataclass(frozen=True)
class LoadedHyperNet:
    """What Load HyperNet passes on (SUBJECT_HYPERNET): the module, what its file says, and a lock held while a
    prediction moves the module to the compute device and back, so two predictions never move it under each other."""

    module: HyperNetwork
    info: HyperNetInfo
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


def check_hypernet_fits(hypernet: LoadedHyperNet, model, clip) -> None:
    """Refuse a hypernetwork made for another base model, naming both and the first difference."""
    wanted = hypernet.module.layers
    _refuse_other_family(_made_for(hypernet.info.base_arch, wanted), "hypernetwork", model)
    needs_text = any(layer_component(layer.name) != UNET_COMPONENT for layer in wanted)
    if needs_text and clip is None:
        raise TargetMismatchError(
            "this hypernetwork also adapts the text encoder: connect the CLIP from the same checkpoint to 'clip'"
        )
    found = model_targets(model, clip if needs_text else None).layers
    problem = describe_mismatch(wanted, found)
    if problem:
        raise TargetMismatchError(
            f"this hypernetwork was trained for another base model than the one connected ({_describe_model(model)}; {problem}). "
            "Use the checkpoint family it was made for."
        )


def check_lora_fits(subject_lora: dict, model) -> LoraWeights:
    """The LORA_MODEL's factors, after refusing one made for another base model (naming both)."""
    lora = lora_weights_of(subject_lora)
    subject = getattr(subject_lora, "subject", None)
    layers = [TargetLayer(n, lora.down[n].shape[-1], lora.up[n].shape[-2]) for n in lora.names]
    _refuse_other_family(_made_for(subject.base_arch if subject is not None else None, layers), "subject LoRA", model)
    found = {layer.name: layer for layer in model_targets(model).layers}
    unet_layers = [layer for layer in layers if layer_component(layer.name) == UNET_COMPONENT]
    misfits = [layer.name for layer in unet_layers if found.get(layer.name) != layer]
    if not unet_layers or misfits:
        raise TargetMismatchError(
            f"this subject LoRA does not fit the connected MODEL ({_describe_model(model)}): {len(misfits)} of its {len(unet_layers)} "
            f"UNet layers are missing or shaped differently{f' (first: {misfits[0]})' if misfits else ''}"
        )
    return lora


def as_rgb(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) with any channel count -> RGB; refuses empty batches."""
    if image is None or image.dim() != 4 or image.shape[0] == 0:
        shape = None if image is None else tuple(image.shape)
        raise FeatureError(f"need at least one reference image (an IMAGE batch of shape (B, H, W, C)); got {shape}")
    channels = image.shape[-1]
    if channels == 1:
        return image.expand(-1, -1, -1, 3)
    if channels == 2:  # grayscale + alpha
        return image[..., :1].expand(-1, -1, -1, 3)
    if channels >= 3:
        return image[..., :3]
    raise FeatureError(f"unsupported image with {channels} channels")


def clip_vision_features(clip_vision, image: torch.Tensor, hidden_state: str) -> torch.Tensor:
    """Features the hypernetwork reads, computed by ComfyUI's own CLIP-vision preprocessing and model."""
    output = clip_vision.encode_image(as_rgb(image), crop=True)
    features = getattr(output, hidden_state, None)  # ComfyUI's Output is attribute-based
    if features is None:
        raise FeatureError(f"the CLIP vision model gives no '{hidden_state}' output")
    if features.dim() == 2:  # image_embeds
        features = features.unsqueeze(1)
    return features.to(comfy.model_management.intermediate_device(), torch.float32)


def unet_keys(subject_lora: dict) -> dict:
    """The diffusion-model part of a kohya dict: what to hand ComfyUI where no CLIP is patched (it would log every
    text-encoder key as 'not loaded', 528 lines for an SDXL subject LoRA)."""
    return {key: value for key, value in subject_lora.items() if layer_component(key) == UNET_COMPONENT}


def apply_subject_lora(model, clip, subject_lora: dict, strength_model: float, strength_clip: float):
    """Exactly what the core LoraLoader does with a file's contents: patch clones of MODEL and CLIP (a bundled word
    embedding reaches prompts through Subject Prompt Encode or embedding:<name>, not here)."""
    if strength_model == 0 and strength_clip == 0:
        return model, clip
    weights = {k: v for k, v in subject_lora.items() if not k.startswith("bundle_emb.")}  # a bundled word embedding is no weight
    return comfy.sd.load_lora_for_models(model, clip, weights if clip is not None else unet_keys(weights), strength_model, strength_clip)
