"""CLIP similarities of preview images: how much they look like the concept, how well an edit is followed.

Textual Inversion (Gal et al. 2022, Sec. 4.3) scores generated images with two CLIP cosines:

- image similarity, the mean pairwise cosine between the CLIP image embeddings of the generated
  images g_i and of the concept's training images x_j:

      S_img = 1 / (|G| |X|) * sum_i sum_j cos(E_I(g_i), E_I(x_j))

- text similarity, per prompt p: the cosine between the average CLIP embedding of the images G_p
  generated from p and the CLIP text embedding of p with the placeholder omitted ("a painting of S* on
  the beach" -> "a painting of on the beach"), the image embeddings averaged first:

      S_txt(p) = cos( 1 / |G_p| * sum_{g in G_p} E_I(g),  E_T(p without S*) )

  and S_txt is its mean over the edit prompts.

On previews there is one image per prompt at each preview step, all from one seed, so the average
of G_p's embeddings is that one image's embedding. As in the paper,
image similarity is measured on the concept prompt (the first line of the previews' prompts, the
concept in a template) and text similarity on the edit prompts (the other lines); with a single
prompt both are measured on it. Every prompt's own pair of values is kept too. One seed makes the
values deterministic for a given vectors-and-settings pair (rows differ only by training), but each is
one sample: read the trend across preview steps, not the third decimal.

The reference side (the concept images' embeddings, the prompts' text embeddings) is encoded once
when the scorer is made; each preview step then costs one image encoding per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .classify import OpenClip
from ..data.imageprep import as_image_list, crop_to_masks
from ..data.prompts import CAPTION_MARKERS

__all__ = ["PreviewClipScore", "ClipPreviewScorer", "prompt_without_concept"]


def prompt_without_concept(prompt: str, markers: Sequence[str] = CAPTION_MARKERS) -> str:
    """``prompt`` with the concept's markers omitted and spaces collapsed (the paper's text-similarity prompt)."""
    for m in markers:
        prompt = prompt.replace(m, " ")
    return " ".join(prompt.split())


@dataclass(frozen=True)
class PreviewClipScore:
    """One preview step's CLIP similarities (cosines in [-1, 1]; higher is better)."""

    image: float  # S_img of the concept prompt's image against the concept images
    text: float | None  # S_txt averaged over the edit prompts (None when no prompt has words besides the concept)
    per_prompt_image: tuple[float, ...]  # S_img of each prompt's image
    per_prompt_text: tuple[float | None, ...]  # S_txt of each prompt's image (None: nothing left without the concept)


class ClipPreviewScorer:
    """S_img and S_txt (module docstring) of preview images, against fixed concept images and prompts."""

    def __init__(self, clip: OpenClip, concept_images: torch.Tensor | Sequence[torch.Tensor],
                 prompts: Sequence[str], masks: torch.Tensor | Sequence[torch.Tensor] | None = None):
        """``concept_images``: [N, 3, H, W] or N tensors [3, H_i, W_i] in [0, 1]; ``masks`` ([N, H, W]
        or N tensors, 1 = the concept) crop each image to its object first, as class mode does; ``prompts``:
        the preview prompts as written (with the concept's markers)."""
        images = as_image_list(concept_images)
        if not images:
            raise ValueError("CLIP scores need at least one concept image")
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise ValueError("CLIP scores need at least one preview prompt")
        if masks is not None:
            masks = list(masks)
            if len(masks) != len(images):
                raise ValueError(f"{len(masks)} masks for {len(images)} concept images; give one mask per image")
            images = [crop_to_masks([img], m[None])[0] for img, m in zip(images, masks)]
        self.clip = clip
        self.prompts = prompts
        self.texts = [prompt_without_concept(p) for p in prompts]
        self.reference = torch.cat([clip.encode_images([img]) for img in images], 0).cpu()  # sizes may differ
        has_text = [i for i, t in enumerate(self.texts) if t]
        self._text_rows = has_text
        self.text_features = clip.encode_texts([self.texts[i] for i in has_text]).cpu() if has_text else None
        edits = [i for i in has_text if i > 0]
        self.edit_prompts = edits if edits else has_text[:1]  # one prompt: S_txt on it

    @torch.no_grad()
    def __call__(self, images: Sequence[torch.Tensor]) -> PreviewClipScore:
        """The scores of one preview step: ``images`` holds one image per prompt ([3, H, W] or [1, 3, H, W], [0, 1])."""
        images = as_image_list(list(images))
        if len(images) != len(self.prompts):
            raise ValueError(f"{len(images)} preview images for {len(self.prompts)} prompts; give one image per prompt")
        feats = torch.cat([self.clip.encode_images([img]) for img in images], 0).cpu()  # [P, D], normalised
        per_image = (feats @ self.reference.T).mean(1)  # [P]: mean over the concept images
        per_text: list[float | None] = [None] * len(images)
        if self.text_features is not None:
            cos = (feats[self._text_rows] * self.text_features).sum(-1)
            for row, value in zip(self._text_rows, cos.tolist()):
                per_text[row] = float(value)
        texts = [per_text[i] for i in self.edit_prompts]
        return PreviewClipScore(
            image=float(per_image[0]),
            text=sum(texts) / len(texts) if texts else None,
            per_prompt_image=tuple(float(v) for v in per_image),
            per_prompt_text=tuple(per_text),
        )
