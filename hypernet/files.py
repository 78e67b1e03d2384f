"""Files: the hypernetwork, and subject LoRAs in a standard (kohya) and a compact (LiDB) form.

Everything is safetensors with JSON metadata; pickle formats are refused (they can run code on load).
Writes are atomic (temporary file + rename), so an interrupted or failed save never leaves a
half-written file under the final name. Every reader validates and names the first problem it finds.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import secrets
import stat
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
from .targets import TargetLayer, from_sgm_name, layer_component, targets_from_json, targets_hash, targets_to_json, to_sgm_name, unet_naming_for

FORMAT_VERSION = 1
HYPERNET_FORMAT = "subject_hypernet"
SUBJECT_LORA_FORMAT = "subject_lora"
COMPACT_LORA_FORMAT = "subject_lora_compact"
_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}

# One name per family in ComfyUI's models/hypernets: the example workflows load it, the README tells users to
# copy the trainer's hypernet.safetensors there under it, and the trainer says so.
COMFYUI_HYPERNET_NAMES = {"sd15": "subject_hypernet_sd15.safetensors", "sdxl": "subject_hypernet_sdxl.safetensors"}
COMFYUI_HYPERNET_NAME = COMFYUI_HYPERNET_NAMES["sd15"]
MAKE_A_HYPERNET = ("python -m training.train --backbone <SD1.5 checkpoint .safetensors> --image-encoder "
                   "<ComfyUI/models/clip_vision/CLIP-ViT-L-14.safetensors> --data <folder of subject images>")


def comfyui_install_hint(hypernet_path: str | os.PathLike, base_arch: str) -> str:
    """What to copy where so that ComfyUI's example workflows load a freshly trained hypernetwork."""
    if base_arch not in COMFYUI_HYPERNET_NAMES:
        return (f"for ComfyUI: {hypernet_path} is for base '{base_arch}'; the example workflows need an SD1.5 or SDXL "
                f"hypernetwork ({MAKE_A_HYPERNET})")
    workflows = "the SDXL example workflows" if base_arch == "sdxl" else "the example workflows"
    return f"for ComfyUI: copy {hypernet_path} to ComfyUI/models/hypernets/{COMFYUI_HYPERNET_NAMES[base_arch]} (the name {workflows} load)"


# ----------------------------------------------------------------------------- safetensors plumbing


SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header


def safetensors_header(path: str | os.PathLike) -> dict | None:
    """The JSON header of a file laid out as safetensors (8-byte little-endian length, then a JSON object), else None.

    This is how a file is recognised: by parsing what it claims to be. Its first byte is the low byte of the
    header length, so it can be anything, including 0x80 (a pickle's first byte) or "PK" (a zip's).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return None
        length = int.from_bytes(prefix, "little")
        if not 2 <= length <= min(size - 8, SAFETENSORS_MAX_HEADER):
            return None
        raw = handle.read(length)
    if raw[:1] != b"{":
        return None
    try:
        header = json.loads(raw)
    except ValueError:  # includes UnicodeDecodeError
        return None
    return header if isinstance(header, dict) else None


def _foreign_format(path: Path) -> str | None:
    """What a file that is not safetensors looks like, if it is a format we refuse on purpose."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head == b"PK\x03\x04":
        return "a zip archive (PyTorch's .pt/.ckpt format, which holds a pickle)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle"
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        return f"a {path.suffix.lower()} file (a pickle/PyTorch archive)"
    return None


