"""The negative (unconditional) image embedding of an unCLIP decoder driven by OVI (seeds/004, Fig. 1).

Classifier-free guidance runs the decoder twice, on the prompt's image embedding z and on a
*negative* one z_neg, and extrapolates eps = eps(z_neg) + w * (eps(z) - eps(z_neg)). OVI makes z;
z_neg is the other half. seeds/004 (Fig. 1, "impact of negative embedding initialization") shows
that a zero tensor as z_neg gives a strong violet cast and poor quality, and that the ECLIPSE
pipeline's default fixes the colour balance. That default (the Kandinsky 2.2 prior pipeline that
ECLIPSE and seeds/004 use, ``get_zero_embed``) is the CLIP vision encoder's embedding of a blank
input, an all-zero tensor *after* CLIP's normalisation, i.e. an image filled with CLIP's mean colour:

    z_neg = f_img(0)

When a negative prompt is given, the same pipelines instead take the prior's output for the
negative text; with OVI as the prior that is OVI run toward the negative text's embedding
(``optimize.optimize_visual_inversion``; nothing here).

ComfyUI's SD2.1 unCLIP gives a conditioning without an unCLIP image the zero ADM vector
(``model_base.SD21UNCLIP.encode_adm``): the zero-tensor case of Fig. 1. The node layer therefore
hands the negative conditioning ``blank_image_embedding`` (or the negative prompt's OVI embedding).
"""

from __future__ import annotations

import torch

from .towers import VisionTower

__all__ = ["blank_image_embedding"]


def blank_image_embedding(tower: VisionTower, image_size: int | None = None) -> torch.Tensor:
    """z_neg = f_img(0): the projected embedding [1, D] (float32, CPU) of an all-zero normalised input.

    ``image_size``: the tower's input resolution (its ``image_size`` attribute when not given).
    """
    size = int(image_size or getattr(tower, "image_size", 0))
    if size < 1:
        raise ValueError("image_size: give the vision model's input resolution (the tower has no image_size)")
    with torch.no_grad():
        z = tower.encode_pixels(torch.zeros(1, 3, size, size))
    return z.detach().float().cpu().reshape(1, -1)
