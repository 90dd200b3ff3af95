"""CLIP towers for OVI (seeds/004): a vision transformer fed pseudo-tokens, and a text encoder.

Towers are small protocols: ``VisionTower`` (pseudo-tokens in, projected embedding out; images in,
embeddings out) and ``TextTower`` (texts in, projected embeddings out). Adapters here cover
transformers' ``CLIPVisionModelWithProjection`` / ``CLIPTextModelWithProjection`` and open_clip text
towers; the ComfyUI pack converts its CLIP_VISION models to the transformers one. f(P) below is
``VisionTower.embed_tokens``: the *unnormalised* projected embedding, exactly what a CLIP vision
encoder outputs for an image, so it can go wherever such an embedding goes (ComfyUI's
unCLIPConditioning).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import torch

from ..data.imageprep import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess

__all__ = [
    "HFTextTower",
    "HFVisionTower",
    "OpenClipTextTower",
    "TextTower",
    "VisionTower",
    "load_hf_text_tower",
    "load_hf_vision_tower",
]


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

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised pixel values [B, 3, S, S] (after mean/std) -> projected embeddings [B, D] (float32)."""
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
        return self.encode_pixels(clip_preprocess(images, self.image_size, self.mean, self.std))

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"normalised pixels must be [B, 3, {s}, {s}], got {tuple(pixels.shape)}")
        p = self._param
        return self.model(pixel_values=pixels.to(p.device, p.dtype)).image_embeds.float()

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
    """The text tower of an ``inversion.vision_language.classify.OpenClip`` model as a ``TextTower``."""

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
