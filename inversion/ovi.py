"""Optimisation-based Visual Inversion (OVI): a training-free diffusion prior (seeds/004).

A diffusion *prior* maps a text embedding to a CLIP image embedding that an image-conditioned
decoder (Kandinsky, SD2.1 unCLIP) turns into a picture. OVI (Dell'Erba & Bagdanov, seeds/004)
replaces the trained prior by an optimisation: n learnable *pseudo-tokens* P are fed through the
frozen CLIP vision transformer in place of the image's patch embeddings, and P is optimised with
Adam so that the projected image embedding z = f(P) maximises the cosine similarity with the text
embedding t of the prompt in the same joint space. More pseudo-tokens reach a higher similarity
plateau (seeds/004, Fig. 2). Two optional constraints keep z near real images:

- Mahalanobis: lambda_M * (z - mu)^T Sigma^-1 (z - mu) with the mean mu and covariance Sigma of
  real image embeddings (seeds/004 uses lambda_M = 0.009; at lambda_M >= 0.05 every prompt
  collapses toward a generic image, Fig. 5);
- nearest neighbour: lambda_N * (1 - mean cos(z, b_j)) over the k bank embeddings b_j closest to z
  (seeds/004 uses lambda_N = 0.5, Fig. 4).

The loss per row is therefore L(P) = 1 - cos(f(P), t) + lambda_M * m(f(P)) + lambda_N * nn(f(P)).
The statistics come from the user's own images (``build_image_stats``): with few images the
sample covariance is singular, so it is shrunk toward a scaled identity (Ledoit & Wolf 2004).

z is the *unnormalised* projected embedding, exactly what a CLIP vision encoder outputs for an
image, so it can go wherever such an embedding goes (ComfyUI's unCLIPConditioning).

Towers are small protocols: ``VisionTower`` (pseudo-tokens in, projected embedding out; images
in, embeddings out) and ``TextTower`` (texts in, projected embeddings out). Adapters here cover
transformers' ``CLIPVisionModelWithProjection`` / ``CLIPTextModelWithProjection`` and open_clip
text towers; the ComfyUI pack converts its CLIP_VISION models to the transformers one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

from .imageprep import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, as_image_list, clip_preprocess

__all__ = [
    "HFTextTower",
    "HFVisionTower",
    "ImageStats",
    "OVIResult",
    "OVISettings",
    "OpenClipTextTower",
    "TextTower",
    "VisionTower",
    "build_image_stats",
    "ledoit_wolf",
    "load_hf_text_tower",
    "load_hf_vision_tower",
    "load_image_stats",
    "nearest_neighbour_loss",
    "optimize_visual_inversion",
    "save_image_stats",
    "stats_from_embeddings",
]

STATS_KIND = "inversion.ovi.image_stats"


# ---------------------------------------------------------------------------------------------
# Towers
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class VisionTower(Protocol):
    """A CLIP vision transformer seen two ways: from pseudo-tokens and from images."""

    width: int  # width of one input token (the transformer's hidden size)
    embed_dim: int  # D, width of the projected image embedding
    max_tokens: int  # how many pseudo-tokens fit (the number of patch positions)
    device: torch.device  # where embed_tokens wants its tokens

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pseudo-tokens [N, n, width] in place of patch embeddings -> projected embeddings [N, D] (float32, differentiable)."""
        ...

    def encode_images(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> projected embeddings [B, D] (float32)."""
        ...

    def token_scale(self) -> float:
        """Typical RMS of a real patch embedding, the scale pseudo-tokens start at."""
        ...


@runtime_checkable
class TextTower(Protocol):
    """The text side of the same joint space."""

    embed_dim: int

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> projected (unnormalised) text embeddings [N, D] (float32)."""
        ...


def _read_preprocess(folder: Path, image_size: int) -> tuple[int, tuple, tuple]:
    size, mean, std = image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    pp = folder / "preprocessor_config.json"
    if pp.is_file():
        with open(pp, encoding="utf-8") as f:
            cfg = json.load(f)
        crop = cfg.get("crop_size", size)
        size = int(crop.get("height", size) if isinstance(crop, dict) else crop)
        mean = tuple(cfg.get("image_mean", mean))
        std = tuple(cfg.get("image_std", std))
    return size, mean, std


class HFVisionTower:
    """A transformers ``CLIPVisionModelWithProjection`` as a ``VisionTower``.

    Pseudo-tokens take the place of the patch embeddings: the sequence is [class token, P_1..P_n],
    each plus the position embedding of its slot (as patches would get), then the pre-LayerNorm,
    the encoder, the post-LayerNorm of the class token and the visual projection -- the model's own
    forward from the patch embeddings on, so n = all patches of a real image reproduces
    ``model(pixel_values).image_embeds``.
    """

    def __init__(self, model: torch.nn.Module, image_size: int | None = None,
                 mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD):
        self.model = model.eval().requires_grad_(False)
        cfg = model.config
        self.width = int(cfg.hidden_size)
        self.embed_dim = int(cfg.projection_dim)
        self.image_size = int(image_size or cfg.image_size)
        self.max_tokens = (int(cfg.image_size) // int(cfg.patch_size)) ** 2
        self.mean, self.std = tuple(mean), tuple(std)
        self._scale: float | None = None

    @property
    def _param(self) -> torch.Tensor:
        return self.model.visual_projection.weight

    @property
    def device(self) -> torch.device:
        return self._param.device

    def _from_patches(self, patches: torch.Tensor) -> torch.Tensor:
        vm = self.model.vision_model
        emb = vm.embeddings
        n = patches.shape[1]
        pos = emb.position_embedding.weight
        cls = (emb.class_embedding + pos[0]).to(patches.dtype).expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches + pos[1:n + 1].to(patches.dtype)], dim=1)
        x = vm.pre_layrnorm(x)
        hidden = vm.encoder(inputs_embeds=x)[0]
        return self.model.visual_projection(vm.post_layernorm(hidden[:, 0]))

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3 or tokens.shape[-1] != self.width:
            raise ValueError(f"pseudo-tokens must be [N, n, {self.width}], got {tuple(tokens.shape)}")
        if not 1 <= tokens.shape[1] <= self.max_tokens:
            raise ValueError(f"the vision model has {self.max_tokens} patch positions; use 1..{self.max_tokens} "
                             f"pseudo-tokens, not {tokens.shape[1]}")
        p = self._param
        return self._from_patches(tokens.to(p.device, p.dtype)).float()

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        p = self._param
        pixels = clip_preprocess(images, self.image_size, self.mean, self.std).to(p.device, p.dtype)
        return self.model(pixel_values=pixels).image_embeds.float()

    @torch.no_grad()
    def token_scale(self) -> float:
        if self._scale is None:
            conv = self.model.vision_model.embeddings.patch_embedding
            g = torch.Generator().manual_seed(0)
            noise = torch.randn(1, conv.in_channels, self.image_size, self.image_size, generator=g)
            patches = conv(noise.to(conv.weight.device, conv.weight.dtype)).float()
            self._scale = float(patches.pow(2).mean().sqrt()) or 1.0
        return self._scale


