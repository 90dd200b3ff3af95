"""The DDPM noise schedule (Ho et al. 2020) and conversions between parameterisations.

x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t in [0, T). Stable Diffusion uses the
"scaled_linear" betas (linear in sqrt(beta) from 0.00085 to 0.012, T = 1000).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DDPMSchedule"]


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