def read_safetensors(path: str | os.PathLike, what: str, *, load_tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (CPU) and metadata of a safetensors file, with clear errors for the usual problems.

    Accepts every file that parses as safetensors, whatever its name or first bytes; refuses pickle and zip
    (PyTorch) archives by name, since opening those can execute code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{what}: file not found: {path}")
    if safetensors_header(path) is None:
        foreign = _foreign_format(path)
        if foreign:
            raise FileFormatError(
                f"{what}: {path.name} is {foreign}; only .safetensors files are loaded "
                "(pickle files can execute code when opened). Convert it to safetensors first."
            )
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


def _new_temporary(path: Path) -> Path:
    """A new empty file beside ``path``, created as a plain ``open()`` would (mode 0666 less the umask)."""
    while True:
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return candidate
        except FileExistsError:
            continue


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(temporary_path)`` on a file beside ``path``, then rename it into place.

    The file gets the mode of the file it replaces, else the umask's default (never the 0600 of a
    ``mkstemp`` file, which a ComfyUI running as another user could not read). A symlink is written
    through: its target is replaced, the link stays.
    """
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _new_temporary(target)
    try:
        mode = stat.S_IMODE(temporary.stat().st_mode)  # 0666 less the umask, read without changing the umask
        write(str(temporary))
        if target.exists():
            mode = stat.S_IMODE(target.stat().st_mode)
        os.chmod(temporary, mode)  # writers may recreate the file (safetensors writes 0600)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


_TEMPORARY_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # ours, and the mkstemp names earlier versions left


def remove_orphan_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed atomic writes left in ``folder`` (not its sub-folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = [path for path in folder.glob(".*.tmp") if _TEMPORARY_NAME.match(path.name) and path.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def save_to_free_name(folder: str | os.PathLike, prefix: str, suffix: str, save) -> Path:
    """``save(path)`` once, under the first free name ``<folder>/<prefix>_NNNNN<suffix>``; never overwrites.

    The file is written completely under a temporary name, then given the free name with an operation
    that fails if the name exists (a hard link, else an O_EXCL placeholder), so two saves at once (two
    ComfyUI queues, two processes) get two names and each file is whole.
    """
    first = Path(folder) / f"{prefix}_00001{suffix}"
    first.parent.mkdir(parents=True, exist_ok=True)
    temporary = _new_temporary(first)
    try:
        save(temporary)
        counter = 1
        while True:
            path = Path(folder) / f"{prefix}_{counter:05d}{suffix}"
            if not os.path.lexists(path):
                try:
                    _claim(temporary, path)
                    return path
                except FileExistsError:
                    pass
            counter += 1
    finally:
        temporary.unlink(missing_ok=True)


def _claim(source: Path, path: Path) -> None:
    """Give ``source``'s content the name ``path``, failing with FileExistsError if the name is taken."""
    try:
        os.link(source, path)
        return
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links (FAT, some network shares): reserve the name, then replace
        pass
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    os.replace(source, path)


def write_safetensors_atomic(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | os.PathLike) -> Path:
    """A safetensors file written atomically (never half-written under its final name)."""
    return atomic_write(path, lambda temporary: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, temporary, metadata=metadata))


