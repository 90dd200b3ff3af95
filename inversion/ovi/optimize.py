"""OVI's optimisation (Dell'Erba & Bagdanov, seeds/004): pseudo-tokens optimised into an image embedding.

n learnable *pseudo-tokens* P are fed through the frozen CLIP vision transformer in place of the
image's patch embeddings, and P is optimised with Adam so that the projected image embedding
z = f(P) maximises the cosine similarity with the text embedding t of the prompt in the same joint
space. More pseudo-tokens reach a higher similarity plateau (seeds/004, Fig. 2). Two optional
constraints keep z near real images:

- Mahalanobis: lambda_M * (z - mu)^T Sigma^-1 (z - mu) with the mean mu and covariance Sigma of
  real image embeddings (seeds/004 uses lambda_M = 0.009; at lambda_M >= 0.05 every prompt
  collapses toward a generic image, Fig. 5);
- nearest neighbour: lambda_N * (1 - mean cos(z, b_j)) over the k bank embeddings b_j closest to z
  (seeds/004 uses lambda_N = 0.5, Fig. 4).

The loss per row is therefore L(P) = 1 - cos(f(P), t) + lambda_M * m(f(P)) + lambda_N * nn(f(P)).
mu, Sigma and the bank come from ``stats.ImageStats``; f is ``towers.VisionTower.embed_tokens``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..progress import Progress
from .stats import ImageStats
from .towers import VisionTower

__all__ = ["OVIResult", "OVISettings", "OVIStep", "nearest_neighbour_loss", "optimize_visual_inversion"]


@dataclass
class OVIStep(Progress):
    """One optimisation step's report (means over the targets)."""

    similarity: float  # cos(f(P), t)
    loss: float  # the full objective
    mahalanobis: float | None  # m(f(P)), when lambda_M > 0
    nn: float | None  # the nearest-neighbour term, when lambda_N > 0


@dataclass(frozen=True)
class OVISettings:
    """OVI's hyper-parameters (seeds/004)."""

    num_tokens: int = 1  # the paper's default; more tokens reach a higher similarity plateau (Fig. 2)
    steps: int = 300  # the paper runs 500-1000; most of the rise is in the first few hundred (Fig. 2)
    lr: float = 0.05  # Adam step on token parameters of unit scale (tokens = token_scale * params)
    lambda_m: float = 0.0  # Mahalanobis weight; 0.009 in the paper, >= 0.05 collapses (Fig. 5)
    lambda_n: float = 0.0  # nearest-neighbour weight; 0.5 in the paper (Fig. 4)
    nn_k: int = 1  # bank neighbours the nearest-neighbour term pulls toward
    seed: int = 0  # the random pseudo-tokens' start

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.lambda_m < 0 or self.lambda_n < 0:
            raise ValueError(f"lambda_m and lambda_n must be >= 0, got {self.lambda_m} and {self.lambda_n}")
        if self.nn_k < 1:
            raise ValueError(f"nn_k must be >= 1, got {self.nn_k}")


@dataclass
class OVIResult:
    """The optimised image embeddings and how the similarity to the text evolved."""

    embeds: torch.Tensor  # [N, D] unnormalised projected image embeddings (float32, CPU)
    similarity: torch.Tensor  # [steps + 1, N] cos(z, t) before each step and after the last
    tokens: torch.Tensor  # [N, n, width] the final pseudo-tokens
    target: torch.Tensor  # [N, D] the text embeddings optimised toward


def nearest_neighbour_loss(z: torch.Tensor, bank: torch.Tensor, k: int = 1) -> torch.Tensor:
    """1 - mean cosine similarity of each row of ``z`` [N, D] to its k most similar rows of ``bank`` [M, D] -> [N]."""
    zn = F.normalize(z.float(), dim=-1)
    bn = F.normalize(bank.to(z.device).float(), dim=-1)
    sims = zn @ bn.T  # [N, M]
    top = sims.topk(min(k, bank.shape[0]), dim=-1).values  # neighbours chosen by value; gradient flows to z
    return 1.0 - top.mean(-1)


def optimize_visual_inversion(
    tower: VisionTower,
    target: torch.Tensor,
    settings: OVISettings = OVISettings(),
    stats: ImageStats | None = None,
    callback: Callable[["OVIStep"], object] | None = None,
) -> OVIResult:
    """OVI (seeds/004): Adam on pseudo-tokens P to minimise 1 - cos(f(P), t) + lambda_M m(f(P)) + lambda_N nn(f(P)).

    ``target``: text embedding(s) t, [D] or [N, D] (one independent optimisation per row).
    ``stats``: needed when lambda_M or lambda_N > 0. ``callback`` gets an ``OVIStep`` per step
    (step, total, similarity, loss, mahalanobis, nn) and may raise to stop.
    """
    if target.ndim == 1:
        target = target.unsqueeze(0)
    if target.ndim != 2 or target.shape[1] != tower.embed_dim:
        raise ValueError(f"target must be [N, {tower.embed_dim}] (text embeddings in the vision model's joint "
                         f"space), got {tuple(target.shape)}; the text and vision towers must come from the same CLIP")
    if (settings.lambda_m > 0 or settings.lambda_n > 0) and stats is None:
        raise ValueError("lambda_m / lambda_n > 0 need image statistics (build them from your images with "
                         "build_image_stats), or set both to 0")
    if stats is not None and stats.embed_dim != tower.embed_dim:
        raise ValueError(f"image statistics are {stats.embed_dim}-d but the vision model embeds in "
                         f"{tower.embed_dim}-d; rebuild them with this vision model")
    if settings.num_tokens > tower.max_tokens:
        raise ValueError(f"num_tokens={settings.num_tokens} exceeds the {tower.max_tokens} patch positions of "
                         "the vision model")
    g = torch.Generator().manual_seed(settings.seed)
    scale = tower.token_scale()
    history = []
    # Autograd on even when called from a no-grad / inference-mode context (a UI's executor); the
    # copies below are made here so that they are ordinary tensors autograd may save.
    with torch.inference_mode(False), torch.enable_grad():
        t = target.detach().to(tower.device, torch.float32).clone()
        params = torch.randn(t.shape[0], settings.num_tokens, tower.width, generator=g)
        params = params.to(tower.device).requires_grad_(True)
        opt = torch.optim.Adam([params], lr=settings.lr)
        for step in range(settings.steps):
            z = tower.embed_tokens(params * scale)
            cos = F.cosine_similarity(z, t, dim=-1)
            loss = 1.0 - cos
            maha = nn_term = None
            if settings.lambda_m > 0:
                maha = stats.mahalanobis(z)
                loss = loss + settings.lambda_m * maha
            if settings.lambda_n > 0:
                nn_term = nearest_neighbour_loss(z, stats.bank, settings.nn_k)
                loss = loss + settings.lambda_n * nn_term
            history.append(cos.detach().float().cpu())
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            if callback is not None:
                callback(OVIStep(
                    step + 1, settings.steps, similarity=float(cos.detach().mean()), loss=float(loss.detach().mean()),
                    mahalanobis=None if maha is None else float(maha.detach().mean()),
                    nn=None if nn_term is None else float(nn_term.detach().mean()),
                ))
        with torch.no_grad():
            z = tower.embed_tokens(params * scale)
            history.append(F.cosine_similarity(z, t, dim=-1).float().cpu())
    return OVIResult(z.detach().float().cpu(), torch.stack(history, 0), (params * scale).detach().cpu(), t.cpu())
