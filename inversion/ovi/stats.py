"""Statistics of real image embeddings, for OVI's constraints (seeds/004).

From the user's own images (``build_image_stats``): the mean mu and covariance Sigma of their CLIP
image embeddings, for the Mahalanobis term (z - mu)^T Sigma^-1 (z - mu), and the embeddings
themselves, the bank the nearest-neighbour term pulls toward. With few images the sample
covariance is singular, so it is shrunk toward a scaled identity (Ledoit & Wolf 2004). Stored as
safetensors (``save_image_stats`` / ``load_image_stats``, through ``safefile``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..progress import Progress

from ..data.imageprep import as_image_list
from ..files.safefile import atomic_save_safetensors, read_safetensors, read_safetensors_header
from .towers import VisionTower

__all__ = [
    "STATS_KIND",
    "ImageStats",
    "build_image_stats",
    "ledoit_wolf",
    "load_image_stats",
    "save_image_stats",
    "stats_from_embeddings",
]

STATS_KIND = "inversion.ovi.image_stats"  # the header's "kind": what wrote the file (kept across moves)


def ledoit_wolf(x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, float]:
    """Ledoit-Wolf shrinkage of the covariance of rows ``x`` [M, D]: (Sigma, delta).

    Sigma = (1 - delta) S + delta * mu I, with S the (1/M) sample covariance, mu = tr(S)/D and the
    delta that minimises the expected Frobenius error (Ledoit & Wolf 2004, "A well-conditioned
    estimator for large-dimensional covariance matrices"). With M << D delta is near 1, i.e. an
    isotropic covariance at the data's average variance, which is what a handful of images supports;
    with M >> D (a large image set) delta is small and Sigma is close to the sample covariance.
    Sums run over ``chunk`` rows at a time in float64, so a large bank never needs an [M, D] float64 copy.
    """
    m, d = x.shape
    mean = x.double().mean(0) if m <= chunk else sum(x[i:i + chunk].double().sum(0) for i in range(0, m, chunk)) / m
    s = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, m, chunk):
        xc = x[i:i + chunk].double() - mean
        s += xc.T @ xc
    s /= m
    mu = float(torch.trace(s)) / d
    d2 = float((s - mu * torch.eye(d, dtype=s.dtype)).pow(2).sum())
    # sum_k ||x_k x_k^T - S||_F^2 = sum_k ||x_k||^4 - 2 x_k^T S x_k + ||S||_F^2
    s_sq = float(s.pow(2).sum())
    b2_sum = 0.0
    for i in range(0, m, chunk):
        xc = x[i:i + chunk].double() - mean
        sq = xc.pow(2).sum(1)  # ||x_k||^2
        b2_sum += float((sq.pow(2) - 2 * ((xc @ s) * xc).sum(1)).sum()) + xc.shape[0] * s_sq
    b2_bar = b2_sum / m ** 2
    delta = 1.0 if d2 <= 0 else min(max(b2_bar, 0.0), d2) / d2
    sigma = (1 - delta) * s + delta * mu * torch.eye(d, dtype=s.dtype)
    return sigma.float(), float(delta)


@dataclass
class ImageStats:
    """Mean, (shrunk) covariance and the embeddings themselves (the nearest-neighbour bank)."""

    mean: torch.Tensor  # [D]
    covariance: torch.Tensor  # [D, D], positive definite
    bank: torch.Tensor  # [M, D]
    shrinkage: float = 0.0
    metadata: dict[str, str] = field(default_factory=dict)
    _chol: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        d = self.mean.shape[-1]
        if self.mean.ndim != 1 or tuple(self.covariance.shape) != (d, d) or self.bank.ndim != 2 \
                or self.bank.shape[1] != d:
            raise ValueError(f"image stats shapes disagree: mean {tuple(self.mean.shape)}, covariance "
                             f"{tuple(self.covariance.shape)}, bank {tuple(self.bank.shape)}; rebuild the stats")

    @property
    def embed_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def count(self) -> int:
        return int(self.bank.shape[0])

    def mahalanobis(self, z: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance (z - mu)^T Sigma^-1 (z - mu) of rows ``z`` [N, D] -> [N]."""
        stale = self._chol is not None and self._chol.is_inference() and not torch.is_inference_mode_enabled()
        if self._chol is None or self._chol.device != z.device or stale:
            cov = self.covariance.to(z.device, torch.float64)
            ridge = 1e-6 * float(torch.diagonal(cov).mean()) + 1e-12  # guards a near-singular file
            self._chol = torch.linalg.cholesky(cov + ridge * torch.eye(cov.shape[0], device=z.device,
                                                                          dtype=cov.dtype)).float()
        diff = (z.float() - self.mean.to(z.device).float()).T  # [D, N]
        y = torch.linalg.solve_triangular(self._chol, diff, upper=False)
        return y.pow(2).sum(0)


def stats_from_embeddings(embeds: torch.Tensor, shrinkage: float | None = None,
                          metadata: dict[str, str] | None = None) -> ImageStats:
    """Image statistics from embeddings [M, D] (M >= 2); ``shrinkage`` None = Ledoit-Wolf's delta."""
    if embeds.ndim != 2 or embeds.shape[0] < 2:
        raise ValueError(f"need at least 2 image embeddings [M, D] for a covariance, got {tuple(embeds.shape)}; "
                         "add more images")
    embeds = embeds.detach().float().cpu()
    if shrinkage is None:
        cov, delta = ledoit_wolf(embeds)
    else:
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1] (1 = isotropic), got {shrinkage}")
        xc = (embeds - embeds.mean(0)).double()
        s = xc.T @ xc / embeds.shape[0]
        mu = float(torch.trace(s)) / s.shape[0]
        cov = ((1 - shrinkage) * s + shrinkage * mu * torch.eye(s.shape[0], dtype=s.dtype)).float()
        delta = float(shrinkage)
    return ImageStats(embeds.mean(0), cov, embeds.clone(), delta, dict(metadata or {}))


