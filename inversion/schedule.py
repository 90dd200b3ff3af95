"""Noise schedules: DDPM's (Ho et al. 2020), and rectified flow's in sigma space (SD3, Flux).

- ``DDPMSchedule``: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t in [0, T). Stable Diffusion uses
  the "scaled_linear" betas (linear in sqrt(beta) from 0.00085 to 0.012, T = 1000). Conversions between
  the eps, v and x0 parameterisations, and the v target.
- ``FlowMatchingSchedule``: x_t = (1 - sigma_t) x0 + sigma_t eps with sigma_t = shift s / (1 + (shift - 1) s),
  s = (t + 1) / T, t in [0, T) (SD3's time shift; shift 1 = the plain straight path); the model predicts
  the velocity d x_t / d sigma = eps - x0 (Esser et al. 2024, rectified flow).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DDPMSchedule", "FlowMatchingSchedule"]


@dataclass
class DDPMSchedule:
    alphas_cumprod: torch.Tensor  # [T] float64 on the CPU

    @classmethod
    def make(cls, num_timesteps: int = 1000, kind: str = "scaled_linear",
             beta_start: float = 0.00085, beta_end: float = 0.012) -> "DDPMSchedule":
        if kind == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
        elif kind == "linear":
            betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        elif kind == "cosine":
            # Nichol & Dhariwal (2021), Eq. 17, s = 0.008, betas clipped at 0.999.
            s = 0.008
            x = torch.linspace(0, num_timesteps, num_timesteps + 1, dtype=torch.float64)
            f = torch.cos(((x / num_timesteps) + s) / (1 + s) * torch.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"unknown schedule kind {kind!r}; use scaled_linear, linear or cosine")
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def _coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas_cumprod.to(like.device)[t.to(like.device).long()].to(like.dtype)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return abar.sqrt().view(shape), (1 - abar).sqrt().view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self._coefs(t, x0)
        return a * x0 + s * noise

    def eps_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar) eps - sqrt(1-abar) x0  =>  eps = sqrt(abar) v + sqrt(1-abar) x_t."""
        a, s = self._coefs(t, x_t)
        return a * v + s * x_t

    def eps_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self._coefs(t, x_t)
        return (x_t - a * x0) / s

    def sigmas(self) -> torch.Tensor:
        """The equivalent k-diffusion sigmas, sqrt((1 - abar) / abar)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022): what a v-model should predict."""
        a, s = self._coefs(t, x0)
        return a * noise - s * x0

    def v_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar), so v = (eps - sqrt(1-abar) x_t) / sqrt(abar)."""
        a, s = self._coefs(t, x_t)
        return (eps - s * x_t) / a


@dataclass
class FlowMatchingSchedule:
    """Rectified flow in sigma space: ``sigmas[t]`` for t in [0, T), increasing to 1 (pure noise)."""

    sigmas: torch.Tensor  # [T] float64 on the CPU, in (0, 1]

    @classmethod
    def make(cls, num_timesteps: int = 1000, shift: float = 1.0) -> "FlowMatchingSchedule":
        if num_timesteps < 1 or not shift > 0:
            raise ValueError(f"need num_timesteps >= 1 and shift > 0, got {num_timesteps} and {shift}")
        s = torch.arange(1, num_timesteps + 1, dtype=torch.float64) / num_timesteps
        return cls(shift * s / (1 + (shift - 1) * s))

    @property
    def num_timesteps(self) -> int:
        return int(self.sigmas.shape[0])

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        sig = self.sigmas.to(like.device)[t.to(like.device).long()].to(like.dtype)
        return sig.view((-1,) + (1,) * (like.ndim - 1))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self._sigma(t, x0)
        return (1 - s) * x0 + s * noise

    def velocity_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """d x_t / d sigma = eps - x0, the same at every t."""
        return noise - x0

    def eps_from_velocity(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - sigma v, so eps = x_t + (1 - sigma) v."""
        return x_t + (1 - self._sigma(t, x_t)) * v
