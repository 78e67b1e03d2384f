"""The frozen image encoder, computing exactly the features ComfyUI's CLIP_VISION computes.

What ComfyUI 0.3.75 does (``comfy/clip_vision.py``, ``comfy/clip_model.py``), re-implemented here over a
transformers ``CLIPVisionModelWithProjection``:

- preprocessing (``clip_preprocess``): drop alpha; resize the shortest side to the model's size
  (bicubic, antialiased; ``round`` of the scaled sides), center crop (or, with ``crop=False``, squash to a
  square); round to 1/255 steps; normalise with the CLIP mean/std;
- outputs: ``last_hidden_state`` = encoder output WITHOUT the final layer norm (transformers'
  ``last_hidden_state``), ``penultimate_hidden_states`` = output of the second-to-last layer
  (transformers' ``hidden_states[-2]``), ``image_embeds`` = projection of the post-layer-normed class
  token (returned here as one token, ``(B, 1, proj)``);
- precision: ComfyUI stores the CLIP-vision weights in fp16 by default (``text_encoder_dtype``), except
  ``pre_layrnorm``, ``post_layernorm`` and ``visual_projection`` (created without a dtype, so fp32), and
  computes in fp32 (``manual_cast``). ``match_comfy_storage=True`` (the default) rounds the same weights
  through fp16, so fp32 files give ComfyUI's numbers too; ``False`` equals ComfyUI run with
  ``--fp32-text-enc``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hypernet.errors import FileFormatError
from hypernet.files import read_safetensors
from hypernet.hypernetwork import HIDDEN_STATES, FeatureSpec

log = logging.getLogger("training.image_encoder")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Heads and activation are not visible in the tensors; these are the CLIP vision families ComfyUI loads.
KNOWN_WIDTHS = {768: (12, "quick_gelu"), 1024: (16, "quick_gelu"), 1280: (16, "gelu"), 1664: (16, "gelu")}  # ViT-B, L (OpenAI); H, bigG (LAION)
COMFY_MIN_LAYERS = 23  # comfy.clip_vision.load_clipvision_from_sd recognises files with encoder.layers.22 and up
COMFY_FP32_PREFIXES = ("vision_model.pre_layrnorm.", "vision_model.post_layernorm.", "visual_projection.")
PATCH_KEY = "vision_model.embeddings.patch_embedding.weight"
POSITION_KEY = "vision_model.embeddings.position_embedding.weight"
OPEN_CLIP_KEY = "visual.transformer.resblocks.0.attn.in_proj_weight"


class ImageEncoderError(FileFormatError):
    """The image encoder is missing, foreign, damaged or cannot give the requested output (a ``ValueError``)."""


CONFIG_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels", "image_size", "patch_size", "projection_dim")


def _config_from_metadata(raw: str, name: str):
    """The CLIPVisionConfig a file written by :func:`save_image_encoder` carries in its metadata field 'config'."""
    from transformers import CLIPVisionConfig

    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return CLIPVisionConfig(**data)
    except Exception as error:  # transformers validates fields with its own error types
        raise ImageEncoderError(f"CLIP vision model: {name} has an invalid metadata field 'config': {type(error).__name__}: {error}") from None


def _check_config_against_state(config, state: dict[str, torch.Tensor], name: str) -> None:
    """Compare a config with the tensors before building a model from it: a damaged config (say 10^9 layers)
    is refused by field name instead of allocating what it asks for."""
    for field in CONFIG_SIZES:
        value = getattr(config, field, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ImageEncoderError(f"{name}: config field {field} must be a positive integer, not {value!r}")
    from transformers.activations import ACT2FN

    if not isinstance(config.hidden_act, str) or config.hidden_act not in ACT2FN:
        raise ImageEncoderError(f"{name}: config field hidden_act {config.hidden_act!r} is not an activation transformers knows")
    if config.hidden_size % config.num_attention_heads:
        raise ImageEncoderError(f"{name}: config field num_attention_heads ({config.num_attention_heads}) does not divide hidden_size ({config.hidden_size})")
    expected = {
        PATCH_KEY: ((config.hidden_size, config.num_channels, config.patch_size, config.patch_size), "hidden_size, num_channels, patch_size"),
        POSITION_KEY: (((config.image_size // config.patch_size) ** 2 + 1, config.hidden_size), "image_size, patch_size"),
        "vision_model.encoder.layers.0.mlp.fc1.weight": ((config.intermediate_size, config.hidden_size), "intermediate_size"),
        "visual_projection.weight": ((config.projection_dim, config.hidden_size), "projection_dim"),
    }
    for key, (shape, fields) in expected.items():
        if key in state and tuple(state[key].shape) != shape:
            raise ImageEncoderError(f"{name}: config field(s) {fields} imply tensor {key} of shape {shape}, the file holds {tuple(state[key].shape)}")
    layers = 1 + max((int(k.split(".")[3]) for k in state if k.startswith("vision_model.encoder.layers.")), default=-1)
    if layers != config.num_hidden_layers:
        raise ImageEncoderError(f"{name}: config field num_hidden_layers is {config.num_hidden_layers}, the file holds {layers} layers")


@dataclass
class ImageEncoder:
    model: torch.nn.Module  # transformers CLIPVisionModelWithProjection, frozen, eval
    image_size: int
    description: str
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    hidden_state: str = "penultimate_hidden_states"  # default for features() / spec()
    has_projection: bool = True

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, images, crop: bool = True) -> torch.Tensor:
        """ComfyUI IMAGE ``(B, H, W, C)`` in [0, 1] (or PIL / uint8) -> normalised ``(B, 3, S, S)`` float32."""
        images = as_image_batch(images)[..., :3].movedim(-1, 1).float()
        size = self.image_size
        if images.shape[2] != size or images.shape[3] != size:
            if crop:
                scale = size / min(images.shape[2], images.shape[3])
                resized = (round(scale * images.shape[2]), round(scale * images.shape[3]))
            else:
                resized = (size, size)
            images = F.interpolate(images, size=resized, mode="bicubic", antialias=True)
            top, left = (images.shape[2] - size) // 2, (images.shape[3] - size) // 2
            images = images[:, :, top : top + size, left : left + size]
        return clip_normalise(images, self.mean, self.std)

    def _pixels(self, images, crop: bool) -> torch.Tensor:
        if isinstance(images, (list, tuple)):  # differently sized images: each is resized, then one batch
            return torch.cat([self._pixels(image, crop) for image in images])
        return self.preprocess(as_image_batch(images).to(self.device), crop)

    @torch.no_grad()
    def encode(self, images, crop: bool = True, batch_size: int = 32) -> dict[str, torch.Tensor]:
        """All outputs in one pass: ``{name: (B, tokens, dim)}`` float32 on the encoder's device."""
        names = [name for name in HIDDEN_STATES if name != "image_embeds" or self.has_projection]
        return self._run(self._pixels(images, crop), names, batch_size)

    @torch.no_grad()
    def features(self, images, hidden_state: str | None = None, crop: bool = True, batch_size: int = 32) -> torch.Tensor:
        """``(B, tokens, dim)`` float32 on the encoder's device, one row per image.

        ``images``: an IMAGE batch ``(B, H, W, C)``, a PIL image / uint8 array, or a list of those with
        different sizes (each row of the result is one image, in order). Averaging several views of one
        subject is the caller's business (``HyperNetwork.predict`` does it).
        """
        hidden_state = hidden_state or self.hidden_state
        self._check(hidden_state)
        return self._run(self._pixels(images, crop), [hidden_state], batch_size)[hidden_state]

    def _run(self, pixels: torch.Tensor, names: list[str], batch_size: int) -> dict[str, torch.Tensor]:
        rows: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for start in range(0, pixels.shape[0], batch_size):
            out = self.model(pixel_values=pixels[start : start + batch_size].to(self.dtype),
                             output_hidden_states="penultimate_hidden_states" in names)
            for name in names:
                rows[name].append(_OUTPUTS[name](out))
        return {name: torch.cat(parts).float() for name, parts in rows.items()}

    def _check(self, hidden_state: str) -> None:
        if hidden_state not in HIDDEN_STATES:
            raise ImageEncoderError(f"hidden_state must be one of {HIDDEN_STATES}, not {hidden_state!r}")
        if hidden_state == "image_embeds" and not self.has_projection:
            raise ImageEncoderError(f"{self.description} has no visual_projection weights, so it has no image_embeds; "
                                    "use penultimate_hidden_states or last_hidden_state")

    def feature_spec(self, hidden_state: str | None = None) -> FeatureSpec:
        s = self.spec(hidden_state)
        return FeatureSpec(dim=s["dim"], tokens=s["tokens"], hidden_state=s["hidden_state"], image_size=s["image_size"], encoder=s["encoder"])

    def spec(self, hidden_state: str | None = None) -> dict:
        """What the hypernetwork file records about its input features."""
        hidden_state = hidden_state or self.hidden_state
        self._check(hidden_state)
        config = self.model.config
        if hidden_state == "image_embeds":
            dim, tokens = config.projection_dim, 1
        else:
            dim, tokens = config.hidden_size, (config.image_size // config.patch_size) ** 2 + 1
        return {"dim": dim, "tokens": tokens, "hidden_state": hidden_state, "image_size": config.image_size,
                "mean": list(self.mean), "std": list(self.std), "encoder": self.description}


# ComfyUI's CLIP_VISION outputs, read off a transformers CLIPVisionModelWithProjection output
_OUTPUTS = {
    "last_hidden_state": lambda out: out.last_hidden_state,  # encoder output, no final layer norm
    "penultimate_hidden_states": lambda out: out.hidden_states[-2],
    "image_embeds": lambda out: out.image_embeds.unsqueeze(1),
}


def clip_normalise(images: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> rounded to 1/255 steps and normalised, as ComfyUI's ``clip_preprocess``."""
    images = torch.clip(255.0 * images, 0, 255).round() / 255.0
    mean = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def as_image_batch(images) -> torch.Tensor:
    """PIL image, uint8/uint16/float array or tensor ``(H, W, C)`` / ``(B, H, W, C)`` -> float ``(B, H, W, C)`` in [0, 1].

    Grayscale (C=1) is repeated to RGB; alpha (C=4) is kept (the encoder drops it, as ComfyUI does).
    """
    if hasattr(images, "convert") and hasattr(images, "mode"):  # PIL
        images = np.array(images.convert("RGBA" if "A" in images.getbands() else "RGB"))
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint16:
            images = images.astype(np.float32) / 65535.0
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise ImageEncoderError(f"expected an image tensor, array or PIL image, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    elif not images.is_floating_point():
        raise ImageEncoderError(f"expected float images in [0, 1] or uint8, got {images.dtype}")
    if images.dim() == 2:
        images = images.unsqueeze(-1)
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[-1] not in (1, 3, 4) or images.shape[0] == 0:
        raise ImageEncoderError(f"expected images of shape (B, H, W, C) with C in 1/3/4 (ComfyUI IMAGE layout), got {tuple(images.shape)}")
    if images.shape[-1] == 1:
        images = images.expand(-1, -1, -1, 3)
    return images


# ---------------------------------------------------------------------------------------------- loading

def _from_open_clip(state: dict[str, torch.Tensor], prefix: str = "visual.") -> dict[str, torch.Tensor]:
    """open_clip / OpenAI layout (``visual.transformer.resblocks.*``) -> transformers names (as ComfyUI's ``load``)."""
    renames = {"class_embedding": "embeddings.class_embedding", "conv1.weight": "embeddings.patch_embedding.weight",
               "positional_embedding": "embeddings.position_embedding.weight", "ln_pre.weight": "pre_layrnorm.weight",
               "ln_pre.bias": "pre_layrnorm.bias", "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias"}
    block_renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in renames:
            out["vision_model." + renames[name]] = value
        elif name == "proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif name.startswith("transformer.resblocks."):
            index, rest = name[len("transformer.resblocks."):].split(".", 1)
            layer = f"vision_model.encoder.layers.{index}."
            if rest.startswith("attn.in_proj_"):
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{layer}self_attn.{part}.{rest.rsplit('_', 1)[1]}"] = chunk.contiguous()
            else:
                module, param = rest.rsplit(".", 1)
                if module in block_renames:
                    out[f"{layer}{block_renames[module]}.{param}"] = value
    return out


def _what_is(keys: list[str], name: str) -> str:
    """A refusal naming what the file looks like."""
    def has(fragment):
        return any(fragment in k for k in keys)

    if has("model.diffusion_model."):
        kind = "a Stable Diffusion checkpoint"
    elif has("lora_down") or has("lora_up") or has("lora_A") or has("lora_B") or any(k.startswith("lora_") for k in keys):
        kind = "a LoRA"
    elif has("layer_scale1.lambda1") or has("layer_scale2.lambda1"):
        kind = "a DINOv2 image encoder (not supported; use a CLIP vision model)"
    elif has("text_model.") or has("token_embedding"):
        kind = "a CLIP text encoder"
    elif has("hypernet") or has("heads."):
        kind = "not a CLIP vision model (it looks like a hypernetwork file)"
    else:
        kind = "not a CLIP vision model"
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    return (f"{name} is {kind}: expected a CLIP vision .safetensors as in ComfyUI's models/clip_vision "
            f"(keys vision_model.*), found keys like {sample}")


def _config_from_state_dict(state: dict[str, torch.Tensor], metadata: dict[str, str], name: str):
    from transformers import CLIPVisionConfig

    if "config" in metadata:  # files written by save_image_encoder carry their config
        return _config_from_metadata(metadata["config"], name)
    prefix = "vision_model."
    if prefix + "embeddings.class_embedding" not in state:
        raise ImageEncoderError(f"{name}: a vision model without a class token (SigLIP?) is not supported; use a CLIP vision model")
    layers = 1 + max((int(k.split(".")[3]) for k in state if k.startswith(prefix + "encoder.layers.")), default=-1)
    patch = state[PATCH_KEY]
    hidden, patch_size = patch.shape[0], patch.shape[-1]
    positions = state[prefix + "embeddings.position_embedding.weight"].shape[0]
    grid = math.isqrt(positions - 1)
    if layers < 1 or grid * grid != positions - 1:
        raise ImageEncoderError(f"{name}: not a complete CLIP vision model ({layers} layers, {positions} position embeddings)")
    projection = state.get("visual_projection.weight")
    if hidden not in KNOWN_WIDTHS:
        raise ImageEncoderError(
            f"{name}: a CLIP vision model of width {hidden} is not a known family (ViT-B/L/H/bigG), so its attention heads "
            "cannot be read from the file; use a transformers folder with config.json"
        )
    heads, activation = KNOWN_WIDTHS[hidden]
    if layers < COMFY_MIN_LAYERS:
        log.warning("%s: ComfyUI 0.3.75 only loads CLIP vision files with >= %d layers (ViT-L/H/bigG); this one has %d, "
                    "so a hypernetwork trained on it cannot be used in the nodes", name, COMFY_MIN_LAYERS, layers)
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


def _build(config, state: dict[str, torch.Tensor], name: str, match_comfy_storage: bool):
    """A CLIPVisionModelWithProjection holding exactly ``state`` (no random init: ViT-L would take seconds)."""
    from transformers import CLIPVisionModelWithProjection

    state = {k: v for k, v in state.items() if (k.startswith("vision_model.") or k.startswith("visual_projection.")) and not k.endswith("position_ids")}
    _check_config_against_state(config, state, name)
    try:
        with torch.device("meta"):
            model = CLIPVisionModelWithProjection(config)
    except (ValueError, TypeError, KeyError, ZeroDivisionError) as error:  # e.g. an unknown hidden_act
        raise ImageEncoderError(f"{name}: its config (metadata field 'config' or config.json) does not describe a CLIP vision model ({type(error).__name__}: {error})") from None
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    missing = sorted(set(expected) - set(state))
    has_projection = "visual_projection.weight" in state
    if [k for k in missing if k != "visual_projection.weight"]:
        raise ImageEncoderError(f"{name}: incomplete CLIP vision model, {len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
    wrong = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k])]
    if wrong:
        raise ImageEncoderError(f"{name}: tensor {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, expected {tuple(expected[wrong[0]])}")
    if not has_projection:
        state["visual_projection.weight"] = torch.zeros(expected["visual_projection.weight"])

    def stored(key, value):
        if match_comfy_storage and value.dtype != torch.float16 and not key.startswith(COMFY_FP32_PREFIXES):
            value = value.to(torch.float16)
        return value.to(torch.float32)

    state = {k: stored(k, v) for k, v in state.items() if k in expected}
    if not all(math.isfinite(float(v.sum())) for v in state.values()):  # NaN/inf propagate; a sum is ~30x cheaper than isfinite
        raise ImageEncoderError(f"{name}: contains NaN or infinite weights")
    model.load_state_dict(state, strict=True, assign=True)
    embeddings = model.vision_model.embeddings
    embeddings.register_buffer("position_ids", torch.arange(embeddings.position_embedding.weight.shape[0]).expand(1, -1), persistent=False)
    not_loaded = [key for key, tensor in list(model.named_parameters()) + list(model.named_buffers()) if tensor.is_meta]
    if not_loaded:
        raise ImageEncoderError(f"{name}: tensors not loaded: {', '.join(not_loaded[:3])}")
    return model, has_projection


def _read_folder(path: Path, name: str):
    """config + vision tensors of a transformers folder (CLIPVisionModel[WithProjection] or a whole CLIPModel)."""
    from transformers import CLIPVisionConfig

    config_file = path / "config.json"
    if not config_file.is_file():
        raise ImageEncoderError(f"image encoder folder {path} has no config.json (expected a transformers CLIP vision model)")
    data = json.loads(config_file.read_text())
    model_type = data.get("model_type")
    if model_type == "clip":
        data = data.get("vision_config") or {}
    elif model_type != "clip_vision_model":
        raise ImageEncoderError(f"{name}: config.json describes a {model_type!r} model, expected a CLIP vision model ('clip_vision_model' or 'clip')")
    config = CLIPVisionConfig(**{k: v for k, v in data.items() if k not in ("model_type", "transformers_version", "architectures")})
    shards = [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if not all(s.is_file() for s in shards):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" (found {', '.join(pickles)}: pickle files are not loaded because they can execute code; re-save with safetensors)" if pickles else ""
        raise ImageEncoderError(f"image encoder folder {path} has no model.safetensors{hint}")
    state = {}
    for shard in shards:
        state.update(read_safetensors(shard, "CLIP vision model")[0])
    if "embeddings.patch_embedding.weight" in state:  # transformers 5 saves CLIPVisionModel without the vision_model. prefix
        state = {k if k.startswith(("vision_model.", "visual_projection.")) else "vision_model." + k: v for k, v in state.items()}
    if PATCH_KEY not in state:
        raise ImageEncoderError(_what_is(list(state), name))
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.is_file():
        pre = json.loads(preprocessor.read_text())
        if tuple(pre.get("image_mean", CLIP_MEAN)) != CLIP_MEAN or tuple(pre.get("image_std", CLIP_STD)) != CLIP_STD:
            log.warning("%s: preprocessor_config.json has its own mean/std; ComfyUI normalises CLIP vision input with the "
                        "CLIP mean/std whatever the model, so those are used here too", name)
    return config, state


def _read_file(path: Path):
    name = path.name
    keys = list(read_safetensors(path, "CLIP vision model", load_tensors=False)[0])
    if OPEN_CLIP_KEY in keys:
        state, metadata = read_safetensors(path, "CLIP vision model")
        state = _from_open_clip(state)
    elif PATCH_KEY in keys:
        state, metadata = read_safetensors(path, "CLIP vision model")
    else:
        raise ImageEncoderError(_what_is(keys, name))
    return _config_from_state_dict(state, metadata, name), state


def tiny_config(image_size: int = 32):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=image_size, patch_size=8, projection_dim=32, hidden_act="quick_gelu")


def load_image_encoder(spec: str, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0, *,
                       match_comfy_storage: bool = True, hidden_state: str = "penultimate_hidden_states") -> ImageEncoder:
    """``'tiny'`` (random, from ``seed``), ``'toy'``, a transformers folder, or a ComfyUI ``models/clip_vision`` .safetensors.

    Raises :class:`ImageEncoderError` for pickle, corrupt or foreign files (a checkpoint, a LoRA, ...).
    """
    from transformers import CLIPVisionModelWithProjection

    spec = str(spec)
    has_projection = True
    if spec == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random_model = CLIPVisionModelWithProjection(tiny_config())
        config, state = random_model.config, random_model.state_dict()
        description = f"tiny random CLIP vision (seed {seed})"
    elif spec == "toy":
        from .toy_model import TOY_DIR, toy_available

        if not toy_available():
            raise ImageEncoderError(f"the toy image encoder is not in {TOY_DIR}; create it with python -m experiments.study")
        config, state = _read_folder(TOY_DIR / "image_encoder", "toy")
        description = "toy-world CLIP vision (experiments/study.py)"
    else:
        path = Path(spec).expanduser()
        try:
            if path.is_dir():
                config, state = _read_folder(path, path.name)
            elif path.exists():
                config, state = _read_file(path)
            else:
                raise ImageEncoderError(f"image encoder not found: {spec} (expected 'tiny', a transformers CLIP vision folder, "
                                        "or a .safetensors from ComfyUI's models/clip_vision)")
        except FileFormatError as error:
            raise ImageEncoderError(str(error)) from None
        description = f"CLIP vision {path.name} (ViT {config.num_hidden_layers}x{config.hidden_size}/{config.patch_size}, {config.image_size}px)"
    model, has_projection = _build(config, state, spec, match_comfy_storage)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    encoder = ImageEncoder(model, config.image_size, description, hidden_state=hidden_state, has_projection=has_projection)
    encoder._check(hidden_state)
    return encoder


def save_image_encoder(encoder: ImageEncoder, path) -> Path:
    """Write in ComfyUI's models/clip_vision layout, with the config in the metadata for non-standard sizes."""
    from hypernet.files import write_safetensors_atomic

    state = {k: v for k, v in encoder.model.state_dict().items() if not k.endswith("position_ids")}
    if not encoder.has_projection:
        state.pop("visual_projection.weight", None)
    return write_safetensors_atomic(state, {"config": encoder.model.config.to_json_string(use_diff=True)}, path)
