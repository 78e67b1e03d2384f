"""The DDPM noise schedule the denoising losses use (pure torch; SD1.5's by default), and its k-diffusion view.

ComfyUI (k-diffusion) writes the same noising as ``x = x0 + sigma * eps`` with ``x = x_t / sqrt(abar_t)`` and
``sigma = sqrt((1 - abar_t) / abar_t)``, and its models predict the denoised ``x0``; the conversions are here.
"""

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

    @classmethod
    def from_sigmas(cls, sigmas: torch.Tensor) -> "NoiseSchedule":
        """The schedule of k-diffusion noise levels (ComfyUI's ``model_sampling.sigmas``): ``abar = 1 / (1 + sigma^2)``."""
        return cls(1.0 / (1.0 + sigmas**2))

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

    def to_sigma_space(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A DDPM sample at integer ``timesteps`` as k-diffusion sees it: ``(x_t / sqrt(abar_t), sigma_t)``, which is
        ``x0 + sigma * eps``; ``sigma`` per sample, shaped to broadcast over ``x_t``."""
        abar = self.alphas_cumprod.to(x_t.device)[timesteps].reshape(-1, *([1] * (x_t.dim() - 1)))
        return x_t / abar.sqrt(), ((1 - abar) / abar).sqrt()


def eps_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The noise a denoised (x0) prediction implies at ``x = x0 + sigma * eps``."""
    return (x - denoised) / sigma
