"""The placeholder word and the predicted word embedding: finding the word in token ids, its nearest real word."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from .errors import HyperNetError


def nearest_real_word(vector: torch.Tensor, table: torch.Tensor, excluded: Iterable[int] = ()) -> int:
    """Row of ``table`` (a text encoder's token embeddings) nearest to ``vector`` by cosine, among real words:
    rows in ``excluded`` (special tokens, the placeholder itself) and all-zero rows (a pruned vocabulary) never win.
    What the vanilla path of dual-path sampling, and HM-CFG's base prediction, read in the placeholder's place."""
    vector = vector.reshape(-1).float()
    if vector.shape[0] != table.shape[-1]:
        raise HyperNetError(f"a word embedding of size {vector.shape[0]} does not fit this text encoder (token size {table.shape[-1]})")
    table = table.detach().float().to(vector.device)
    similarity = F.normalize(table, dim=-1) @ F.normalize(vector, dim=0)
    similarity[table.abs().sum(dim=-1) == 0] = float("-inf")
    excluded = [i for i in excluded if 0 <= i < table.shape[0]]
    if excluded:
        similarity[excluded] = float("-inf")
    return int(similarity.argmax())


def single_token_id(ids: list[int], word: str) -> int:
    """The one token id ``word`` encodes to (ids without start/end tokens); a placeholder must be one token."""
    if len(ids) != 1:
        raise HyperNetError(f"the placeholder word {word!r} is {len(ids)} tokens for this tokenizer; a predicted word embedding replaces exactly one")
    return ids[0]