class HFTextTower:
    """A transformers ``CLIPTextModelWithProjection`` and its tokenizer as a ``TextTower``."""

    def __init__(self, model: torch.nn.Module, tokenizer):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.embed_dim = int(model.config.projection_dim)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        max_len = int(self.model.config.max_position_embeddings)
        batch = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len,
                               return_tensors="pt")
        dev = self.model.text_projection.weight.device
        return self.model(input_ids=batch["input_ids"].to(dev)).text_embeds.float()


class OpenClipTextTower:
    """The text tower of an ``inversion.classify.OpenClip`` model as a ``TextTower``."""

    def __init__(self, clip):
        self.clip = clip
        self.embed_dim = int(clip.text_features(["a"]).shape[-1])

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.clip.text_features(list(texts))


def load_hf_vision_tower(folder: str | os.PathLike, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32) -> HFVisionTower:
    """A ``CLIPVisionModelWithProjection`` from a local transformers folder (never downloads)."""
    from transformers import CLIPVisionModelWithProjection

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json; give a transformers CLIP vision folder")
    model = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
    size, mean, std = _read_preprocess(folder, int(model.config.image_size))
    return HFVisionTower(model.to(device), size, mean, std)


def load_hf_text_tower(folder: str | os.PathLike, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> HFTextTower:
    """A ``CLIPTextModelWithProjection`` and its tokenizer from a local transformers folder."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json; give a transformers CLIP text folder")
    model = CLIPTextModelWithProjection.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return HFTextTower(model.to(device), tok)


# ---------------------------------------------------------------------------------------------
# Statistics of real image embeddings
# ---------------------------------------------------------------------------------------------


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ledoit-Wolf shrinkage of the covariance of rows ``x`` [M, D]: (Sigma, delta).

    Sigma = (1 - delta) S + delta * mu I, with S the (1/M) sample covariance, mu = tr(S)/D and the
    delta that minimises the expected Frobenius error (Ledoit & Wolf 2004, "A well-conditioned
    estimator for large-dimensional covariance matrices"). With M << D delta is near 1, i.e. an
    isotropic covariance at the data's average variance, which is what a handful of images supports.
    """
    x = x.double()
    m, d = x.shape
    xc = x - x.mean(0, keepdim=True)
    s = xc.T @ xc / m
    mu = float(torch.trace(s)) / d
    d2 = float((s - mu * torch.eye(d, dtype=s.dtype)).pow(2).sum())
    sq = xc.pow(2).sum(1)  # ||x_k||^2
    # sum_k ||x_k x_k^T - S||_F^2 = sum_k ||x_k||^4 - 2 x_k^T S x_k + ||S||_F^2
    b2_bar = float((sq.pow(2) - 2 * ((xc @ s) * xc).sum(1) + s.pow(2).sum()).sum()) / m ** 2
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
    callback: Callable[[dict], object] | None = None,
) -> ImageStats:
    """Encode the user's images with ``tower`` -> mean, shrunk covariance and embedding bank.

    ``images``: [B, 3, H, W] in [0, 1], a list of [3, H, W], or an iterable of such batches.
    ``callback`` receives ``{"done": images encoded so far}`` after each batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    embeds, done = [], 0
    for batch in _batches(images, batch_size):
        embeds.append(tower.encode_images(batch).detach().float().cpu())
        done += len(batch)
        if callback is not None:
            callback({"done": done})
    if not embeds:
        raise ValueError("no images to build statistics from; give at least 2 images")
    meta = {"embed_dim": str(tower.embed_dim)}
    meta.update(metadata or {})
    return stats_from_embeddings(torch.cat(embeds, 0), shrinkage, meta)


def save_image_stats(stats: ImageStats, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the statistics as safetensors (mean, covariance, bank; metadata in the header)."""
    from .formats import atomic_save_safetensors

    meta = dict(stats.metadata)
    meta.update(kind=STATS_KIND, shrinkage=repr(stats.shrinkage), count=str(stats.count),
                embed_dim=str(stats.embed_dim))
    tensors = {"mean": stats.mean.float(), "covariance": stats.covariance.float(), "bank": stats.bank.float()}
    return atomic_save_safetensors(tensors, path, meta, overwrite=overwrite)


