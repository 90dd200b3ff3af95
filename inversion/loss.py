"""The textual-inversion objective and its conditioning gradient (seeds/000 Eq. 3 and Eq. 4).

    L(v) = E_{x, eps, t} || eps_theta(x_t, t, c(y(v))) - eps ||^2                     (Eq. 3)
    g(t) = E_x || grad_c || eps_theta(x_t, t, c) - eps || ||                            (Eq. 4)

``predict_eps`` is the one place a draw (x0, eps, t) meets the denoiser; ``per_sample_mse`` is
Eq. 3's inner term per sample (over a loss mask, if any); ``conditioning_grad_norms`` turns the
gradient of the summed loss w.r.t. c into each sample's Eq. 4 norm by the chain rule, so the
trainer gets g for free from its own backward pass; ``grad_norms_at`` measures g alone (the
profiler), with one forward and one backward pass of the denoiser and none of the text encoder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .host import Conditioning, Denoiser

if TYPE_CHECKING:
    from .batch import Draw

__all__ = ["predict_eps", "per_sample_mse", "conditioning_grad_norms", "grad_norms_at"]


def predict_eps(denoiser: Denoiser, draw: "Draw", cond: Conditioning) -> torch.Tensor:
    """eps_theta(x_t, t, c) for a draw: x_t = the forward process at t from the draw's x0 and noise."""
    t = draw.t.to(draw.x0.device)
    return denoiser.predict_eps(denoiser.add_noise(draw.x0, draw.noise, t), t, cond)


def per_sample_mse(eps: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's mean of ||eps_hat - eps||^2 (over the mask, if any) and how many elements it averaged."""
    err = (eps.float() - noise.float()) ** 2
    if mask is None:
        return err.flatten(1).mean(1), torch.full((err.shape[0],), float(err[0].numel()), device=err.device)
    n_eff = (mask.flatten(1).sum(1) * err.shape[1]).clamp_min(1e-8)
    return (err * mask).flatten(1).sum(1) / n_eff, n_eff.detach()


def conditioning_grad_norms(ctx_grad: torch.Tensor, per: torch.Tensor, n_eff: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """Per-sample g_i = || grad_c ||eps_hat_i - eps_i|| || (seeds/000 Eq. 4) from one backward pass.

    The backward pass differentiated ``mean_i(per_i) / scale`` where per_i = ||r_i||^2 / n_i is the
    sample's mean squared error, so grad_c per_i = ctx_grad_i * scale (the denoiser treats samples
    independently), and by the chain rule grad_c ||r_i|| = grad_c per_i * n_i / (2 ||r_i||).
    """
    gc = ctx_grad.detach().float().flatten(1).norm(dim=1) * scale
    rnorm = (per.float() * n_eff).sqrt().clamp_min(1e-12)
    return gc * n_eff / (2 * rnorm)


def grad_norms_at(denoiser: Denoiser, cond: Conditioning, x0: torch.Tensor, noise: torch.Tensor,
                  t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4's g for each sample: || grad_c || eps_theta(x_t, t, c) - eps || || with c = ``cond.context``.

    One forward and one backward pass of the denoiser for the whole batch (samples are independent,
    so the gradient of the summed loss w.r.t. c_i is sample i's own)."""
    ctx = cond.context.detach().requires_grad_(True)
    with torch.enable_grad():
        eps = denoiser.predict_eps(denoiser.add_noise(x0, noise, t), t, Conditioning(ctx, cond.pooled))
        per, n_eff = per_sample_mse(eps, noise, mask)
        grad, = torch.autograd.grad(per.sum(), ctx)
    return conditioning_grad_norms(grad, per.detach(), n_eff, 1.0)
