"""Optimisers for the learned vectors only (never the token table).

Each optimiser updates a dict ``{encoder_key: leaf tensor [K, d]}`` in place from the tensors'
``.grad``; state is a small dict of tensors so a run can be checkpointed and resumed exactly.

- ``AdamW``: Loshchilov & Hutter's decoupled-decay Adam, the optimiser of vanilla TI.
- ``RiemannianSGD``: Directional Textual Inversion (seeds/002): e = m* v with ||v|| = 1; the
  Euclidean gradient is projected onto the tangent space of the sphere at v, normalised, stepped,
  and retracted by renormalising; the von Mises-Fisher prior p(v) ~ exp(kappa mu^T v) adds its
  negative log-prior gradient -kappa mu to the data gradient.
- ``ProjectedAdamW``: the ablation DTI compares against: AdamW on the vectors followed by the
  projection back to norm m*.
"""

from __future__ import annotations

import math
from typing import Mapping, Protocol, runtime_checkable

import torch

__all__ = ["VectorOptimizer", "AdamW", "RiemannianSGD", "ProjectedAdamW", "project_to_norm", "tangent_project"]

Params = Mapping[str, torch.Tensor]


@runtime_checkable
class VectorOptimizer(Protocol):
    default_lr: float  # the step size this optimiser is meant to run at (TrainConfig.lr = None)

    def prepare(self, params: Params) -> None:
        """Called once before training (e.g. to move the vectors onto their sphere)."""
        ...

    def step(self, params: Params, lr: float) -> None:
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        ...

    def report(self) -> dict:
        """What a progress report shows of the optimiser (StepInfo fields, e.g. ``target_norms``)."""
        ...


def project_to_norm(x: torch.Tensor, norm: torch.Tensor | float) -> torch.Tensor:
    """Rows of ``x`` rescaled to Euclidean norm ``norm``."""
    return x * (torch.as_tensor(norm, dtype=x.dtype, device=x.device) / x.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def tangent_project(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """g - (v^T g) v for unit rows v: the component of g in the tangent space of the sphere at v."""
    return g - (g * v).sum(dim=-1, keepdim=True) * v


class AdamW:
    """AdamW on the learned vectors (decoupled weight decay, bias-corrected moments)."""

    # A1111's rate and, after diffusers' batch scaling, diffusers' usual AdamW rate on SD.
    default_lr = 5e-3

    def report(self) -> dict:
        return {}

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.t = 0

    def prepare(self, params: Params) -> None:
        pass

    def _grad(self, key: str, p: torch.Tensor) -> torch.Tensor:
        return p.grad

    @torch.no_grad()
    def step(self, params: Params, lr: float) -> None:
        self.t += 1
        b1, b2 = self.betas
        for key, p in params.items():
            g = self._grad(key, p)
            if g is None:
                continue
            g = g.float()
            if key not in self.m:
                self.m[key] = torch.zeros_like(g)
                self.v[key] = torch.zeros_like(g)
            m, v = self.m[key], self.v[key]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            if self.weight_decay:
                p.mul_(1 - lr * self.weight_decay)
            denom = (v / (1 - b2**self.t)).sqrt_().add_(self.eps)
            p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / (1 - b1**self.t))
        self._after_step(params)

    def _after_step(self, params: Params) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"t": torch.tensor(self.t)}
        for k in self.m:
            out[f"m.{k}"] = self.m[k].clone()
            out[f"v.{k}"] = self.v[k].clone()
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if not state:  # resuming from an embedding alone: fresh moments
            return
        self.t = int(state["t"])
        self.m = {k[2:]: v.clone() for k, v in state.items() if k.startswith("m.")}
        self.v = {k[2:]: v.clone() for k, v in state.items() if k.startswith("v.")}


