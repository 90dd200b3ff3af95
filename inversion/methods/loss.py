"""The textual-inversion objective and its conditioning gradient (seeds/000 Eq. 3 and Eq. 4).

    L(v) = E_{x, eps, t} || eps_theta(x_t, t, c(y(v))) - eps ||^2                     (Eq. 3)
    g(t) = E_x || grad_c || eps_theta(x_t, t, c) - eps || ||                            (Eq. 4)

``prediction_and_target`` is the one place a draw (x0, eps, t) meets the denoiser (the eps of Eq. 3,
or the denoiser's own objective: ``host.Objective``); ``per_sample_mse`` is Eq. 3's inner term per
sample (over a loss mask, if any); ``conditioning_grad_norms`` turns the
gradient of the summed loss w.r.t. c into each sample's Eq. 4 norm by the chain rule, so the
trainer gets g for free from its own backward pass; ``grad_norms_at`` measures g alone (the
profiler), with one forward and one backward pass of the denoiser and none of the text encoder.

Eq. 4 has two readings; ``g_reading.py`` makes each one object (its name, default and check live there):
- "context": the gradient w.r.t. the text encoder's output c = c_theta(y(v)), [L, D] per sample
  (Eq. 4 as written: ``conditioning_grad_norms``, ``grad_norms_at``);
- "tokens": the gradient w.r.t. the learned token rows v themselves, the quantity the optimiser
  steps along, "collected on the fly while performing TI" (Sec. 3 (2)): grad_v ||r|| =
  J_c(v)^T grad_c ||r|| (``token_grad_norms``, ``token_grad_norms_at``). Per-sample gradients
  w.r.t. rows that every sample shares need each sample to read its own copy of the rows
  (``ConceptSet.encode_per_sample``); the one backward pass of the summed loss then gives each
  copy its sample's gradient, and their sum is the rows' usual gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from ..host import Conditioning, Denoiser

if TYPE_CHECKING:
    from ..data.batch import Draw

__all__ = ["predict_eps", "prediction_and_target", "draw_loss_terms", "per_sample_mse", "conditioning_grad_norms", "grad_norms_at",
           "token_grad_norms", "token_grad_norms_at"]


def predict_eps(denoiser: Denoiser, draw: "Draw", cond: Conditioning) -> torch.Tensor:
    """eps_theta(x_t, t, c) for a draw: x_t = the forward process at t from the draw's x0 and noise."""
    t = draw.t.to(draw.x0.device)
    return denoiser.predict_eps(denoiser.add_noise(draw.x0, draw.noise, t), t, cond)


