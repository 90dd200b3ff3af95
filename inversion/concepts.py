"""A concept's training data: its initial embedding and its latents, encoded once (with captions and masks).

``prepare_concept`` encodes the concept images (and their mirror images) with the latent encoder once,
before training: one latent table for images of one size, one per size for aspect buckets
(``dataset.fit(..., "bucket")``). Captions (one per image, each holding the placeholder, or None for
the templates) and loss masks follow the same rows. Every error names what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .embedding import LearnedEmbedding
from .host import LatentEncoder

__all__ = ["ConceptData", "prepare_concept"]


@dataclass
class ConceptData:
    """One concept's training data: its initial embedding and its latents, encoded once.

    Images of one size give one latent table; images in several aspect buckets give one table per
    bucket (a micro-batch draws from one table). Rows run bucket by bucket, and within a bucket its
    images, then (if flip) their mirror images; ``captions`` and ``masks`` follow the same rows."""

    embedding: LearnedEmbedding
    latents: torch.Tensor | tuple[torch.Tensor, ...]  # [M, C, h, w], or one such table per bucket
    captions: list[str | None] | None = None  # per row; each contains the placeholder; None = templates
    masks: torch.Tensor | tuple[torch.Tensor, ...] | None = None  # [M, 1, h, w] loss weights (per bucket)

    def tables(self) -> tuple[torch.Tensor, ...]:
        """The latent tables, one per bucket."""
        return (self.latents,) if isinstance(self.latents, torch.Tensor) else tuple(self.latents)

    def mask_tables(self) -> tuple[torch.Tensor, ...] | None:
        """The mask tables, one per bucket, or None."""
        if self.masks is None:
            return None
        return (self.masks,) if isinstance(self.masks, torch.Tensor) else tuple(self.masks)

    def __len__(self) -> int:
        return sum(len(t) for t in self.tables())


def _check_captions(captions, n: int, placeholder: str) -> list[str | None] | None:
    if captions is None:
        return None
    captions = list(captions)
    if len(captions) != n:
        raise ValueError(f"got {len(captions)} captions for {n} images; give one per image (None = templates) or none")
    bad = [c for c in captions if c is not None and placeholder not in c]
    if bad:
        raise ValueError(f"every caption must contain the placeholder {placeholder!r}; missing in {bad[:2]} "
                         "(prompts.caption_for puts it in place of [name] or {}, or first)")
    return None if all(c is None for c in captions) else captions


def prepare_concept(latent_encoder: LatentEncoder, images: torch.Tensor | Sequence[torch.Tensor],
                    embedding: LearnedEmbedding, *, captions: Sequence[str | None] | None = None,
                    masks: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
                    flip: bool = True, batch_size: int = 4) -> ConceptData:
    """Encode ``images`` [N, 3, H, W] in [0, 1] (and their mirror images) once.

    ``images`` may also be a list of [3, H_i, W_i] (aspect buckets, ``dataset.fit(..., "bucket")``):
    each size is encoded as its own table. ``captions``: one per image, each containing the
    embedding's placeholder, or None for an image that trains with the templates. ``masks``
    [N, 1, H, W] or [N, H, W] in [0, 1] (a list of [H_i, W_i] for a list of images): where the loss counts.
    """
    if isinstance(images, (list, tuple)):
        return _prepare_buckets(latent_encoder, list(images), embedding, captions, masks, flip, batch_size)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"no usable concept images: expected a tensor [N, 3, H, W] with N >= 1, got {shape}; "
                         "load at least one image of the concept")
    if images.shape[1] != 3:
        raise ValueError(f"concept images need 3 channels (RGB) in dim 1, got {images.shape[1]}")
    n = images.shape[0]
    captions = _check_captions(captions, n, embedding.placeholder)
    batch = torch.cat([images, images.flip(-1)]) if flip else images
    with torch.no_grad():
        lat = torch.cat([latent_encoder.encode(batch[i:i + batch_size]) for i in range(0, len(batch), batch_size)])
    lat = lat.detach().float()
    mask_lat = None
    if masks is not None:
        m = masks.float()
        if m.ndim == 3:
            m = m[:, None]
        if m.shape[0] != n or m.ndim != 4:
            raise ValueError(f"masks must be [N, 1, H, W] with N = {n} images, got {tuple(masks.shape)}")
        m = torch.cat([m, m.flip(-1)]) if flip else m
        mask_lat = torch.nn.functional.interpolate(m, size=lat.shape[-2:], mode="area").clamp(0, 1)
        empty = sorted({i % n + 1 for i in (mask_lat.flatten(1).sum(1) <= 0).nonzero().flatten().tolist()})
        if empty:  # a flipped copy is empty exactly when its image's mask is; name each image once, 1-based
            which = ", ".join(f"image {i} of {n}" for i in empty)
            many = len(empty) > 1
            raise ValueError(
                f"masks: the concept mask{'s' if many else ''} of {which} {'are' if many else 'is'} empty at latent "
                f"resolution, so {'those images' if many else 'that image'} would add nothing to the loss; a mask "
                "must be 1 (white) where the concept is: paint the concept in it, remove that image, or disconnect "
                "the masks. A MASK from ComfyUI's Load Image is 1 where the image is transparent (the opposite), so "
                "invert it first (Invert Mask); a fully transparent image has nothing to learn from")
    caps = None if captions is None else (captions + captions if flip else captions)
    return ConceptData(embedding, lat, caps, mask_lat)


def _prepare_buckets(latent_encoder, images: list, embedding, captions, masks, flip, batch_size) -> ConceptData:
    """``prepare_concept`` for a list of images: one latent table per size, in order of first appearance."""
    if not images or any(not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[0] != 3 for x in images):
        raise ValueError("no usable concept images: expected a non-empty list of [3, H, W] tensors (RGB); "
                         "load at least one image of the concept")
    n = len(images)
    captions = _check_captions(captions, n, embedding.placeholder)
    if masks is not None:
        masks = list(masks)
        if len(masks) != n:
            raise ValueError(f"masks: got {len(masks)} masks for {n} images; give one per image (None = no mask)")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, x in enumerate(images):
        groups.setdefault(tuple(x.shape[-2:]), []).append(i)
    parts = []
    for hw, ids in groups.items():
        m = None
        if masks is not None and any(masks[i] is not None for i in ids):
            m = torch.stack([torch.ones(hw) if masks[i] is None else masks[i].float().reshape(hw) for i in ids])
        caps = None if captions is None else [captions[i] for i in ids]
        try:
            parts.append(prepare_concept(latent_encoder, torch.stack([images[i] for i in ids]), embedding,
                                         captions=caps, masks=m, flip=flip, batch_size=batch_size))
        except ValueError as e:  # name the image by its place in the whole list, not in its bucket
            if "image " in str(e) and "masks" in str(e):
                raise ValueError(f"{e} (counting within the {hw[1]}x{hw[0]} bucket: images "
                                 f"{', '.join(str(i + 1) for i in ids)} of {n})") from None
            raise
    if len(parts) == 1:
        return parts[0]
    caps = None
    if captions is not None:
        caps = [c for p in parts for c in (p.captions if p.captions is not None else [None] * len(p))]
    masks_out = None
    if any(p.masks is not None for p in parts):
        masks_out = tuple(p.masks if p.masks is not None else torch.ones_like(p.latents[:, :1]) for p in parts)
    return ConceptData(embedding, tuple(p.latents for p in parts), caps, masks_out)
