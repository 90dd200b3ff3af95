"""Regularisers on the learned vectors (Arar et al., *Domain-Agnostic Tuning-Encoder*, seeds/003).

A regulariser is called once per optimisation step with the learned vectors and a
``RegContext`` and returns a scalar loss that is added to the diffusion loss.

| class                        | term                                                         | seeds/003          |
|------------------------------|--------------------------------------------------------------|--------------------|
| ``L2Norm``                   | w mean ||v||^2: the norm must not grow                       | Sec. 3.2           |
| ``L2ToInit``                 | w sum ||v - v0||^2: stay near the initial vectors            | Sec. 3.4           |
| ``ConceptContrast``          | Eq. 2 as published: nearest tokens vs the other concepts     | Eq. 2 (>= 2 concepts) |
| ``VocabularyContrast``       | nearest tokens vs the rest of the vocabulary (one concept)   | adapted from Eq. 2 |
| ``NearestNeighborContrastive`` | the general form both contrasts are settings of            |                    |

``contrastive(weight, num_concepts)`` picks the contrast a run can use: Eq. 2 needs negatives,
which only other concepts trained together provide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

__all__ = ["RegContext", "Regularizer", "L2Norm", "L2ToInit", "NearestNeighborContrastive", "ConceptContrast",
           "VocabularyContrast", "contrastive"]


@dataclass
class RegContext:
    """What a regulariser may look at besides the vectors."""

    tables: Mapping[str, torch.Tensor]  # encoder key -> token table [V, d] (frozen)
    concept_rows: Sequence[range] = field(default_factory=list)  # rows of each concept in the vectors
    initial: Mapping[str, torch.Tensor] = field(default_factory=dict)  # encoder key -> the run's v0 [K, d]


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


class L2ToInit:
    """weight * sum_i ||v_i - v0_i||^2: each learned vector pulled back toward its initial vector.

    In seeds/003 Sec. 3.4 the encoder's predicted embedding only initialises a short tuning run,
    and an L2 term keeps the tuned embedding near that prediction; the paper gives neither a weight
    nor a normalisation. Here the prediction is the init (Caption Init's token vectors) and the squared
    distances are summed over vectors and encoders, so every vector feels the same pull
    2 w (v - v0) whatever k is. Zero at the start; the vectors come from ``RegContext.initial``.
    """

    def __init__(self, weight: float = 1e-2):
        if weight < 0:
            raise ValueError(f"l2_init_weight must be >= 0, got {weight}")
        self.weight = float(weight)

    def __call__(self, vectors, ctx):
        if not ctx.initial:
            raise ValueError("L2ToInit needs the initial vectors: build RegContext(..., initial=...) "
                             "(the Trainer does)")
        terms = [(v.float() - ctx.initial[k].to(v.device, torch.float32)).square().sum() for k, v in vectors.items()]
        return self.weight * torch.stack(terms).sum()


class NearestNeighborContrastive:
    """The nearest-neighbour contrastive loss, general form; one term per learned vector v, averaged.

        L(v) = -log( sum_{T in N(v)} exp(s(v, T) / tau)
                     / (sum_{T in N(v)} exp(s(v, T) / tau) + sum_{u in Neg(v)} exp(s(v, u) / tau)) )

    Positives N(v): the ``num_neighbors`` vocabulary tokens nearest to v by cosine, found again
    every step (no gradient through the search). Negatives Neg(v): the vectors of the *other*
    concepts trained together (gradient flows into them too), plus, with ``vocab_negatives``, every
    vocabulary token outside N(v). s is the cosine with ``cosine``, else the plain dot product.

    Use its two named settings: ``ConceptContrast`` (seeds/003 Eq. 2 exactly) and
    ``VocabularyContrast`` (the one-concept adaptation). The defaults here are the latter's.
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
        """Mean loss of rows ``v`` [k, d] against ``table`` [V, d] and negatives ``others`` [m, d]."""
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


class ConceptContrast(NearestNeighborContrastive):
    """seeds/003 Eq. 2 as published, for a run of several concepts.

        L_c(v) = -log( sum_{T in N(v)} exp(v.T / tau) / (sum_{T in N(v)} exp(v.T / tau) + sum_{v'} exp(v.v' / tau)) )

    Positives: the ``num_neighbors`` tokens nearest to v by cosine distance; negatives v': the
    vectors of every other concept in the run (the paper's "other images of the mini-batch", each
    with its own predicted embedding); similarities are the plain dot products of Eq. 2. The loss
    is averaged over every learned vector and encoder. The paper names no tau or neighbour count.
    With one concept Eq. 2 has no negatives and is identically 0, so that is an error: use
    ``VocabularyContrast`` (or ``contrastive``, which chooses).
    """

    def __init__(self, weight: float = 1e-3, num_neighbors: int = 5, tau: float = 0.07):
        super().__init__(weight, num_neighbors, tau, vocab_negatives=False, cosine=False)

    def __call__(self, vectors, ctx):
        if len(ctx.concept_rows) < 2:
            raise ValueError("ConceptContrast (seeds/003 Eq. 2) needs several concepts trained together as "
                             "negatives; with one concept use VocabularyContrast")
        return super().__call__(vectors, ctx)


class VocabularyContrast(NearestNeighborContrastive):
    """Nearest-neighbour *vocabulary* contrast: NOT seeds/003 Eq. 2, an adaptation of it to one concept.

        L(v) = -log( sum_{T in N(v)} exp(cos(v, T) / tau) / sum_{T in vocabulary} exp(cos(v, T) / tau) )

    i.e. a softmax over the whole vocabulary in which the ``num_neighbors`` nearest tokens count as
    the right answer: how much of v's similarity mass falls on its nearest real words. Eq. 2's
    negatives (other concepts' vectors) do not exist for a single concept, so the rest of the
    vocabulary stands in for them; cosines make it scale-free. Other concepts, when a run has
    them, join the denominator as in Eq. 2. Averaged over every learned vector and encoder.
    """

    def __init__(self, weight: float = 1e-3, num_neighbors: int = 5, tau: float = 0.07):
        super().__init__(weight, num_neighbors, tau, vocab_negatives=True, cosine=True)


def contrastive(weight: float, num_concepts: int) -> NearestNeighborContrastive:
    """The contrast a run of ``num_concepts`` can use: Eq. 2 across concepts (``ConceptContrast``)
    when there are several, the vocabulary contrast (``VocabularyContrast``) with one."""
    return ConceptContrast(weight) if num_concepts > 1 else VocabularyContrast(weight)