def prediction_and_target(denoiser: Denoiser, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                          cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
    """What the loss compares for (x0, noise, t): the model's prediction at x_t = add_noise(x0, noise, t)
    and its target, in the denoiser's objective (``host.OBJECTIVES``): eps_hat and eps by default; the
    denoiser's own ``predict`` and ``target`` when it names another objective."""
    x_t = denoiser.add_noise(x0, noise, t)
    if getattr(denoiser, "objective", "eps") == "eps":
        return denoiser.predict_eps(x_t, t, cond), noise
    return denoiser.predict(x_t, t, cond), denoiser.target(x0, noise, t)


def draw_loss_terms(denoiser: Denoiser, draw: "Draw", cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
    """``prediction_and_target`` for a draw (its timesteps moved to the latents' device)."""
    return prediction_and_target(denoiser, draw.x0, draw.noise, draw.t.to(draw.x0.device), cond)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's mean of ||pred - target||^2 (eps_hat - eps, by default; over the mask, if any) and how
    many elements it averaged."""
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.flatten(1).mean(1), torch.full((err.shape[0],), float(err[0].numel()), device=err.device)
    n_eff = (mask.flatten(1).sum(1) * err.shape[1]).clamp_min(1e-8)
    return (err * mask).flatten(1).sum(1) / n_eff, n_eff.detach()


def conditioning_grad_norms(ctx_grad: torch.Tensor, per: torch.Tensor, n_eff: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """Per-sample g_i = || grad_c ||eps_hat_i - eps_i|| || w.r.t. the text encoder's output c: the
    "context" reading of seeds/000 Eq. 4, from one backward pass.

    The backward pass differentiated ``mean_i(per_i) / scale`` where per_i = ||r_i||^2 / n_i is the
    sample's mean squared error, so grad_c per_i = ctx_grad_i * scale (the denoiser treats samples
    independently), and by the chain rule grad_c ||r_i|| = grad_c per_i * n_i / (2 ||r_i||).
    """
    gc = ctx_grad.detach().float().flatten(1).norm(dim=1) * scale
    rnorm = (per.float() * n_eff).sqrt().clamp_min(1e-12)
    return gc * n_eff / (2 * rnorm)


def grad_norms_at(denoiser: Denoiser, cond: Conditioning, x0: torch.Tensor, noise: torch.Tensor,
                  t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4's g for each sample, "context" reading: || grad_c || eps_theta(x_t, t, c) - eps || || with
    c = ``cond.context``.

    One forward and one backward pass of the denoiser for the whole batch (samples are independent,
    so the gradient of the summed loss w.r.t. c_i is sample i's own)."""
    ctx = cond.context.detach().requires_grad_(True)
    with torch.enable_grad():
        pred, target = prediction_and_target(denoiser, x0, noise, t, Conditioning(ctx, cond.pooled))
        per, n_eff = per_sample_mse(pred, target, mask)
        grad, = torch.autograd.grad(per.sum(), ctx)
    return conditioning_grad_norms(grad, per.detach(), n_eff, 1.0)


def token_grad_norms(row_grads: Sequence[torch.Tensor | None], per: torch.Tensor, n_eff: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Per-sample g_i = || grad_v ||eps_hat_i - eps_i|| || w.r.t. the learned rows v: the "tokens"
    reading of seeds/000 Eq. 4, from one backward pass.

    ``row_grads``: per encoder, the gradient [B, K, d] w.r.t. each sample's own copy of the rows
    (``ConceptSet.encode_per_sample``), so row b is J_b^T grad_{c_b} of sample b alone; None (an
    encoder the loss did not reach) counts as zero. All encoders' rows are one vector, as c
    concatenates all encoders' states. The chain rule is ``conditioning_grad_norms``'s:
    grad_v ||r_i|| = grad_v per_i * n_i / (2 ||r_i||), with grad_v per_i = row_grads_i * scale.
    """
    sq = [g.detach().float().flatten(1).pow(2).sum(1) for g in row_grads if g is not None]
    if not sq:
        raise ValueError("token_grad_norms: no encoder's rows received a gradient; encode with "
                         "ConceptSet.encode_per_sample and keep its rows' gradients (retain_grad)")
    gv = torch.stack(sq).sum(0).sqrt() * scale
    rnorm = (per.float() * n_eff).sqrt().clamp_min(1e-12)
    return gv * n_eff / (2 * rnorm)


def token_grad_norms_at(denoiser: Denoiser, cond: Conditioning, rows: Mapping[str, torch.Tensor],
                        x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4's g for each sample, "tokens" reading: || grad_v || eps_theta(x_t, t, c(v)) - eps || ||.

    ``cond`` and ``rows`` come from ``ConceptSet.encode_per_sample`` run with gradients on (vectors
    that require grad), so the text encoder's graph is still there: one forward and one backward
    pass of the denoiser and of the text encoder for the whole batch."""
    with torch.enable_grad():
        pred, target = prediction_and_target(denoiser, x0, noise, t, cond)
        per, n_eff = per_sample_mse(pred, target, mask)
        grads = torch.autograd.grad(per.sum(), list(rows.values()), allow_unused=True)
    return token_grad_norms(grads, per.detach(), n_eff, 1.0)
