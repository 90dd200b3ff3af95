"""Regularisers on the learned vectors (Arar et al., *Domain-Agnostic Tuning-Encoder*, seeds/003).

A regulariser is called once per optimisation step with the learned vectors and a
``RegContext`` and returns a scalar loss that is added to the diffusion loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

__all__ = ["RegContext", "Regularizer", "L2Norm", "NearestNeighborContrastive"]


@dataclass
class RegContext:
    """What a regulariser may look at besides the vectors."""

    tables: Mapping[str, torch.Tensor]  # encoder key -> token table [V, d] (frozen)
    concept_rows: Sequence[range] = field(default_factory=list)  # rows of each concept in the vectors


@runtime_checkable
class Regularizer(Protocol):
    weight: float

    def __call__(self, vectors: Mapping[str, torch.Tensor], ctx: RegContext) -> torch.Tensor:
        ...


class L2Norm:
    """weight * mean_i ||e_i||^2 over all learned vectors: keeps their norm from inflating (seeds/003 Sec. 3.2)."""

    def __init__(self, weight: float = 1e-4):
        if weight < 0:
            raise ValueError(f"L2 weight must be >= 0, got {weight}")
        self.weight = float(weight)

    def __call__(self, vectors, ctx):
        terms = [v.float().square().sum(dim=-1).mean() for v in vectors.values()]
        return self.weight * torch.stack(terms).sum()


class NearestNeighborContrastive:
    """The nearest-neighbour contrastive loss of seeds/003 Eq. 2, one term per learned vector.

        L_c(v) = -log( sum_{T in N(v)} exp(v.T / tau)
                       / (sum_{T in N(v)} exp(v.T / tau) + sum_{v' != v} exp(v.v' / tau)) )

    Positives N(v): the ``num_neighbors`` vocabulary tokens nearest to v by cosine, found again
    every step (no gradient through the search). Negatives v': the vectors of the *other* concepts
    trained together. With a single concept Eq. 2 has no negatives and is identically zero, so by
    default (``vocab_negatives``) the remaining vocabulary tokens join the negatives: the loss
    then measures how much of v's similarity mass falls on its nearest real tokens, which is what
    the regulariser is for. ``cosine`` uses normalised vectors (scale-free) instead of the raw
    dot products of Eq. 2.
    """

    def __init__(self, weight: float = 1e-3, num_neighbors: int = 5, tau: float = 0.07,
                 vocab_negatives: bool = True, cosine: bool = True):
        if weight < 0 or num_neighbors < 1 or tau <= 0:
            raise ValueError("contrastive regulariser needs weight >= 0, num_neighbors >= 1, tau > 0; "
                             f"got weight={weight}, num_neighbors={num_neighbors}, tau={tau}")
        self.weight = float(weight)
        self.num_neighbors = int(num_neighbors)
        self.tau = float(tau)
        self.vocab_negatives = vocab_negatives
        self.cosine = cosine

    def loss_for(self, v: torch.Tensor, table: torch.Tensor, others: torch.Tensor | None = None) -> torch.Tensor:
        """Mean Eq. 2 loss of rows ``v`` [k, d] against ``table`` [V, d] and negatives ``others`` [m, d]."""
        table = table.detach().to(v.device, torch.float32)
        v = v.float()
        if self.cosine:
            v_ = F.normalize(v, dim=-1)
            t_ = F.normalize(table, dim=-1)
        else:
            v_, t_ = v, table
        with torch.no_grad():
            nn_idx = (F.normalize(v.detach(), dim=-1) @ F.normalize(table, dim=-1).T).topk(
                min(self.num_neighbors, table.shape[0]), dim=-1).indices  # [k, n]
        logits = v_ @ t_.T / self.tau  # [k, V]
        pos = logits.gather(1, nn_idx)
        parts = [pos]
        if self.vocab_negatives:
            mask = torch.ones_like(logits, dtype=torch.bool).scatter_(1, nn_idx, False)
            parts.append(logits.masked_fill(~mask, float("-inf")))
        if others is not None and others.numel():
            o = F.normalize(others.float(), dim=-1) if self.cosine else others.float()
            parts.append(v_ @ o.to(v.device).T / self.tau)
        denom = torch.logsumexp(torch.cat(parts, dim=1), dim=1)
        return (denom - torch.logsumexp(pos, dim=1)).mean()

    def __call__(self, vectors, ctx):
        total = []
        rows = list(ctx.concept_rows) or [range(next(iter(vectors.values())).shape[0])]
        for key, v in vectors.items():
            for r in rows:
                mine = v[r.start:r.stop]
                others = torch.cat([v[o.start:o.stop] for o in rows if o != r]) if len(rows) > 1 else None
                total.append(self.loss_for(mine, ctx.tables[key], others))
        return self.weight * torch.stack(total).mean()
