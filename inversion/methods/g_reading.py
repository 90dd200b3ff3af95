"""The two readings of seeds/000 Eq. 4 as one object each: how a batch is encoded so that its backward
pass gives every sample's g, and the norms from it.

    g(t) = E_x || grad || eps_theta(x_t, t, c(v)) - eps || ||

- ``context``: the gradient w.r.t. the text encoder's output c (Eq. 4 as written). The encoder runs
  once per distinct prompt; the norms come free from the step's backward pass
  (``loss.conditioning_grad_norms``).
- ``tokens``: the gradient w.r.t. the learned rows v, the quantity the optimiser steps along
  ("collected on the fly while performing TI", Sec. 3 (2)). Each sample reads its own copy of the rows
  (``ConceptSet.encode_per_sample``), which costs one encoder pass per sample (``loss.token_grad_norms``).

``reading(name)`` is the one place a name is checked (``check_reading``) and ``DEFAULT`` the one
place the default is written. The trainer encodes with ``encode`` and reads ``norms`` after its
backward pass; the profiler, which needs g alone, calls ``measure``. A timestep sampler that does not
read g (``timesteps.reads_gradients``) gets the context reading whatever the run's choice: it only
records g, and that one is free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from ..host import Conditioning, Denoiser
from .loss import conditioning_grad_norms, grad_norms_at, token_grad_norms, token_grad_norms_at

if TYPE_CHECKING:
    from ..data.batch import ConceptSet, Draw

__all__ = ["G_READINGS", "DEFAULT", "GReading", "ContextReading", "TokenReading", "reading", "check_reading",
           "check_profile_reading"]

G_READINGS = ("context", "tokens")  # what Eq. 4's gradient is taken w.r.t.: c, or the learned rows v
DEFAULT = "tokens"  # never behind context on the miniature world, free at batch 1 (README, "Which method?")


def check_reading(name: str, what: str = "g_reading") -> str:
    """``name`` if it is a reading, else a ValueError naming the input ``what``."""
    if name not in G_READINGS:
        raise ValueError(f"{what} must be one of {', '.join(G_READINGS)}, got {name!r}")
    return name


def check_profile_reading(measured: str | None, run: str) -> None:
    """A g(t) profile (or a sampler seeded from one) measured with reading ``measured`` cannot steer a run
    that reads g as ``run``: the two readings' g differ in scale and shape."""
    if measured is not None and measured != run:
        raise ValueError(f"profile: measured with g_reading = {measured} but this run uses {run}; measure the profile "
                         "with the run's g_reading (on the Training Options wired into both nodes), or train with "
                         "the profile's")


class GReading:
    """One reading: ``encode`` a micro-batch (keeping what its gradient lands on), ``norms`` after the
    backward pass, ``measure`` g alone for a draw (the profiler)."""

    name: str

    def encode(self, data: "ConceptSet", prompts: Sequence[str], vectors: Mapping[str, torch.Tensor]
               ) -> tuple[Conditioning, Any]:
        raise NotImplementedError

    def norms(self, handle: Any, per: torch.Tensor, n_eff: torch.Tensor, scale: float) -> torch.Tensor:
        """Each sample's g from the gradient the backward pass left on ``handle`` (``encode``'s), for a
        backward of ``mean(per) / scale``."""
        raise NotImplementedError

    def precompute(self, data: "ConceptSet", prompts: Sequence[str], vectors: Mapping[str, torch.Tensor]) -> dict:
        """What ``measure`` may reuse across all draws of ``prompts`` (nothing, unless the reading allows it)."""
        return {}

    def measure(self, denoiser: Denoiser, data: "ConceptSet", draw: "Draw", vectors: Mapping[str, torch.Tensor],
                cache: dict) -> torch.Tensor:
        """Each sample's g for ``draw`` alone (one forward and one backward pass); ``cache`` from ``precompute``."""
        raise NotImplementedError


class ContextReading(GReading):
    name = "context"

    def encode(self, data, prompts, vectors):
        cond = data.encode(prompts, vectors)
        # c is what the learned rows reach: the context, or, where the context comes from a frozen encoder
        # alone (Flux with its CLIP learning and T5 frozen), the pooled vector.
        c = cond.context if cond.context.requires_grad or cond.pooled is None else cond.pooled
        c.retain_grad()
        return cond, c

    def norms(self, handle, per, n_eff, scale):
        return conditioning_grad_norms(handle.grad, per, n_eff, scale)

    def precompute(self, data, prompts, vectors, chunk: int = 16):
        """The text encoder's output for each distinct prompt, encoded once for all draws, ``chunk`` prompts
        at a time, without a graph: the gradient stops at c."""
        cache: dict = {}
        unique = list(dict.fromkeys(prompts))
        with torch.no_grad():
            for i in range(0, len(unique), chunk):
                part = unique[i:i + chunk]
                cond = data.encode(part, vectors)
                for j, p in enumerate(part):
                    cache[p] = (cond.context[j], None if cond.pooled is None else cond.pooled[j])
        return cache

    def measure(self, denoiser, data, draw, vectors, cache):
        ctx = torch.stack([cache[p][0] for p in draw.prompts])
        pooled = None if cache[draw.prompts[0]][1] is None else torch.stack([cache[p][1] for p in draw.prompts])
        return grad_norms_at(denoiser, Conditioning(ctx, pooled), draw.x0, draw.noise, draw.t.to(data.device), draw.mask)


class TokenReading(GReading):
    name = "tokens"

    def encode(self, data, prompts, vectors):
        cond, rows = data.encode_per_sample(prompts, vectors)
        for r in rows.values():
            r.retain_grad()
        return cond, rows

    def norms(self, handle, per, n_eff, scale):
        return token_grad_norms([r.grad for r in handle.values()], per, n_eff, scale)

    def measure(self, denoiser, data, draw, vectors, cache):
        """Through the text encoder, forward and backward, for every draw: ``vectors`` must require grad."""
        with torch.enable_grad():
            cond, rows = data.encode_per_sample(draw.prompts, vectors)
            return token_grad_norms_at(denoiser, cond, rows, draw.x0, draw.noise, draw.t.to(data.device), draw.mask)


_READINGS = {r.name: r for r in (ContextReading(), TokenReading())}


def reading(name: str) -> GReading:
    """The reading called ``name`` (``G_READINGS``)."""
    return _READINGS[check_reading(name)]
