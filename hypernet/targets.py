"""Which linear layers a subject LoRA adapts, under one canonical kohya-style name each.

The same architecture is named differently by diffusers (``down_blocks.0.attentions.0...``) and by
ComfyUI / the original LDM code (``input_blocks.1.1...``); text encoders are the transformers
``CLIPTextModel`` in both, under different prefixes. Every scheme is mapped onto the diffusers
spelling, which is also what kohya keys use (``lora_unet_down_blocks_0_..._attn1_to_q``), so the
same canonical list comes out of either model.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from torch import nn

from .errors import TargetMismatchError

UNET_COMPONENT = "lora_unet"
UNET_PREFIX = UNET_COMPONENT + "_"
_PROJECTION_ORDER = {"to_q": 0, "to_k": 1, "to_v": 2, "to_out_0": 3, "q_proj": 0, "k_proj": 1, "v_proj": 2, "out_proj": 3}

# Attention projections inside a transformer block, in either naming scheme.
_ATTENTION_TAIL = re.compile(r"transformer_blocks\.(\d+)\.(attn[12])\.(to_q|to_k|to_v|to_out\.0)$")
_DIFFUSERS_UNET = re.compile(
    r"^(down_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+|up_blocks\.\d+\.attentions\.\d+)\."
    r"(transformer_blocks\.\d+\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0))$"
)
_LDM_UNET = re.compile(
    r"^(?:(input_blocks|output_blocks)\.(\d+)|middle_block)\.\d+\."
    r"(transformer_blocks\.\d+\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0))$"
)
# transformers >= 5 flattened CLIPTextModel (no ``text_model.`` level); ComfyUI and older versions keep it.
_TEXT_ENCODER = re.compile(r"(?:^|\.)(?:text_model\.)?encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")


@dataclass(frozen=True)
class TargetLayer:
    """One adapted linear: canonical name and its shape (``weight`` is ``out_features x in_features``)."""

    name: str
    in_features: int
    out_features: int


@dataclass
class BoundTargets:
    """A canonical target list bound to the ``nn.Linear`` modules of one concrete model."""

    layers: list[TargetLayer]
    modules: dict[str, nn.Linear]

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def restricted_to(self, selection: str | Iterable[str]) -> "BoundTargets":
        """The layers of one component (``'lora_unet'``, ``'lora_te1'``, ...) or of a collection of names, in order."""
        wanted = set(names_within(self.names, selection))
        layers = [layer for layer in self.layers if layer.name in wanted]
        return BoundTargets(layers, {layer.name: self.modules[layer.name] for layer in layers})


def layer_component(name: str) -> str:
    """The part of the model a canonical layer name (or a kohya key) belongs to, as its kohya prefix: ``'lora_unet'``,
    or a text encoder's ``'lora_te'`` / ``'lora_te1'`` / ``'lora_te2'``; ``''`` for a key of neither (a bundled embedding)."""
    if "_text_model_" in name:
        return name.split("_text_model_")[0]
    return UNET_COMPONENT if name.startswith(UNET_PREFIX) else ""


def names_within(names: Iterable[str], selection: str | Iterable[str]) -> list[str]:
    """``names``, in their order, that belong to ``selection``: a component (see :func:`layer_component`) or a
    collection of layer names (a dict of modules counts by its keys)."""
    if isinstance(selection, str):
        return [name for name in names if layer_component(name) == selection]
    wanted = set(selection)
    return [name for name in names if name in wanted]


def text_encoder_prefixes(count: int) -> list[str]:
    """kohya prefixes: one text encoder is ``lora_te``; SDXL's two are ``lora_te1`` (CLIP-L), ``lora_te2`` (bigG)."""
    return ["lora_te"] if count == 1 else [f"lora_te{i + 1}" for i in range(count)]