def load_image_stats(path: str | os.PathLike) -> ImageStats:
    """Read statistics written by ``save_image_stats``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image statistics file {str(path)!r} does not exist; build it with build_image_stats "
                         "(the InversionBuildImageStats node)")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        keys = set(f.keys())
        if not {"mean", "covariance", "bank"} <= keys:
            raise ValueError(f"{path.name} is not an image-statistics file (needs mean, covariance and bank; "
                             f"has {sorted(keys)})")
        tensors = {k: f.get_tensor(k) for k in ("mean", "covariance", "bank")}
    shrink = float(meta.pop("shrinkage", "0") or 0)
    return ImageStats(tensors["mean"].float(), tensors["covariance"].float(), tensors["bank"].float(), shrink, meta)


# ---------------------------------------------------------------------------------------------
# The optimisation
# ---------------------------------------------------------------------------------------------


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
    callback: Callable[[dict], object] | None = None,
) -> OVIResult:
    """OVI (seeds/004): Adam on pseudo-tokens P to minimise 1 - cos(f(P), t) + lambda_M m(f(P)) + lambda_N nn(f(P)).

    ``target``: text embedding(s) t, [D] or [N, D] (one independent optimisation per row).
    ``stats``: needed when lambda_M or lambda_N > 0. ``callback`` gets a plain dict per step
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
                callback({
                    "step": step + 1, "total": settings.steps, "similarity": float(cos.detach().mean()),
                    "loss": float(loss.detach().mean()),
                    "mahalanobis": None if maha is None else float(maha.detach().mean()),
                    "nn": None if nn_term is None else float(nn_term.detach().mean()),
                })
        with torch.no_grad():
            z = tower.embed_tokens(params * scale)
            history.append(F.cosine_similarity(z, t, dim=-1).float().cpu())
    return OVIResult(z.detach().float().cpu(), torch.stack(history, 0), (params * scale).detach().cpu(), t.cpu())
