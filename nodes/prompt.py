"""Subject Prompt Encode: a prompt in which the placeholder word means the subject's predicted word embedding."""

from __future__ import annotations

import numbers

import torch

from hypernet.errors import HyperNetError
from hypernet.words import nearest_real_word, single_token_id
from .comfy_bridge import CATEGORY


def sd_tokenizer(clip):
    """ComfyUI's SD1 tokenizer inside a CLIP, and the key its tokens come under; SD1.5 CLIPs only (one encoder)."""
    outer = clip.tokenizer
    inner = getattr(outer, getattr(outer, "clip", ""), None)
    if inner is None or not hasattr(outer, "clip_name") or hasattr(outer, "clip_g"):
        raise HyperNetError("word embeddings are predicted for SD1.5 text encoders only; this CLIP is another family")
    return inner, outer.clip_name


def swap_token(tokens: dict, key: str, token_id: int, replacement) -> tuple[dict, int]:
    """The token lists with every ``token_id`` replaced (weights and word ids kept); how many were replaced."""
    count = 0

    def swap(entry):
        nonlocal count
        if isinstance(entry[0], numbers.Integral) and entry[0] == token_id:
            count += 1
            return (replacement, *entry[1:])
        return entry

    return {**tokens, key: [[swap(entry) for entry in chunk] for chunk in tokens[key]]}, count


def encode_with_placeholder(clip, text: str, word: str, replacement_for) -> list:
    """CLIPTextEncode's conditioning for ``text``, with the placeholder token replaced by ``replacement_for(id, table)``
    (a vector, which ComfyUI's encoder inserts as an embedding, or another token id)."""
    tokenizer, key = sd_tokenizer(clip)
    placeholder_id = single_token_id(tokenizer.tokenizer(word)["input_ids"][1:-1], word)
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight
    excluded = set(tokenizer.tokenizer.all_special_ids) | {placeholder_id}
    tokens, count = swap_token(clip.tokenize(text), key, placeholder_id, replacement_for(table, excluded))
    if count == 0:
        raise HyperNetError(f"the prompt does not contain the subject's word {word!r}; write it where the subject goes, "
                            f"e.g. 'a photo of {word} dog on the beach'")
    return clip.encode_from_tokens_scheduled(tokens)


class SubjectPromptEncode:
    DESCRIPTION = (
        "Encodes a prompt in which the subject's word (e.g. 'sks', from the hypernetwork's training) means the word embedding "
        "the hypernetwork predicted for this subject. Gives the subject conditioning (for KSampler, or HM-CFG's subject_positive) "
        "and the base conditioning, in which the word is the nearest real word (HM-CFG's positive)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The subject-adapted CLIP (Predict Subject LoRA's clip output)."}),
                "subject_lora": ("LORA_MODEL", {"tooltip": "From Predict Subject LoRA (or a loaded compact subject LoRA) with a word embedding."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "a photo of sks toy on the beach",
                                    "tooltip": "The prompt; the subject's word marks where the subject goes."}),
            },
            "optional": {
                "base_clip": ("CLIP", {"tooltip": "The checkpoint's own CLIP, for the base conditioning (default: clip)."}),
            },
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("subject_positive", "positive")
    OUTPUT_TOOLTIPS = (
        "The prompt with the subject's word as its predicted embedding, through the adapted CLIP.",
        "The prompt with the subject's word replaced by its nearest real word, through base_clip: HM-CFG's base prediction, or Subject Dual-Path's vanilla_positive.",
    )
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, clip, subject_lora, text, base_clip=None):
        subject = getattr(subject_lora, "subject", None)
        embedding = subject.embedding if subject is not None else None
        if embedding is None:
            raise HyperNetError("this subject LoRA has no word embedding: its hypernetwork was trained without --token-embedding. "
                                "Use CLIPTextEncode instead")
        vector = embedding.vectors

        def as_vector(table, excluded):
            if vector.shape[-1] != table.shape[-1]:
                raise HyperNetError(f"the subject's word embedding has size {vector.shape[-1]}, this CLIP's tokens {table.shape[-1]}: "
                                    "the hypernetwork was trained for another text encoder")
            return vector.to(torch.float32)

        def as_nearest_word(table, excluded):
            return nearest_real_word(vector, table, excluded)

        subject_cond = encode_with_placeholder(clip, text, embedding.word, as_vector)
        base_cond = encode_with_placeholder(base_clip if base_clip is not None else clip, text, embedding.word, as_nearest_word)
        return (subject_cond, base_cond)