def _batches(images, batch_size: int) -> Iterable[list[torch.Tensor]]:
    if isinstance(images, torch.Tensor) or (isinstance(images, (list, tuple)) and images
                                            and isinstance(images[0], torch.Tensor) and images[0].ndim == 3):
        items = as_image_list(images)
        for i in range(0, len(items), batch_size):
            yield items[i:i + batch_size]
    else:  # an iterable of batches (e.g. read lazily from a folder)
        for b in images:
            yield as_image_list(b)


def build_image_stats(
    tower: VisionTower,
    images,
    batch_size: int = 8,
    shrinkage: float | None = None,
    metadata: dict[str, str] | None = None,
    callback: Callable[[Progress], object] | None = None,
) -> ImageStats:
    """Encode the user's images with ``tower`` -> mean, shrunk covariance and embedding bank.

    ``images``: [B, 3, H, W] in [0, 1], a list of [3, H, W], or an iterable of such batches.
    ``callback`` receives ``Progress(images encoded so far, total)`` after each batch (total 0 when
    ``images`` is an iterable of unknown length).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    embeds, done = [], 0
    total = len(images) if isinstance(images, (torch.Tensor, list, tuple)) else 0
    for batch in _batches(images, batch_size):
        embeds.append(tower.encode_images(batch).detach().float().cpu())
        done += len(batch)
        if callback is not None:
            callback(Progress(done, total))
    if not embeds:
        raise ValueError("no images to build statistics from; give at least 2 images")
    meta = {"embed_dim": str(tower.embed_dim)}
    meta.update(metadata or {})
    return stats_from_embeddings(torch.cat(embeds, 0), shrinkage, meta)


def save_image_stats(stats: ImageStats, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the statistics as safetensors (mean, covariance, bank; metadata in the header)."""
    meta = dict(stats.metadata)
    meta.update(kind=STATS_KIND, shrinkage=repr(stats.shrinkage), count=str(stats.count),
                embed_dim=str(stats.embed_dim))
    tensors = {"mean": stats.mean.float(), "covariance": stats.covariance.float(), "bank": stats.bank.float()}
    return atomic_save_safetensors(tensors, path, meta, overwrite=overwrite)


def load_image_stats(path: str | os.PathLike) -> ImageStats:
    """Read statistics written by ``save_image_stats``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image statistics file {str(path)!r} does not exist; build it with build_image_stats "
                         "(the InversionBuildImageStats node)")
    _, keys = read_safetensors_header(path)
    if not {"mean", "covariance", "bank"} <= set(keys):
        raise ValueError(f"{path.name} is not an image-statistics file (needs mean, covariance and bank; "
                         f"has {sorted(keys)})")
    tensors, meta = read_safetensors(path, ("mean", "covariance", "bank"))
    shrink = float(meta.pop("shrinkage", "0") or 0)
    return ImageStats(tensors["mean"].float(), tensors["covariance"].float(), tensors["bank"].float(), shrink, meta)