def _check_format(metadata: dict[str, str], expected: str, what: str, path: Path, keys: Sequence[str]) -> None:
    found = metadata.get("format")
    if found != expected:
        kind = found or _guess_kind(keys)
        raise FileFormatError(f"{what}: {path.name} is not a {expected.replace('_', ' ')} file (it looks like {kind}); its metadata field 'format' is {found!r}")
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
        raise FileFormatError(f"{what}: {path.name} does not list its target layers (metadata field 'targets' is missing)")
    try:
        if raw.startswith("gz:"):
            raw = gzip.decompress(base64.b64decode(raw[3:])).decode()
        layers = targets_from_json(raw)
    except Exception as error:
        raise FileFormatError(f"{what}: {path.name} has an unreadable target list in metadata field 'targets'") from error
    if targets_hash(layers) != metadata.get("targets_sha256"):
        raise FileFormatError(f"{what}: {path.name}: the target list (metadata field 'targets') does not match its checksum ('targets_sha256'); the file was altered")
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
        components = sorted({layer_component(layer.name) for layer in self.layers})
        return (
            f"{self.path.name}: base {self.base_arch}, {len(self.layers)} layers ({', '.join(components)}), "
            f"{self.config.output} rank {self.config.rank}; expects {features.hidden_state} "
            f"({features.tokens}x{features.dim}) from {features.encoder or 'a CLIP vision model'}"
            + ("; also predicts a word embedding (for Subject Prompt Encode, Subject Tuning)" if self.config.token_embedding_dim else "")
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
    except HyperNetError as error:
        raise FileFormatError(f"{what}: {path.name} has an invalid metadata field 'config': {error}") from error
    return HyperNetInfo(
        path=path,
        config=config,
        layers=_targets_from_metadata(metadata, what, path),
        base_arch=metadata.get("base_arch", "unknown"),
        provenance=_provenance(metadata, what, path),
        format_version=int(metadata["format_version"]),
    )


def _provenance(metadata: dict[str, str], what: str, path: Path) -> dict:
    provenance = _json(metadata, "provenance", what, path) if "provenance" in metadata else {}
    if not isinstance(provenance, dict):
        raise FileFormatError(f"{what}: {path.name} has an invalid metadata field 'provenance' (not a JSON object)")
    return provenance


def _check_config_against_shapes(info: HyperNetInfo, shapes: dict[str, list[int]], what: str) -> None:
    """Compare the config with the stored tensors' shapes before building anything, so a damaged config
    (say a width of 10^9) is refused by name instead of allocating what it implies."""
    config, layers = info.config, info.layers
    if config.output == "lidb":
        predicted = sum(config.lidb.trainables_per_layer(layer) for layer in layers)
    else:
        predicted = sum(config.lora_rank * (layer.in_features + layer.out_features) for layer in layers)
    expected = {
        "feature_proj.weight": ([config.width, config.features.dim], "width, features.dim"),
        "feature_pos": ([config.features.tokens, config.width], "features.tokens, width"),
        "layer_pos": ([len(layers), config.width], "width"),
        "offset": ([predicted], "output, lidb (rank, a, b) or lora_rank"),
        "decoder.layers.0.linear1.weight": ([int(config.width * config.mlp_ratio), config.width], "width, mlp_ratio"),
    }
    if config.token_embedding_dim:
        expected["token_head.weight"] = ([config.token_embedding_dim, config.width], "token_embedding_dim")
    for key, (shape, fields) in expected.items():
        if shapes.get(key) != shape:
            found = f"holds {shapes[key]}" if key in shapes else "lacks it"
            raise FileFormatError(f"{what}: {info.path.name} does not match its own config: fields {fields} imply tensor {key} of shape {shape}, the file {found}")
    depth = len({key.split(".")[2] for key in shapes if key.startswith("decoder.layers.")})
    if depth != config.depth:
        raise FileFormatError(f"{what}: {info.path.name} does not match its own config: field depth is {config.depth}, the file holds {depth} decoder layers")


def load_hypernet(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[HyperNetwork, HyperNetInfo]:
    info = read_hypernet_info(path)
    what = "hypernetwork"
    header = safetensors_header(info.path) or {}
    _check_config_against_shapes(info, {k: v.get("shape") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}, what)
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
            raise FileFormatError(f"{what}: {info.path.name} lacks the LiDB aux-basis checksum (metadata field 'lidb_aux_sha256')")
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
    """Parse kohya keys (either UNet naming) back into factors under canonical names, folding ``alpha / rank`` into ``up``.

    A missing alpha, or an alpha of 0, means alpha = rank (scale 1), as kohya's own loader reads it.
    """
    down, up = {}, {}
    for key in state:
        if key.endswith(".lora_up.weight") and key[: -len(".lora_up.weight")] + ".lora_down.weight" not in state:
            raise FileFormatError(f"{what}: {key[: -len('.lora_up.weight')]} has an up factor but no down factor")
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
            if rank == 0 or up_tensor.shape[1] != rank:
                raise FileFormatError(f"{what}: {name} has factors of shapes {tuple(up_tensor.shape)} (up) and {tuple(down_tensor.shape)} (down), "
                                      "which do not form a LoRA of rank >= 1")
            alpha = float(rank)
            if f"{name}.alpha" in state:
                stored = state[f"{name}.alpha"]
                if stored.numel() != 1:
                    raise FileFormatError(f"{what}: {name}.alpha should be one number, it holds {stored.numel()}")
                alpha = float(stored) or float(rank)
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
    embedding: SubjectEmbedding | None = None,
) -> Path:
    """A standard kohya LoRA: ComfyUI's LoraLoader, A1111 and diffusers load it as is (SDXL in kohya's SDXL naming).

    A predicted word embedding travels inside as A1111's bundled embedding (``bundle_emb.<word>.string_to_param.*``,
    which A1111/Forge register as the word ``<word>``, and ComfyUI's ``embedding:<file>`` syntax also reads)."""
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
    tensors = lora_to_kohya(lora, dtype, unet_naming_for(base_arch))
    if embedding is not None:
        tensors[f"{BUNDLE_PREFIX}{embedding.word}{BUNDLE_SUFFIX}"] = embedding.vectors.to(dtype).contiguous()
        metadata["placeholder"] = embedding.word
    return write_safetensors_atomic(tensors, metadata, path)


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
    embedding: SubjectEmbedding | None = None,
) -> Path:
    """Only the LiDB trainables (one flat float32 vector) + what is needed to rebuild the aux bases
    (+ the predicted word embedding as ``token_embedding``, its word in the metadata).

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
    tensors = {"lidb_trainables": flat}
    if embedding is not None:
        tensors["token_embedding"] = embedding.vectors.float().contiguous()
        metadata["placeholder"] = embedding.word
    return write_safetensors_atomic(tensors, metadata, path)


def load_compact_subject_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], LidbBasis, dict[str, str]]:
    """Trainables per layer, the rebuilt (and checksum-verified) aux bases, and the metadata."""
    path = Path(path)
    what = "compact subject LoRA"
    tensors, metadata = read_safetensors(path, what)
    _check_format(metadata, COMPACT_LORA_FORMAT, what, path, list(tensors))
    _require_finite(tensors, what, path)
    layers = _targets_from_metadata(metadata, what, path)
    try:
        config = LidbConfig.from_dict(_json(metadata, "lidb", what, path))
    except HyperNetError as error:
        raise FileFormatError(f"{what}: {path.name} has an invalid metadata field 'lidb': {error}") from error
    basis = LidbBasis(layers, config)
    basis.verify(metadata.get("lidb_aux_sha256", ""), f"{what} {path.name}")
    flat = tensors.get("lidb_trainables")
    if flat is None or flat.dim() != 1 or flat.numel() != basis.num_trainables():
        found = "none" if flat is None else tuple(flat.shape)
        raise FileFormatError(f"{what}: {path.name} should hold {basis.num_trainables()} LiDB numbers as its metadata field 'lidb' "
                              f"(rank {config.rank}, a {config.a}, b {config.b}) implies; tensor lidb_trainables has shape {found}")
    sizes = [config.trainables_per_layer(layer) for layer in layers]
    trainables = {layer.name: chunk for layer, chunk in zip(layers, torch.split(flat, sizes))}
    return trainables, basis, metadata


def expand_compact_subject_lora(path: str | os.PathLike) -> tuple[LoraWeights, list[TargetLayer], dict[str, str]]:
    """Compact -> the exact factors the standard file holds."""
    trainables, basis, metadata = load_compact_subject_lora(path)
    return basis.expand_exact(trainables), basis.layers, metadata


# ----------------------------------------------------------------------------- the predicted word embedding

BUNDLE_PREFIX, BUNDLE_SUFFIX = "bundle_emb.", ".string_to_param.*"


@dataclass
class SubjectEmbedding:
    """The word embedding a tuning-encoder hypernetwork predicts for its placeholder word (``word``, e.g. "sks")."""

    word: str
    vectors: torch.Tensor  # (1, dim): one token

    def __post_init__(self) -> None:
        if self.vectors.dim() == 1:
            self.vectors = self.vectors.unsqueeze(0)
        if self.vectors.dim() != 2 or self.vectors.shape[0] != 1:
            raise HyperNetError(f"a subject embedding is one token vector, got shape {tuple(self.vectors.shape)}")
        if not self.word or any(c.isspace() or c == "." for c in self.word):
            raise HyperNetError(f"invalid placeholder word {self.word!r}: one word, no dots or spaces")


def save_textual_inversion(path: str | os.PathLike, embedding: SubjectEmbedding, *, base_arch: str) -> Path:
    """A textual-inversion file as A1111 writes them (``emb_params``, one vector): ComfyUI's ``embedding:<name>``
    prompt syntax and A1111/Forge (as the word ``<name>``) load it as is."""
    metadata = {"format": "textual_inversion", "placeholder": embedding.word, "base_arch": base_arch}
    return write_safetensors_atomic({"emb_params": embedding.vectors.float().contiguous()}, metadata, path)


def load_subject_embedding(path: str | os.PathLike) -> SubjectEmbedding | None:
    """The word embedding a subject LoRA file (standard or compact) or a textual-inversion file carries; None if none."""
    path = Path(path)
    tensors, metadata = read_safetensors(path, "subject embedding")
    if "token_embedding" in tensors and metadata.get("format") == COMPACT_LORA_FORMAT:
        found = [(metadata.get("placeholder", "sks"), tensors["token_embedding"])]
    elif "emb_params" in tensors:
        found = [(metadata.get("placeholder", path.name.split(".")[0]), tensors["emb_params"])]
    else:
        found = [(k[len(BUNDLE_PREFIX): -len(BUNDLE_SUFFIX)], v) for k, v in tensors.items() if k.startswith(BUNDLE_PREFIX) and k.endswith(BUNDLE_SUFFIX)]
    if not found:
        return None
    if len(found) > 1:
        raise FileFormatError(f"{path.name} bundles {len(found)} embeddings ({', '.join(w for w, _ in found)}); a subject LoRA carries one")
    word, vectors = found[0]
    _require_finite({word: vectors}, "subject embedding", path)
    try:
        return SubjectEmbedding(word, vectors.float())
    except HyperNetError as error:
        raise FileFormatError(f"{path.name}: {error}") from error
