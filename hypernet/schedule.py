"""The DDPM noise schedule the denoising losses use (pure torch; SD1.5's by default)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NoiseSchedule:
    """``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps`` for integer ``t`` in ``[0, len)``."""

    alphas_cumprod: torch.Tensor

    @classmethod
    def scaled_linear(cls, steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> "NoiseSchedule":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1.0 - betas, dim=0).float())

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod.to(x0.device)[timesteps].to(x0.dtype)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return abar.sqrt().reshape(shape) * x0 + (1 - abar).sqrt().reshape(shape) * noise

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The matching k-diffusion noise level ``sigma = sqrt((1 - abar) / abar)`` (ComfyUI's convention)."""
        abar = self.alphas_cumprod[timesteps.cpu()]
        return ((1 - abar) / abar).sqrt()
