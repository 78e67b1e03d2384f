"""Files: the hypernetwork, and subject LoRAs in a standard (kohya) and a compact (LiDB) form.

Everything is safetensors with JSON metadata; pickle formats are refused (they can run code on load).
Writes are atomic (temporary file + rename), so an interrupted or failed save never leaves a
half-written file under the final name. Every reader validates and names the first problem it finds.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import FileFormatError, HyperNetError
from .hypernetwork import HyperNetConfig, HyperNetwork
from .lidb import LidbBasis, LidbConfig
from .lora import LoraWeights
from .targets import TargetLayer, from_sgm_name, targets_from_json, targets_hash, targets_to_json, to_sgm_name, unet_naming_for

FORMAT_VERSION = 1
HYPERNET_FORMAT = "subject_hypernet"
SUBJECT_LORA_FORMAT = "subject_lora"
COMPACT_LORA_FORMAT = "subject_lora_compact"
_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}


# ----------------------------------------------------------------------------- safetensors plumbing


def read_safetensors(path: str | os.PathLike, what: str, *, load_tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (CPU) and metadata of a safetensors file, with clear errors for the usual problems."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{what}: file not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(16)
    # a safetensors file is an 8-byte little-endian header length, then the JSON header: byte 8 is '{'. Only
    # without that can a leading 0x80 (pickle protocol) or "PK" (zip) be trusted: a header length may start with 0x80.
    safetensors_layout = head[8:9] == b"{"
    if path.suffix.lower() in _PICKLE_SUFFIXES or (not safetensors_layout and (head[:2] == b"PK" or head[:1] == b"\x80")):
        raise FileFormatError(
            f"{what}: {path.name} is a pickle/PyTorch archive; only .safetensors files are loaded "
            "(pickle files can execute code when opened). Convert it to safetensors first."
        )
    if len(head) < 8 or int.from_bytes(head[:8], "little") > path.stat().st_size - 8:
        raise FileFormatError(f"{what}: {path.name} is not a valid safetensors file (truncated or corrupt header)")
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            keys = list(handle.keys())
            if load_tensors:
                for key in keys:
                    tensors[key] = handle.get_tensor(key)
            else:
                tensors = {key: None for key in keys}  # type: ignore[misc]
    except Exception as error:  # safetensors raises its own error types for corrupt data
        raise FileFormatError(f"{what}: {path.name} could not be read as safetensors ({error}); the file is corrupt or truncated") from error
    return tensors, metadata


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(temporary_path)`` on a file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_safetensors_atomic(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | os.PathLike) -> Path:
    """A safetensors file written atomically (never half-written under its final name)."""
    return atomic_write(path, lambda temporary: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, temporary, metadata=metadata))


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_format(metadata: dict[str, str], expected: str, what: str, path: Path, keys: Sequence[str]) -> None:
    found = metadata.get("format")
    if found != expected:
        kind = found or _guess_kind(keys)
        raise FileFormatError(f"{what}: {path.name} is not a {expected.replace('_', ' ')} file (it looks like {kind})")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise FileFormatError(f"{what}: {path.name} has no valid format_version in its metadata") from None
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"{what}: {path.name} uses format version {version}, made by a newer comfyui-subject-hypernet; "
            f"this version reads up to {FORMAT_VERSION}. Update the pack."
        )
    if version < 1:
        raise FileFormatError(f"{what}: {path.name} has unsupported format_version {version}")


def _guess_kind(keys: Sequence[str]) -> str:
    keys = list(keys)
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "a Stable Diffusion checkpoint"
    if any(k.endswith((".lora_down.weight", ".lora_A.weight", ".lora_up.weight")) for k in keys):
        return "a LoRA"
    if any(k.startswith("vision_model.") for k in keys):
        return "a CLIP vision model"
    return "an unknown safetensors file"


def _json(metadata: dict[str, str], key: str, what: str, path: Path) -> Any:
    try:
        return json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError) as error:
        raise FileFormatError(f"{what}: {path.name} has missing or invalid metadata field {key!r}") from error


def _require_finite(tensors: dict[str, torch.Tensor], what: str, path: Path) -> None:
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FileFormatError(f"{what}: {path.name} contains NaN/inf values (tensor {key}); the file is damaged")


def _targets_from_metadata(metadata: dict[str, str], what: str, path: Path) -> list[TargetLayer]:
    raw = metadata.get("targets")
    if raw is None:
        raise FileFormatError(f"{what}: {path.name} does not list its target layers")
    try:
        if raw.startswith("gz:"):
            raw = gzip.decompress(base64.b64decode(raw[3:])).decode()
        layers = targets_from_json(raw)
    except Exception as error:
        raise FileFormatError(f"{what}: {path.name} has an unreadable target list") from error
    if targets_hash(layers) != metadata.get("targets_sha256"):
        raise FileFormatError(f"{what}: {path.name}: the target list does not match its checksum; the file was altered")
    return layers


# ----------------------------------------------------------------------------- hypernetwork file


@dataclass
class HyperNetInfo:
    """What a hypernetwork file says about itself (readable without loading the weights)."""

    path: Path
    config: HyperNetConfig
    layers: list[TargetLayer]
    base_arch: str
    provenance: dict
    format_version: int

    def summary(self) -> str:
        features = self.config.features
        components = sorted({layer.name.split("_text_model_")[0] if "_text_model_" in layer.name else "unet" for layer in self.layers})
        return (
            f"{self.path.name}: base {self.base_arch}, {len(self.layers)} layers ({', '.join(components)}), "
            f"{self.config.output} rank {self.config.rank}; expects {features.hidden_state} "
            f"({features.tokens}x{features.dim}) from {features.encoder or 'a CLIP vision model'}"
        )


def save_hypernet(path: str | os.PathLike, hypernet: HyperNetwork, *, base_arch: str, provenance: dict | None = None) -> Path:
    config = hypernet.config
    metadata = {
        "format": HYPERNET_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(config.to_dict()),
        "targets": targets_to_json(hypernet.layers),
        "targets_sha256": targets_hash(hypernet.layers),
        "base_arch": base_arch,
        "provenance": json.dumps(provenance or {}),
    }
    if hypernet.basis is not None and not config.lidb.learned_aux:
        metadata["lidb_aux_sha256"] = hypernet.basis.checksum()
    tensors = {k: v for k, v in hypernet.state_dict().items()}
    return write_safetensors_atomic(tensors, metadata, path)


def read_hypernet_info(path: str | os.PathLike) -> HyperNetInfo:
    path = Path(path)
    what = "hypernetwork"
    tensors, metadata = read_safetensors(path, what, load_tensors=False)
    _check_format(metadata, HYPERNET_FORMAT, what, path, list(tensors))
    try:
        config = HyperNetConfig.from_dict(_json(metadata, "config", what, path))
    except (TypeError, KeyError, HyperNetError) as error:
        raise FileFormatError(f"{what}: {path.name} has an invalid config ({error})") from error
    return HyperNetInfo(
        path=path,
        config=config,
        layers=_targets_from_metadata(metadata, what, path),
        base_arch=metadata.get("base_arch", "unknown"),
        provenance=_json(metadata, "provenance", what, path) if "provenance" in metadata else {},
        format_version=int(metadata["format_version"]),
    )


def load_hypernet(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[HyperNetwork, HyperNetInfo]:
    info = read_hypernet_info(path)
    what = "hypernetwork"
    tensors, metadata = read_safetensors(info.path, what)
    _require_finite(tensors, what, info.path)
    hypernet = HyperNetwork(info.config, info.layers)
    expected = hypernet.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise FileFormatError(f"{what}: {info.path.name} does not match its own config ({detail})")
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise FileFormatError(
                f"{what}: {info.path.name}: tensor {key} has shape {tuple(tensor.shape)}, config implies {tuple(expected[key].shape)}"
            )
    hypernet.load_state_dict(tensors)
    if hypernet.basis is not None and not info.config.lidb.learned_aux:
        if "lidb_aux_sha256" not in metadata:
            raise FileFormatError(f"{what}: {info.path.name} lacks the LiDB aux-basis checksum")
        hypernet.basis.verify(metadata["lidb_aux_sha256"], f"{what} {info.path.name}")
    return hypernet.to(device).eval(), info


# ----------------------------------------------------------------------------- standard subject LoRA (kohya)


def lora_to_kohya(lora: LoraWeights, dtype: torch.dtype = torch.float32, naming: str = "diffusers") -> dict[str, torch.Tensor]:
    """kohya keys (``<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``); alpha = rank, so scale 1.

    ``naming``: how UNet layers are spelled -- 'diffusers' (kohya's SD1.5 files) or 'sgm' (its SDXL files,
    ``lora_unet_input_blocks_4_1_...``); :func:`hypernet.targets.unet_naming_for` picks it from the base.
    """
    if lora.batch_size is not None:
        raise HyperNetError("select one subject's LoRA before exporting it")
    spell = to_sgm_name if naming == "sgm" else (lambda name: name)
    state = {}
    for name in lora.names:
        rank = lora.rank(name)
        key = spell(name)
        state[f"{key}.lora_down.weight"] = lora.down[name].detach().to("cpu", dtype).contiguous()
        state[f"{key}.lora_up.weight"] = lora.up[name].detach().to("cpu", dtype).contiguous()
        state[f"{key}.alpha"] = torch.tensor(float(rank), dtype=dtype)
    return state


def kohya_to_lora(state: dict[str, torch.Tensor], what: str = "LoRA") -> LoraWeights:
    """Parse kohya keys (either UNet naming) back into factors under canonical names, folding ``alpha / rank`` into ``up``."""
    down, up = {}, {}
    for key, tensor in state.items():
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            if f"{name}.lora_up.weight" not in state:
                raise FileFormatError(f"{what}: {name} has a down factor but no up factor")
            up_tensor = state[f"{name}.lora_up.weight"].float()
            down_tensor = tensor.float()
            if down_tensor.dim() != 2 or up_tensor.dim() != 2:
                raise FileFormatError(f"{what}: {name} is not a linear-layer LoRA (conv LoRAs are not supported)")
            rank = down_tensor.shape[0]
            alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else float(rank)
            canonical = from_sgm_name(name)
            down[canonical] = down_tensor
            up[canonical] = up_tensor * (alpha / rank)
    if not down:
        raise FileFormatError(f"{what}: no kohya LoRA keys ('*.lora_down.weight') found")
    return LoraWeights(down, up)


def save_subject_lora(
    path: str | os.PathLike,
    lora: LoraWeights,
    layers: Sequence[TargetLayer],
    *,
    base_arch: str,
    dtype: torch.dtype = torch.float32,
    provenance: dict | None = None,
) -> Path:
    """A standard kohya LoRA: ComfyUI's LoraLoader, A1111 and diffusers load it as is (SDXL in kohya's SDXL naming)."""
    lora.check_against(layers)
    ranks = sorted({lora.rank(n) for n in lora.names})
    metadata = {
        "format": SUBJECT_LORA_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "targets_sha256": targets_hash(layers),
        "base_arch": base_arch,
        "provenance": json.dumps(provenance or {}),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[-1]),
        "ss_network_alpha": str(ranks[-1]),
        "ss_base_model_version": {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}.get(base_arch, base_arch),
    }
    return write_safetensors_atomic(lora_to_kohya(lora, dtype, unet_naming_for(base_arch)), metadata, path)


def load_subject_lora(path: str | os.PathLike) -> tuple[LoraWeights, dict[str, str]]:
    """Any kohya-format LoRA file of linear layers (ours or another tool's)."""
    path = Path(path)
    tensors, metadata = read_safetensors(path, "subject LoRA")
    _require_finite(tensors, "subject LoRA", path)
    return kohya_to_lora(tensors, f"subject LoRA {path.name}"), metadata


# ----------------------------------------------------------------------------- compact subject LoRA (LiDB)


def save_compact_subject_lora(
    path: str | os.PathLike,
    trainables: dict[str, torch.Tensor],
    basis: LidbBasis,
    *,
    base_arch: str,
    provenance: dict | None = None,
) -> Path:
    """Only the LiDB trainables (one flat float32 vector) + what is needed to rebuild the aux bases.

    ~106 KB for SD1.5 defaults (26,400 numbers). Learned aux bases live in the hypernetwork file, so a
    compact LoRA from a learned-aux hypernetwork cannot stand alone: export the standard form instead.
    """
    if basis.config.learned_aux:
        raise HyperNetError("compact subject LoRAs need fixed (seeded) aux bases; this hypernetwork learned its own. Save the standard LoRA.")
    layers = basis.layers
    flat = torch.cat([trainables[layer.name].detach().reshape(-1).to("cpu", torch.float32) for layer in layers])
    if flat.numel() != basis.num_trainables():
        raise HyperNetError(f"expected {basis.num_trainables()} LiDB numbers, got {flat.numel()}")
    targets_packed = "gz:" + base64.b64encode(gzip.compress(targets_to_json(layers).encode(), mtime=0)).decode()
    metadata = {
        "format": COMPACT_LORA_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "lidb": json.dumps(basis.config.to_dict()),
        "lidb_aux_sha256": basis.checksum(),
        "targets": targets_packed,
        "targets_sha256": targets_hash(layers),
        "base_arch": base_arch,
        "provenance": json.dumps(provenance or {}),
    }
    return write_safetensors_atomic({"lidb_trainables": flat}, metadata, path)


def load_compact_subject_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], LidbBasis, dict[str, str]]:
    """Trainables per layer, the rebuilt (and checksum-verified) aux bases, and the metadata."""
    path = Path(path)
    what = "compact subject LoRA"
    tensors, metadata = read_safetensors(path, what)
    _check_format(metadata, COMPACT_LORA_FORMAT, what, path, list(tensors))
    _require_finite(tensors, what, path)
    layers = _targets_from_metadata(metadata, what, path)
    config = LidbConfig.from_dict(_json(metadata, "lidb", what, path))
    basis = LidbBasis(layers, config)
    basis.verify(metadata.get("lidb_aux_sha256", ""), f"{what} {path.name}")
    flat = tensors.get("lidb_trainables")
    if flat is None or flat.dim() != 1 or flat.numel() != basis.num_trainables():
        raise FileFormatError(f"{what}: {path.name} should hold {basis.num_trainables()} LiDB numbers")
    sizes = [config.trainables_per_layer(layer) for layer in layers]
    trainables = {layer.name: chunk for layer, chunk in zip(layers, torch.split(flat, sizes))}
    return trainables, basis, metadata


def expand_compact_subject_lora(path: str | os.PathLike) -> tuple[LoraWeights, list[TargetLayer], dict[str, str]]:
    """Compact -> the exact factors the standard file holds."""
    trainables, basis, metadata = load_compact_subject_lora(path)
    return basis.expand_exact(trainables), basis.layers, metadata
