"""The frozen image encoder, computing exactly the features ComfyUI's CLIP_VISION computes.

ComfyUI's ``CLIPVisionEncode`` resizes the shortest side to the model's size (bicubic, antialiased),
center-crops, rounds to 1/255 steps and normalises with the CLIP mean/std; its outputs are
``last_hidden_state`` (encoder output, no final layer norm), ``penultimate_hidden_states`` (output of
the second-to-last layer) and ``image_embeds`` (projected, post-layer-normed class token). The same
math is re-implemented here over a transformers ``CLIPVisionModelWithProjection``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hypernet.files import read_safetensors
from hypernet.hypernetwork import HIDDEN_STATES, FeatureSpec

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Heads and activation are not visible in the tensors; these are the CLIP vision families ComfyUI loads.
KNOWN_WIDTHS = {768: (12, "quick_gelu"), 1024: (16, "quick_gelu"), 1280: (16, "gelu"), 1664: (16, "gelu")}  # ViT-B, L (OpenAI); H, bigG (LAION)


class ImageEncoderError(ValueError):
    pass


@dataclass
class ImageEncoder:
    model: torch.nn.Module  # transformers CLIPVisionModelWithProjection, frozen
    image_size: int
    description: str
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """ComfyUI IMAGE ``(B, H, W, C)`` in [0, 1] -> normalised ``(B, 3, S, S)`` pixel values."""
        images = as_image_batch(images)[..., :3].movedim(-1, 1).float()
        size = self.image_size
        if images.shape[2] != size or images.shape[3] != size:
            scale = size / min(images.shape[2], images.shape[3])
            images = F.interpolate(images, size=(round(scale * images.shape[2]), round(scale * images.shape[3])), mode="bicubic", antialias=True)
            top, left = (images.shape[2] - size) // 2, (images.shape[3] - size) // 2
            images = images[:, :, top : top + size, left : left + size]
        images = torch.clip(255.0 * images, 0, 255).round() / 255.0
        mean = torch.tensor(self.mean, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std

    @torch.no_grad()
    def features(self, images, hidden_state: str) -> torch.Tensor:
        """``(B, tokens, dim)`` float32; ``images`` is an IMAGE batch or a list of differently sized images."""
        if hidden_state not in HIDDEN_STATES:
            raise ImageEncoderError(f"hidden_state must be one of {HIDDEN_STATES}")
        if isinstance(images, (list, tuple)):
            return torch.cat([self.features(image, hidden_state) for image in images])
        pixels = self.preprocess(images).to(self.device, next(self.model.parameters()).dtype)
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        if hidden_state == "last_hidden_state":
            result = out.last_hidden_state
        elif hidden_state == "penultimate_hidden_states":
            result = out.hidden_states[-2]
        else:
            result = out.image_embeds.unsqueeze(1)
        return result.float()

    def feature_spec(self, hidden_state: str) -> FeatureSpec:
        config = self.model.config
        if hidden_state == "image_embeds":
            dim, tokens = config.projection_dim, 1
        else:
            dim, tokens = config.hidden_size, (config.image_size // config.patch_size) ** 2 + 1
        return FeatureSpec(dim=dim, tokens=tokens, hidden_state=hidden_state, image_size=config.image_size, encoder=self.description)


def as_image_batch(images) -> torch.Tensor:
    """PIL image, uint8/float array or tensor ``(H, W, C)`` / ``(B, H, W, C)`` -> float ``(B, H, W, C)`` in [0, 1]."""
    if hasattr(images, "convert"):  # PIL
        images = np.asarray(images.convert("RGB"))
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[-1] not in (1, 3, 4):
        raise ImageEncoderError(f"expected images of shape (B, H, W, C) with C in 1/3/4, got {tuple(images.shape)}")
    if images.shape[-1] == 1:
        images = images.expand(-1, -1, -1, 3)
    return images


def _config_from_state_dict(state: dict[str, torch.Tensor], metadata: dict[str, str], name: str):
    from transformers import CLIPVisionConfig

    if "config" in metadata:  # files written by save_image_encoder carry their config
        return CLIPVisionConfig(**json.loads(metadata["config"]))
    prefix = "vision_model."
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith(prefix + "encoder.layers."))
    patch = state[prefix + "embeddings.patch_embedding.weight"]
    hidden, patch_size = patch.shape[0], patch.shape[-1]
    positions = state[prefix + "embeddings.position_embedding.weight"].shape[0]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ImageEncoderError(f"unexpected position embedding count {positions}")
    projection = state.get("visual_projection.weight")
    if hidden not in KNOWN_WIDTHS:
        raise ImageEncoderError(
            f"{name}: a CLIP vision model of width {hidden} is not a known family (ViT-B/L/H/bigG), so its attention heads "
            "cannot be read from the file; use a transformers folder with config.json"
        )
    heads, activation = KNOWN_WIDTHS[hidden]
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=state[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=grid * patch_size,
        patch_size=patch_size,
        projection_dim=projection.shape[0] if projection is not None else hidden,
        hidden_act=activation,
        layer_norm_eps=1e-5,
    )


def load_image_encoder(spec: str, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> ImageEncoder:
    """``'tiny'``, ``'toy'``, a transformers folder, or a ComfyUI ``models/clip_vision`` .safetensors file."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if spec == "tiny":
        torch.manual_seed(seed)
        config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)
        model, description = CLIPVisionModelWithProjection(config), "tiny random CLIP vision (demo)"
    elif spec == "toy":
        from .toy_model import TOY_DIR, toy_available

        if not toy_available():
            raise ImageEncoderError(f"the toy image encoder is not in {TOY_DIR}; create it with python -m experiments.study")
        model = CLIPVisionModelWithProjection.from_pretrained(TOY_DIR / "image_encoder", local_files_only=True).float()
        description = "toy-world CLIP vision (experiments/study.py)"
    else:
        path = Path(spec)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ImageEncoderError(f"image encoder folder {path} has no config.json (expected a transformers CLIP vision model)")
            model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)
            description = f"CLIP vision {path.name}"
        else:
            state, metadata = read_safetensors(path, "CLIP vision model")
            if "vision_model.embeddings.patch_embedding.weight" not in state:
                kind = "a checkpoint" if any(k.startswith("model.diffusion_model.") for k in state) else "not a CLIP vision model"
                raise ImageEncoderError(f"{path.name} is {kind}: expected a CLIP vision .safetensors (ComfyUI models/clip_vision)")
            config = _config_from_state_dict(state, metadata, path.name)
            model = CLIPVisionModelWithProjection(config)
            missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items() if not k.endswith("position_ids")}, strict=False)
            if [m for m in missing if not m.endswith("position_ids")]:
                raise ImageEncoderError(f"{path.name}: missing tensors {missing[:3]}")
            description = f"CLIP vision {path.name} (ViT {config.num_hidden_layers}x{config.hidden_size}, {config.image_size}px)"
    model = model.to(device).eval().requires_grad_(False)
    if dtype != torch.float32:
        model.to(dtype)
    return ImageEncoder(model, model.config.image_size, description)



def save_image_encoder(encoder: ImageEncoder, path) -> Path:
    """Write in ComfyUI's models/clip_vision layout, with the config in the metadata for non-standard sizes."""
    from hypernet.files import write_safetensors_atomic

    state = {k: v for k, v in encoder.model.state_dict().items() if not k.endswith("position_ids")}
    return write_safetensors_atomic(state, {"config": encoder.model.config.to_json_string(use_diff=True)}, path)
