"""A subject LoRA as the product handles it: the LoRA factors plus what made them.

Predicted by a hypernetwork (LiDB trainables kept, so it can also be saved compactly), or produced
by the finetune (a plain LoRA). This is the object the ComfyUI nodes and the training exports pass
around; files are written through :mod:`hypernet.files`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import HyperNetInfo, SubjectEmbedding, save_compact_subject_lora, save_subject_lora, save_textual_inversion
from .hypernetwork import HyperNetwork
from .errors import HyperNetError
from .lidb import LidbBasis
from .lora import LoraWeights
from .targets import TargetLayer


@dataclass
class SubjectLora:
    layers: list[TargetLayer]
    lora: LoraWeights  # float32, one subject (unbatched)
    base_arch: str
    trainables: dict[str, torch.Tensor] | None = None  # LiDB numbers, when predicted in LiDB form
    basis: LidbBasis | None = None
    provenance: dict = field(default_factory=dict)
    token_embedding: torch.Tensor | None = None  # (dim,): the predicted word embedding of ``placeholder``
    placeholder: str = "sks"

    @property
    def can_save_compact(self) -> bool:
        return self.trainables is not None and self.basis is not None and not self.basis.config.learned_aux

    @property
    def embedding(self) -> SubjectEmbedding | None:
        return None if self.token_embedding is None else SubjectEmbedding(self.placeholder, self.token_embedding.detach().float().cpu())

    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
        return save_subject_lora(path, self.lora, self.layers, base_arch=self.base_arch, dtype=dtype, provenance=self.provenance, embedding=self.embedding)

    def save_compact(self, path: str | os.PathLike) -> Path:
        return save_compact_subject_lora(path, self.trainables, self.basis, base_arch=self.base_arch, provenance=self.provenance, embedding=self.embedding)

    def save_embedding(self, path: str | os.PathLike) -> Path:
        """The word embedding alone, as a textual-inversion file (ComfyUI's models/embeddings, A1111's embeddings/)."""
        if self.embedding is None:
            raise HyperNetError("this subject LoRA has no word embedding (its hypernetwork was not trained with --token-embedding)")
        return save_textual_inversion(path, self.embedding, base_arch=self.base_arch)


@torch.no_grad()
def predict_subject_lora(hypernet: HyperNetwork, reference_features: torch.Tensor, info: HyperNetInfo | None = None, base_arch: str = "unknown") -> SubjectLora:
    """One forward pass: reference images' features ``(N, tokens, dim)`` -> one subject LoRA.

    LiDB predictions are expanded exactly (float64, rounded once), so the standard and compact files
    written from the result hold the same numbers.
    """
    param = next(hypernet.parameters())
    output = hypernet.predict(reference_features.to(param.device, param.dtype))
    predicted = {name: value[0].float().cpu() for name, value in output.trainables.items()}
    if hypernet.basis is not None:
        basis, trainables = hypernet.basis, predicted
        lora = basis.expand_exact(predicted)
    else:  # raw LoRA factors: no LiDB numbers to keep
        basis, trainables = None, None
        lora = hypernet.trainables_to_lora(predicted)
    provenance = {"hypernet": info.path.name} if info is not None else {}
    placeholder = str(info.provenance.get("placeholder", "sks")) if info is not None else "sks"
    return SubjectLora(
        layers=list(hypernet.layers),
        lora=lora.detach(),
        base_arch=info.base_arch if info is not None else base_arch,
        trainables=trainables,
        basis=basis,
        provenance=provenance,
        token_embedding=None if output.token_embedding is None else output.token_embedding[0].float().cpu(),
        placeholder=placeholder,
    )
