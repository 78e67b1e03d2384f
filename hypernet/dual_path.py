"""Dual-path blending (the domain-agnostic tuning encoder): every attention branch runs on two paths and its output
is ``alpha * adapted + (1 - alpha) * vanilla``, so the subject is added without giving up the prior.

The adapted path is the model as called (subject LoRA on, the prompt with the predicted word embedding); the
vanilla path re-runs the same attention module with the LoRA off and the hard prompt (the placeholder replaced by
its nearest real word). How to make that second call is framework business (diffusers and ComfyUI pass the
context differently), so the caller gives it as ``vanilla(module, args, kwargs) -> output``.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

VanillaCall = Callable[[nn.Module, tuple, dict], torch.Tensor]


def blend(adapted: torch.Tensor, vanilla: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * adapted + (1 - alpha) * vanilla``; alpha 1 is the adapted model alone, 0 the vanilla one."""
    if alpha == 1.0:
        return adapted
    if alpha == 0.0:
        return vanilla
    return vanilla + alpha * (adapted - vanilla)


def vanilla_context(context: torch.Tensor, reads_hard_prompt: Sequence[bool], hard_prompt: torch.Tensor) -> torch.Tensor:
    """The vanilla path's cross-attention context for a batch of equal chunks (ComfyUI's cond and uncond rows): a chunk
    flagged True reads ``hard_prompt`` (``(1 or more, tokens, dim)``, repeated over the chunk's rows), the others keep
    their own rows of ``context``. Different token counts are matched as ComfyUI batches prompts of different lengths:
    each repeated to their least common multiple (attention over a repeated token list is the same attention)."""
    chunks = len(reads_hard_prompt)
    if chunks == 0 or context.shape[0] % chunks:
        raise ValueError(f"a batch of {context.shape[0]} rows cannot be split into {chunks} equal chunks")
    rows = context.shape[0] // chunks
    tokens = math.lcm(context.shape[1], hard_prompt.shape[1])
    own = context.repeat(1, tokens // context.shape[1], 1)
    hard = hard_prompt.to(context).repeat(1, tokens // hard_prompt.shape[1], 1)
    hard = hard[torch.arange(rows, device=hard.device) % hard.shape[0]]  # cyclic, as ComfyUI repeats a conditioning to the batch
    return torch.cat([hard if flag else own[i * rows:(i + 1) * rows] for i, flag in enumerate(reads_hard_prompt)])


class DualPathHandle:
    def __init__(self, handles: list):
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "DualPathHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach_dual_path(modules: Mapping[str, nn.Module], alpha: float | Mapping[str, float], vanilla: VanillaCall) -> DualPathHandle:
    """Blend each module's output with its vanilla-path output (``alpha`` per module name, or one for all)."""
    busy = {"vanilla": False}  # the vanilla call re-enters the module: its own output is returned as it is

    def hook_for(name: str):
        weight = alpha if isinstance(alpha, (int, float)) else alpha[name]

        def hook(module, args, kwargs, output):
            if busy["vanilla"] or weight == 1.0:
                return output
            busy["vanilla"] = True
            try:
                other = vanilla(module, args, kwargs)
            finally:
                busy["vanilla"] = False
            return blend(output, other, float(weight))

        return hook

    return DualPathHandle([module.register_forward_hook(hook_for(name), with_kwargs=True) for name, module in modules.items()])
