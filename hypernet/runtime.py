"""Applying LoRA deltas to a live model: removable forward hooks (any batch layout) or weight merges.

Hooks add ``strength * (x @ down^T) @ up^T`` to a linear's output. Factors may be shared by the batch
(``(r, in)``) or per sample (``(B, r, in)``: a different LoRA for every batch element, as in
hypernetwork training), and ``strength`` may be a float or a ``(B,)`` tensor gating each sample
(HM-CFG runs base and adapted predictions in one batch this way). Nothing is detached: gradients flow
into the factors, so a hypernetwork can be trained through a frozen backbone.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .errors import TargetMismatchError
from .lora import LoraWeights


class LoraHandle:
    """Hooks attached by :func:`attach_lora`; ``remove()`` detaches them (also usable as a context)."""

    def __init__(self, handles: list[torch.utils.hooks.RemovableHandle]):
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "LoraHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _lora_hook(name: str, down: torch.Tensor, up: torch.Tensor, strength: float | torch.Tensor):
    per_sample = down.dim() == 3
    gate = strength if isinstance(strength, torch.Tensor) else None

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        batch = x.shape[0]
        d, u = down.to(x.dtype), up.to(x.dtype)
        if per_sample:
            if d.shape[0] != batch:
                raise TargetMismatchError(
                    f"{name}: {d.shape[0]} per-sample LoRAs for a batch of {batch}; "
                    "give one LoRA per batch element or a single shared LoRA"
                )
            flat = x.reshape(batch, -1, x.shape[-1])
            delta = torch.bmm(torch.bmm(flat, d.transpose(1, 2)), u.transpose(1, 2)).reshape(output.shape)
        else:
            delta = (x @ d.T) @ u.T
        if gate is not None:
            g = gate.to(device=x.device, dtype=x.dtype)
            if g.numel() != batch:
                raise TargetMismatchError(f"{name}: {g.numel()} strengths for a batch of {batch}")
            delta = delta * g.reshape(batch, *([1] * (delta.dim() - 1)))
        elif strength != 1.0:
            delta = delta * strength
        return output + delta

    return hook


def attach_lora(
    modules: Mapping[str, nn.Linear], lora: LoraWeights, strength: float | torch.Tensor = 1.0
) -> LoraHandle:
    """Hook ``lora`` onto the named linears; layers of ``modules`` absent from ``lora`` stay untouched."""
    missing = [name for name in lora.names if name not in modules]
    if missing:
        raise TargetMismatchError(f"LoRA layer {missing[0]} (and {len(missing) - 1} more) not found in the model")
    handles = [
        modules[name].register_forward_hook(_lora_hook(name, lora.down[name], lora.up[name], strength))
        for name in lora.names
    ]
    return LoraHandle(handles)


class MergeHandle:
    """Weights changed by :func:`merge_lora`; ``unmerge()`` restores the exact original tensors."""

    def __init__(self, originals: dict[nn.Linear, torch.Tensor]):
        self._originals = originals

    @torch.no_grad()
    def unmerge(self) -> None:
        for module, weight in self._originals.items():
            module.weight.copy_(weight)
        self._originals = {}

    def __enter__(self) -> "MergeHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.unmerge()


@torch.no_grad()
def merge_lora(modules: Mapping[str, nn.Linear], lora: LoraWeights, strength: float = 1.0) -> MergeHandle:
    """Add ``strength * up @ down`` into each weight in place; keeps a copy to unmerge exactly.

    (Subtracting the delta again would leave float residue; a copy of the adapted layers is small.)
    """
    if lora.batch_size is not None:
        raise TargetMismatchError("per-sample LoRAs cannot be merged into one set of weights; select one first")
    originals: dict[nn.Linear, torch.Tensor] = {}
    for name in lora.names:
        module = modules[name]
        weight = module.weight
        originals[module] = weight.detach().clone()
        delta = (lora.up[name].double() @ lora.down[name].double()) * strength
        weight.copy_((weight.double() + delta.to(weight.device)).to(weight.dtype))
    return MergeHandle(originals)
