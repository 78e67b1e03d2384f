"""Low-rank weight deltas per target layer: ``delta_W = up @ down`` (scale folded in).

``down`` is ``(rank, in_features)`` and ``up`` is ``(out_features, rank)``, optionally with a leading
batch dimension (one LoRA per batch element, as the hypernetwork predicts them during training).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from .errors import TargetMismatchError
from .targets import TargetLayer, names_within


@dataclass
class LoraWeights:
    """Ordered per-layer factors; iteration order is the canonical target order."""

    down: dict[str, torch.Tensor] = field(default_factory=dict)
    up: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.down.keys() != self.up.keys():
            raise TargetMismatchError("LoRA 'down' and 'up' factors name different layers")

    def __iter__(self) -> Iterator[str]:
        return iter(self.down)

    def __len__(self) -> int:
        return len(self.down)

    @property
    def names(self) -> list[str]:
        return list(self.down)

    @property
    def batch_size(self) -> int | None:
        """Batch size of per-sample factors, ``None`` for one LoRA shared by the whole batch."""
        first = next(iter(self.down.values()))
        return first.shape[0] if first.dim() == 3 else None

    def rank(self, name: str) -> int:
        return self.down[name].shape[-2]

    def delta(self, name: str) -> torch.Tensor:
        """The full ``out x in`` weight delta of one layer (batched if the factors are)."""
        return self.up[name] @ self.down[name]

    def select(self, index: int) -> "LoraWeights":
        """The LoRA of one batch element."""
        return LoraWeights({n: d[index] for n, d in self.down.items()}, {n: u[index] for n, u in self.up.items()})

    def restricted_to(self, selection: str | Iterable[str]) -> "LoraWeights":
        """The layers of one component (``'lora_unet'``, ``'lora_te1'``, ...) or of a collection of names (e.g. the
        modules of one model part, a dict counting by its keys), in this LoRA's order; the tensors are shared."""
        names = names_within(self.names, selection)
        return LoraWeights({n: self.down[n] for n in names}, {n: self.up[n] for n in names})

    def repeated(self, times: int, *, interleave: bool = False) -> "LoraWeights":
        """This LoRA ``times`` over along the batch (autograd flows back). A shared LoRA becomes ``times`` per-sample
        copies (views); per-sample factors are tiled, ``[a, b] -> [a, b, a, b]`` (a batch of concatenated chunks, e.g.
        CFG's ``[uncond, cond]``), or with ``interleave`` each repeated in place, ``[a, b] -> [a, a, b, b]`` (a
        subject-major batch of several samples per subject)."""
        if self.batch_size is None:
            return LoraWeights({n: d.expand(times, *d.shape) for n, d in self.down.items()}, {n: u.expand(times, *u.shape) for n, u in self.up.items()})
        if times == 1:
            return self
        if interleave:
            return LoraWeights({n: d.repeat_interleave(times, 0) for n, d in self.down.items()},
                               {n: u.repeat_interleave(times, 0) for n, u in self.up.items()})
        return LoraWeights({n: torch.cat([d] * times) for n, d in self.down.items()}, {n: torch.cat([u] * times) for n, u in self.up.items()})

    def to(self, *args, **kwargs) -> "LoraWeights":
        return LoraWeights({n: d.to(*args, **kwargs) for n, d in self.down.items()}, {n: u.to(*args, **kwargs) for n, u in self.up.items()})

    def clone(self) -> "LoraWeights":
        return LoraWeights({n: d.clone() for n, d in self.down.items()}, {n: u.clone() for n, u in self.up.items()})

    def detach(self) -> "LoraWeights":
        return LoraWeights({n: d.detach() for n, d in self.down.items()}, {n: u.detach() for n, u in self.up.items()})

    def check_against(self, layers: Sequence[TargetLayer]) -> None:
        """Raise if these factors don't fit the given target layers (names and shapes)."""
        by_name = {layer.name: layer for layer in layers}
        unknown = [n for n in self.down if n not in by_name]
        if unknown:
            raise TargetMismatchError(f"LoRA has {len(unknown)} layer(s) the model does not have, e.g. {unknown[0]}")
        for name, down in self.down.items():
            layer, up = by_name[name], self.up[name]
            if down.shape[-1] != layer.in_features or up.shape[-2] != layer.out_features or up.shape[-1] != down.shape[-2]:
                raise TargetMismatchError(
                    f"LoRA layer {name}: factors {tuple(up.shape)} @ {tuple(down.shape)} do not fit "
                    f"a {layer.in_features}->{layer.out_features} linear"
                )


def combine_exact(parts: Sequence[LoraWeights], max_rank: int | None = None) -> LoraWeights:
    """Sum several LoRAs layer by layer and re-factor each sum as one LoRA by SVD.

    ``sum_i up_i @ down_i = U @ V^T`` with ``U = [up_1 .. up_k]``, ``V = [down_1^T .. down_k^T]``.
    QR of both sides reduces the SVD to a small ``R x R`` matrix (``R`` = total rank), so the result is
    exact up to float error at rank ``<= R``, and cheap even for 1280-wide layers. ``max_rank`` truncates
    (then it is the best rank-``max_rank`` approximation). Singular values are split evenly as
    ``sqrt(s)`` between ``up`` and ``down`` so both factors have comparable scale.
    """
    names = parts[0].names
    down_out, up_out = {}, {}
    for name in names:
        ups = torch.cat([p.up[name].double() for p in parts], dim=-1)  # out x R
        downs = torch.cat([p.down[name].double() for p in parts], dim=-2)  # R x in
        q_up, r_up = torch.linalg.qr(ups)
        q_down, r_down = torch.linalg.qr(downs.transpose(-1, -2))
        u, s, vh = torch.linalg.svd(r_up @ r_down.transpose(-1, -2))
        keep = s.shape[-1] if max_rank is None else min(max_rank, s.shape[-1])
        root = s[..., :keep].sqrt()
        up_out[name] = ((q_up @ u[..., :keep]) * root.unsqueeze(-2)).to(parts[0].up[name].dtype)
        down_out[name] = (root.unsqueeze(-1) * (vh[..., :keep, :] @ q_down.transpose(-1, -2))).to(parts[0].down[name].dtype)
    return LoraWeights(down_out, up_out)
