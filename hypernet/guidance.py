"""HM-CFG (hybrid-model classifier-free guidance) as pure functions of model predictions.

The base model keeps composition and prompt adherence, the subject (LoRA-adapted) model brings the
subject's identity. Default form, three predictions per step::

    out = base(uncond) + cfg_text * (base(cond) - base(uncond)) + cfg_subject * (subject(cond) - base(cond))

The coefficients of the three predictions sum to one, so the same formula holds for noise (eps) and
for denoised (x0) predictions alike -- ComfyUI guiders work on the latter. Outside the subject
window ``[subject_start, subject_end]`` of the schedule the subject term is off and the step is plain CFG on the base
model. The cheap form uses two predictions: ``uncond + cfg * (subject(cond) - uncond)``.
With ``cfg_text = 1`` the default form is dual-path blending of the two models' conditional outputs,
``(1 - a) * base(cond) + a * subject(cond)`` with ``a = cfg_subject``.
"""

from __future__ import annotations

import torch


def hm_cfg(
    base_uncond: torch.Tensor,
    base_cond: torch.Tensor,
    subject_cond: torch.Tensor | None,
    cfg_text: float,
    cfg_subject: float,
) -> torch.Tensor:
    """Combine the three predictions; ``subject_cond=None`` (gate closed) gives plain CFG on the base."""
    out = base_uncond + cfg_text * (base_cond - base_uncond)
    if subject_cond is not None and cfg_subject != 0:
        out = out + cfg_subject * (subject_cond - base_cond)
    return out


def hm_cfg_two(uncond: torch.Tensor, subject_cond: torch.Tensor, cfg: float) -> torch.Tensor:
    """The 2-prediction form: ordinary CFG whose conditional branch is the subject model."""
    return uncond + cfg * (subject_cond - uncond)


def in_subject_window(progress: float, subject_start: float, subject_end: float) -> bool:
    """Whether the subject term is on at ``progress`` (0 = first step / highest noise, 1 = last).

    ``subject_start``/``subject_end`` are fractions of the schedule as in ComfyUI's start_percent/end_percent.
    """
    if not 0.0 <= subject_start <= subject_end <= 1.0:
        raise ValueError(f"need 0 <= subject_start <= subject_end <= 1, got {subject_start}, {subject_end}")
    return subject_start <= progress <= subject_end


def sigma_in_subject_window(sigma: float, subject_sigma_start: float, subject_sigma_end: float) -> bool:
    """The same gate in noise levels: the subject window runs from ``subject_sigma_start`` (high) down to ``subject_sigma_end``."""
    return subject_sigma_end <= sigma <= subject_sigma_start
