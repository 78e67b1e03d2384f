"""The toy world's pretrained base model, image encoder and attribute reader, shipped small enough to live in
the repository.

``python -m experiments.pretrain`` pretrains them (hours on a CPU; the cost is in ``pretrain.json``);
:func:`pack_toy_model` stores them in fp16 and keeps only the token-embedding rows the toy world's vocabulary
uses (the full 49,408 x 64 table alone would be 6 MB). ``--backbone toy`` / ``--image-encoder toy`` load them.
Prompts outside the toy vocabulary get zero embeddings for the unknown words: this is a demonstration model,
not a general one.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from hypernet.files import read_safetensors

TOY_DIR = Path(__file__).parent / "toy_model"


def toy_vocabulary_ids(tokenizer) -> list[int]:
    from .synthetic import BACKGROUNDS, COLOURS, MARKINGS, PATTERNS, POSITIONS, SCALES, SHAPES, Context, SyntheticWorld

    words = ["a photo of a an", "sks", "toy", "and", "with", "no marking", "marking", "on a background", "blurry", ""]
    words += list(SHAPES) + list(COLOURS) + list(PATTERNS) + list(PATTERNS.values()) + list(MARKINGS) + list(BACKGROUNDS) + list(POSITIONS) + list(SCALES)
    captions = [SyntheticWorld.caption(Context(b, p, s), token) for b, p, s in itertools.product(BACKGROUNDS, POSITIONS, SCALES) for token in (None, "sks")]
    world = SyntheticWorld(0)
    captions += [SyntheticWorld.caption(Context(*next(iter(itertools.product(BACKGROUNDS, POSITIONS, SCALES)))), description=s.describe()) for s in world.all_subjects()]
    ids = set()
    for text in words + captions:
        ids.update(tokenizer(text).input_ids)
    ids.update([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id])
    return sorted(ids)


def pack_toy_model(study_out: Path, dest: Path = TOY_DIR, pretrain_record: dict | None = None) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    base = Path(study_out) / "base"
    dest.mkdir(parents=True, exist_ok=True)
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        cls.from_pretrained(base / name, local_files_only=True).to(torch.float16).save_pretrained(dest / name)
    DDPMScheduler.from_pretrained(base / "scheduler", local_files_only=True).save_pretrained(dest / "scheduler")
    CLIPVisionModelWithProjection.from_pretrained(Path(study_out) / "image_encoder", local_files_only=True).to(torch.float16).save_pretrained(dest / "image_encoder")
    text = CLIPTextModel.from_pretrained(base / "text_encoder", local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer", local_files_only=True)
    kept = toy_vocabulary_ids(tokenizer)
    state = {k: v.half() for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    key = next(k for k in state if k.endswith("token_embedding.weight"))
    state["kept_token_rows"] = state.pop(key)[kept].contiguous()
    state["kept_token_ids"] = torch.tensor(kept)
    save_file(state, dest / "text_encoder.safetensors", metadata={"config": text.config.to_json_string(), "embedding_key": key})
    reader = Path(study_out) / "reader.safetensors"
    if reader.exists():
        from .toy_reader import load_reader, save_reader

        save_reader(load_reader(reader).half(), dest / "reader.safetensors")
    if pretrain_record is not None:
        (dest / "pretrain.json").write_text(json.dumps(pretrain_record, indent=1) + "\n")
    (dest / "README.md").write_text("Toy-world base model, image encoder and attribute reader pretrained by `python -m experiments.pretrain` "
                                    "(cost and settings in pretrain.json; see docs/study.md); packed by training/toy_model.py. Loaded by "
                                    "`--backbone toy` / `--image-encoder toy`; the reader scores toy-world images (training-time validation, the study).\n")
    return dest


def load_toy_text_encoder(dest: Path = TOY_DIR):
    from transformers import CLIPTextConfig, CLIPTextModel

    state, header = read_safetensors(dest / "text_encoder.safetensors", "toy text encoder")
    model = CLIPTextModel(CLIPTextConfig(**json.loads(header["config"])))
    table = torch.zeros(model.config.vocab_size, model.config.hidden_size, dtype=torch.float16)
    table[state.pop("kept_token_ids")] = state.pop("kept_token_rows")
    state[header["embedding_key"]] = table
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return model


def toy_available(dest: Path = TOY_DIR) -> bool:
    return (dest / "text_encoder.safetensors").exists()


def load_toy_reader(dest: Path = TOY_DIR):
    """The shipped attribute reader, or None where the toy model has none."""
    from .toy_reader import load_reader

    path = dest / "reader.safetensors"
    return load_reader(path) if path.exists() else None
