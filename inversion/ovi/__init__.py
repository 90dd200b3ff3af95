"""Optimisation-based Visual Inversion (OVI): a training-free diffusion prior (seeds/004).

A diffusion *prior* maps a text embedding to a CLIP image embedding that an image-conditioned
decoder (Kandinsky, SD2.1 unCLIP) turns into a picture. OVI (Dell'Erba & Bagdanov, seeds/004)
replaces the trained prior by an optimisation: n learnable pseudo-tokens P go through the frozen
CLIP vision transformer in place of an image's patch embeddings, and Adam moves P until the
projected image embedding z = f(P) points where the prompt's text embedding t does:

    L(P) = 1 - cos(f(P), t) + lambda_M * (z - mu)^T Sigma^-1 (z - mu) + lambda_N * nn(z)

with the two constraints (Mahalanobis to, and nearest neighbours among, real image embeddings)
optional. Five modules:

- ``towers``: the ``VisionTower`` / ``TextTower`` protocols and their transformers / open_clip adapters;
- ``stats``: mean, Ledoit-Wolf covariance and embedding bank of the user's images, saved as safetensors;
- ``optimize``: ``OVISettings`` and ``optimize_visual_inversion``, the loss above;
- ``negative``: the negative (unconditional) image embedding for classifier-free guidance (Fig. 1);
- ``folder``: a large folder of images read lazily in batches, for statistics of a large set.

Every public name is importable from here (``from inversion import ovi; ovi.optimize_visual_inversion``).
"""

from .folder import image_batches, image_files
from .negative import blank_image_embedding
from .optimize import OVIResult, OVISettings, OVIStep, nearest_neighbour_loss, optimize_visual_inversion
from .stats import (STATS_KIND, ImageStats, build_image_stats, ledoit_wolf, load_image_stats, save_image_stats,
                    stats_from_embeddings)
from .towers import (HFTextTower, HFVisionTower, OpenClipTextTower, TextTower, VisionTower, load_hf_text_tower,
                     load_hf_vision_tower)

__all__ = [
    "STATS_KIND",
    "HFTextTower",
    "HFVisionTower",
    "ImageStats",
    "OVIResult",
    "OVISettings",
    "OVIStep",
    "OpenClipTextTower",
    "TextTower",
    "VisionTower",
    "blank_image_embedding",
    "build_image_stats",
    "image_batches",
    "image_files",
    "ledoit_wolf",
    "load_hf_text_tower",
    "load_hf_vision_tower",
    "load_image_stats",
    "nearest_neighbour_loss",
    "optimize_visual_inversion",
    "save_image_stats",
    "stats_from_embeddings",
]