class _Directional:
    """Shared by the two DTI optimisers: the fixed norms m* and the vMF prior directions mu."""

    def __init__(self, norms: Mapping[str, float], mu: Mapping[str, torch.Tensor] | None = None,
                 kappa: float = 1e-4):
        if kappa < 0:
            raise ValueError(f"kappa (vMF concentration) must be >= 0, got {kappa}")
        bad = {k: v for k, v in norms.items() if not (v > 0 and math.isfinite(v))}
        if bad:
            raise ValueError(f"directional norms m* must be positive and finite, got {bad}")
        self.norms = {k: float(v) for k, v in norms.items()}
        self.mu = {k: torch.nn.functional.normalize(v.float(), dim=-1) for k, v in (mu or {}).items()}
        self.kappa = float(kappa)

    def report(self) -> dict:
        return {"target_norms": dict(self.norms)}

    def _check(self, params: Params) -> None:
        missing = set(params) - set(self.norms)
        if missing:
            raise ValueError(f"directional optimiser has no norm m* for encoder(s) {sorted(missing)}")
        for k, mu in self.mu.items():
            if k in params and mu.shape != params[k].shape:
                raise ValueError(f"vMF prior direction for {k} has shape {tuple(mu.shape)}, "
                                 f"the vectors {tuple(params[k].shape)}")

    @torch.no_grad()
    def prepare(self, params: Params) -> None:
        self._check(params)
        for k, p in params.items():
            p.copy_(project_to_norm(p.float(), self.norms[k]).to(p.dtype))

    def direction_grad(self, key: str, p: torch.Tensor) -> torch.Tensor | None:
        """Euclidean gradient w.r.t. the direction v (= m* grad_e) plus the vMF term -kappa mu."""
        if p.grad is None:
            return None
        g = p.grad.float() * self.norms[key]
        if self.kappa and key in self.mu:
            g = g - self.kappa * self.mu[key].to(g.device)
        return g


class RiemannianSGD(_Directional):
    """DTI's Riemannian SGD on the unit sphere (seeds/002, "Hypersphere Directional Optimization").

    Per row: g = grad_v L_data - kappa mu; g_tan = g - (v^T g) v; g' = g_tan / ||g_tan|| (with
    ``beta`` > 0, divided instead by the square root of an EMA of ||g_tan||^2, as in the authors'
    code); v <- (v - lr g') / ||v - lr g'||; e = m* v. With ``beta`` = 0 each step turns every
    vector by about ``lr`` radians.
    """

    default_lr = 1e-2  # radians per step: the authors' step size

    def __init__(self, norms: Mapping[str, float], mu: Mapping[str, torch.Tensor] | None = None,
                 kappa: float = 1e-4, beta: float = 0.0, eps: float = 1e-8):
        super().__init__(norms, mu, kappa)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.eps = eps
        self.h: dict[str, torch.Tensor] = {}
        self.t = 0

    @torch.no_grad()
    def step(self, params: Params, lr: float) -> None:
        self.t += 1
        for key, p in params.items():
            g = self.direction_grad(key, p)
            if g is None:
                continue
            m = self.norms[key]
            v = p.float() / m
            v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            g = tangent_project(g, v)
            sq = g.square().sum(dim=-1, keepdim=True)
            h = self.h.get(key)
            h = sq if h is None else self.beta * h + (1 - self.beta) * sq
            self.h[key] = h
            scale = (h / (1 - self.beta**self.t)).sqrt() if self.beta else sq.sqrt()
            v = v - lr * g / scale.clamp_min(self.eps)
            p.copy_((m * v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"t": torch.tensor(self.t)}
        out.update({f"h.{k}": v.clone() for k, v in self.h.items()})
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if not state:
            return
        self.t = int(state["t"])
        self.h = {k[2:]: v.clone() for k, v in state.items() if k.startswith("h.")}


class ProjectedAdamW(AdamW):
    """DTI's ablation: AdamW on e (with the vMF gradient added), then e projected back to norm m*."""

    def __init__(self, norms: Mapping[str, float], mu: Mapping[str, torch.Tensor] | None = None,
                 kappa: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(betas=betas, eps=eps)
        self.directional = _Directional(norms, mu, kappa)

    def prepare(self, params: Params) -> None:
        self.directional.prepare(params)

    def report(self) -> dict:
        return self.directional.report()

    def _grad(self, key: str, p: torch.Tensor) -> torch.Tensor | None:
        g = self.directional.direction_grad(key, p)
        return None if g is None else g / self.directional.norms[key]

    def _after_step(self, params: Params) -> None:
        for k, p in params.items():
            p.copy_(project_to_norm(p.float(), self.directional.norms[k]).to(p.dtype))