def _sort_key(name: str) -> tuple:
    # Natural order (numbers compare as numbers) with projections in q, k, v, out order.
    for suffix, rank in _PROJECTION_ORDER.items():
        if name.endswith("_" + suffix):
            stem = name[: -len(suffix) - 1]
            break
    else:  # pragma: no cover - every canonical name ends in a projection
        stem, rank = name, 0
    parts = tuple((0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in stem.split("_"))
    return parts, rank


def _ldm_block_map(unet: nn.Module) -> dict[tuple[str, int], str]:
    """Map LDM ``(input_blocks|output_blocks, index)`` to the diffusers block path holding its attention.

    The index arithmetic follows the block layout: each level has ``num_res_blocks`` input blocks
    (+1 downsampler except the last level) and ``num_res_blocks + 1`` output blocks, deepest first.
    """
    levels = _ldm_levels(unet)
    mapping: dict[tuple[str, int], str] = {}
    index = 1  # input_blocks[0] is conv_in
    for level, res_blocks in enumerate(levels):
        for r in range(res_blocks):
            mapping[("input_blocks", index)] = f"down_blocks.{level}.attentions.{r}"
            index += 1
        index += 1  # downsampler (absent after the last level; harmless to skip past)
    index = 0
    for up_level, level in enumerate(reversed(range(len(levels)))):
        for r in range(levels[level] + 1):
            mapping[("output_blocks", index)] = f"up_blocks.{up_level}.attentions.{r}"
            index += 1
    return mapping


def _ldm_levels(unet: nn.Module) -> list[int]:
    """Res blocks per resolution level of an LDM-style UNet, from its config or its structure."""
    num_res_blocks = getattr(unet, "num_res_blocks", None)
    if num_res_blocks is not None:
        return list(num_res_blocks) if isinstance(num_res_blocks, (list, tuple)) else [int(num_res_blocks)] * len(unet.channel_mult)
    levels, count = [], 0
    for block in list(unet.input_blocks)[1:]:
        if type(block[0]).__name__ == "Downsample":
            levels.append(count)
            count = 0
        else:
            count += 1
    levels.append(count)
    return levels


def _unet_canonical_paths(unet: nn.Module) -> dict[str, str]:
    """diffusers-style path -> this module's path, for every attention projection in the UNet."""
    found: dict[str, str] = {}
    ldm_map = None
    for path, module in unet.named_modules():
        if not isinstance(module, nn.Linear) or not _ATTENTION_TAIL.search(path):
            continue
        match = _DIFFUSERS_UNET.match(path)
        if match:
            found[path] = path
            continue
        match = _LDM_UNET.match(path)
        if match is None:
            continue
        group, index, tail = match.groups()
        if group is None:  # middle_block
            canonical_block = "mid_block.attentions.0"
        else:
            if ldm_map is None:
                ldm_map = _ldm_block_map(unet)
            canonical_block = ldm_map[(group, int(index))]
        found[f"{canonical_block}.{tail}"] = path
    return found


def _linear_at(root: nn.Module, path: str) -> nn.Linear:
    module = root.get_submodule(path)
    if not isinstance(module, nn.Linear):
        raise TargetMismatchError(f"expected a linear layer at {path!r}, found {type(module).__name__}")
    return module


def locate_targets(
    unet: nn.Module | None = None,
    text_encoders: Sequence[nn.Module] = (),
    *,
    include_unet: bool = True,
    include_text_encoders: bool = True,
) -> BoundTargets:
    """Find the attention q/k/v/out linears of a UNet and its text encoder(s), in canonical order.

    ``unet`` may be a diffusers ``UNet2DConditionModel`` or ComfyUI's ``UNetModel``;
    ``text_encoders`` are modules containing a CLIP ``text_model`` (transformers ``CLIPTextModel``,
    ComfyUI's ``clip_l.transformer``, ...). The list is ordered UNet first, then the text encoders.
    """
    entries: list[tuple[str, nn.Linear]] = []
    if unet is not None and include_unet:
        for canonical, path in _unet_canonical_paths(unet).items():
            entries.append((UNET_PREFIX + canonical.replace(".", "_"), _linear_at(unet, path)))
    if include_text_encoders and text_encoders:
        for prefix, encoder in zip(text_encoder_prefixes(len(text_encoders)), text_encoders):
            for path, module in encoder.named_modules():
                match = _TEXT_ENCODER.search(path)
                if match and isinstance(module, nn.Linear) and "vision_model" not in path:
                    layer, proj = match.groups()
                    entries.append((f"{prefix}_text_model_encoder_layers_{layer}_self_attn_{proj}", module))
    if unet is not None and include_unet and not any(layer_component(name) == UNET_COMPONENT for name, _ in entries):
        raise TargetMismatchError(
            f"no attention projections found in the UNet ({type(unet).__name__}): expected diffusers "
            "'down_blocks.*.attentions.*' or LDM 'input_blocks.*' transformer blocks"
        )
    order = {name: i for i, name in enumerate(sorted((n for n, _ in entries), key=_component_sort_key))}
    entries.sort(key=lambda item: order[item[0]])
    layers = [TargetLayer(name, m.in_features, m.out_features) for name, m in entries]
    return BoundTargets(layers, dict(entries))


def _component_sort_key(name: str) -> tuple:
    component = layer_component(name)
    component_rank = 0 if component == UNET_COMPONENT else 1
    return component_rank, component, _sort_key(name)


def targets_to_json(layers: Sequence[TargetLayer]) -> str:
    return json.dumps([[layer.name, layer.in_features, layer.out_features] for layer in layers], separators=(",", ":"))


def targets_from_json(text: str) -> list[TargetLayer]:
    return [TargetLayer(str(n), int(i), int(o)) for n, i, o in json.loads(text)]


def targets_hash(layers: Sequence[TargetLayer]) -> str:
    """Identity of a target list (names, order and shapes), stored in every file we write."""
    return hashlib.sha256(targets_to_json(layers).encode()).hexdigest()


def describe_mismatch(expected: Sequence[TargetLayer], found: Sequence[TargetLayer]) -> str:
    """A short human-readable account of how two target lists differ ('' when equal)."""
    if list(expected) == list(found):
        return ""
    expected_by_name = {layer.name: layer for layer in expected}
    found_by_name = {layer.name: layer for layer in found}
    missing = [n for n in expected_by_name if n not in found_by_name]
    extra = [n for n in found_by_name if n not in expected_by_name]
    reshaped = [
        f"{n} ({expected_by_name[n].in_features}->{expected_by_name[n].out_features} expected, "
        f"{found_by_name[n].in_features}->{found_by_name[n].out_features} found)"
        for n in expected_by_name
        if n in found_by_name and expected_by_name[n] != found_by_name[n]
    ]
    parts = [f"{len(expected)} layers expected, {len(found)} found"]
    if missing:
        parts.append(f"{len(missing)} missing (first: {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} unexpected (first: {extra[0]})")
    if reshaped:
        parts.append(f"{len(reshaped)} with other shapes (first: {reshaped[0]})")
    if not (missing or extra or reshaped):
        parts.append("same layers in a different order")
    return "; ".join(parts)


def require_same_targets(expected: Sequence[TargetLayer], found: Sequence[TargetLayer], what: str) -> None:
    problem = describe_mismatch(expected, found)
    if problem:
        raise TargetMismatchError(f"{what}: {problem}")


# ----------------------------------------------------------------------------- kohya's two UNet namings

# kohya's SD1.5 files name UNet layers after diffusers' modules (``lora_unet_down_blocks_1_attentions_0_...``),
# its SDXL files after the SGM/LDM modules (``lora_unet_input_blocks_4_1_...``), which is what A1111/Forge
# expect for SDXL. Both architectures have 2 res blocks per level, so the block arithmetic is fixed:
#   down_blocks.L.attentions.R <-> input_blocks.(1 + 3L + R).1,  mid_block.attentions.0 <-> middle_block.1,
#   up_blocks.L.attentions.R <-> output_blocks.(3L + R).1
UNET_NAMINGS = ("diffusers", "sgm")
_SGM_RES_BLOCKS = 2
_DIFFUSERS_BLOCK = re.compile(r"^lora_unet_(?:(down|up)_blocks_(\d+)_attentions_(\d+)|mid_block_attentions_0)_(transformer_blocks_.+)$")
_SGM_BLOCK = re.compile(r"^lora_unet_(?:(input|output)_blocks_(\d+)_1|middle_block_1)_(transformer_blocks_.+)$")


def unet_naming_for(base_arch: str) -> str:
    """The UNet naming kohya uses for a base architecture: 'sgm' for the SDXL family, else 'diffusers'."""
    return "sgm" if base_arch.split("-")[0] == "sdxl" else "diffusers"


def to_sgm_name(name: str) -> str:
    """A canonical (diffusers-spelled) kohya name -> kohya's SDXL spelling; other names pass unchanged."""
    match = _DIFFUSERS_BLOCK.match(name)
    if match is None:
        return name
    side, level, index, tail = match.groups()
    if side is None:
        return f"lora_unet_middle_block_1_{tail}"
    level, index = int(level), int(index)
    per_level = _SGM_RES_BLOCKS + 1
    if index >= (_SGM_RES_BLOCKS if side == "down" else per_level):
        raise TargetMismatchError(f"{name}: SGM (SDXL kohya) names need {_SGM_RES_BLOCKS} res blocks per level; this UNet has more")
    block = 1 + per_level * level + index if side == "down" else per_level * level + index
    return f"lora_unet_{'input' if side == 'down' else 'output'}_blocks_{block}_1_{tail}"


def from_sgm_name(name: str) -> str:
    """kohya's SDXL spelling (``lora_unet_input_blocks_4_1_...``) -> the canonical name; other names pass unchanged."""
    match = _SGM_BLOCK.match(name)
    if match is None:
        return name
    side, block, tail = match.groups()
    if side is None:
        return f"lora_unet_mid_block_attentions_0_{tail}"
    per_level = _SGM_RES_BLOCKS + 1
    block = int(block)
    if side == "input":
        level, index = divmod(block - 1, per_level)
        if index >= _SGM_RES_BLOCKS:
            raise TargetMismatchError(f"{name}: input block {block} is a downsampler in the SDXL layout; it has no attention")
        return f"lora_unet_down_blocks_{level}_attentions_{index}_{tail}"
    level, index = divmod(block, per_level)
    return f"lora_unet_up_blocks_{level}_attentions_{index}_{tail}"


# ----------------------------------------------------------------------------- base architectures

_FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "sd2": "SD2.x", "sdxl_refiner": "SDXL refiner"}
_FAMILY_BY_CONTEXT = {768: "sd15", 1024: "sd2", 2048: "sdxl", 1280: "sdxl_refiner"}


def base_family(base_arch: str) -> str:
    """'sdxl-tiny' -> 'sdxl': the family a base architecture belongs to (tiny presets share their family's layout)."""
    return base_arch.split("-")[0]


def family_name(family: str) -> str:
    return _FAMILY_NAMES.get(family, family)


def family_of_layers(layers: Sequence[TargetLayer]) -> str:
    """The base family a target list was located on: two text encoders mean SDXL; otherwise the width of the
    UNet's cross-attention context names it (768 SD1.5, 1024 SD2.x, 2048 SDXL, 1280 SDXL refiner)."""
    components = {layer_component(layer.name) for layer in layers}
    if {"lora_te1", "lora_te2"} <= components:
        return "sdxl"
    context = next((layer.in_features for layer in layers if layer_component(layer.name) == UNET_COMPONENT and layer.name.endswith("attn2_to_k")), None)
    family = _FAMILY_BY_CONTEXT.get(context)
    if family is None:
        return f"unknown (cross-attention context width {context})" if context else "unknown"
    return family

