"""OVI: a training-free diffusion prior (seeds/004) and the image statistics it can be held to.

- **InversionOVIPrior** -- a CLIP image embedding optimised from pseudo-tokens toward the prompt's
  text embedding, output as a CLIP_VISION_OUTPUT whose ``image_embeds`` is 2-D [1, D] so the stock
  unCLIPConditioning node takes it (a 1-D tensor is silently misread by ComfyUI's unCLIP code,
  ../shared/COMFYUI_NOTES.md section 4); and the *negative* image embedding for the negative
  conditioning (seeds/004 Fig. 1: ComfyUI gives a conditioning without one the zero ADM vector, the
  zero-tensor case that casts violet; ``inversion.ovi.negative``).
- **InversionBuildImageStats** -- mean, covariance and embedding bank of the user's images (with a
  CLIP_VISION model), saved to ``models/ovi_stats`` for OVIPrior's constraints; a folder is read
  lazily, ``batch_size`` images at a time, so a large image set never sits in memory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

import comfy.clip_vision
import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..inversion import charts, ovi
from ..inversion.data import dataset
from .comfy_run import check_cancel, progress_callback, warn_user
from .downloads import NONE, installed_names
from .folders import OPEN_CLIP, OVI_STATS, model_dirs, mtime, resolve_folder, safe_file_name
from .model_cache import load_open_clip, on_compute_device, vision_tower
from .vision_adapters import ComfyClipTextTower

__all__ = ["NODES", "OVIPrior", "BuildImageStats"]

log = logging.getLogger(__name__)

CATEGORY = "inversion/vision-language"
FROM_CLIP = "(from the clip input)"
NEG_BLANK, NEG_PROMPT = "blank image", "negative prompt (OVI)"  # OVIPrior's ``negative`` options
LAMBDA_GUIDE = (
    "Which lambda fits depends on the statistics: the paper's (lambda_m 0.009, lambda_n 0.5) are for a large, "
    "varied image set (COCO-sized, thousands of images). Statistics of a few images of one subject are tight "
    "and nearly isotropic (strong shrinkage), so the Mahalanobis term is far larger for the same prompt: start "
    "lambda_m an order of magnitude or more lower and raise it until the similarity begins to drop; lambda_n's "
    "term is a cosine (0..2) whatever the set, so ~0.5 carries over, but with a few images it pulls every prompt "
    "toward those images."
)


def _stats_names() -> list[str]:
    return [NONE] + folder_paths.get_filename_list(OVI_STATS)


class OVIPrior(io.ComfyNode):
    """A CLIP image embedding optimised toward the prompt (seeds/004), for unCLIP models."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InversionOVIPrior",
            display_name="OVI Prior (Inversion)",
            category=CATEGORY,
            description=(
                "Training-free diffusion prior (Optimization-based Visual Inversion): optimises pseudo-tokens "
                "through the CLIP vision model until its image embedding matches the prompt's text embedding. "
                "Connect the output to unCLIPConditioning with an SD2.1 unCLIP checkpoint to generate from text "
                "with no image and no trained prior. The text side must share the vision model's space: an SD2.x "
                "CLIP for clip_vision_h (never an SD1 CLIP), or an open_clip text encoder from models/open_clip."
            ),
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the unCLIP checkpoint was "
                                    "trained with (clip_vision_h for SD2.1 unCLIP-H), e.g. from CLIPVisionLoader."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="What the image should show; its text embedding is the target."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Text side: an SD2.x CLIP (its clip_h pooled output is projected into "
                              "ViT-H's space) or an SDXL CLIP (clip_g, for ViT-bigG). SD1 CLIPs are refused."),
                io.Combo.Input("text_encoder", options=[FROM_CLIP] + installed_names(OPEN_CLIP),
                               default=FROM_CLIP,
                               tooltip="Or take the text embedding from an open_clip model file of the same "
                               "CLIP as the vision model (models/open_clip)."),
                io.Int.Input("num_tokens", default=1, min=1, max=256,
                             tooltip="Pseudo-tokens optimised. More reach a higher similarity to the text "
                             "(paper, Fig. 2) but drift further from real images."),
                io.Int.Input("steps", default=300, min=1, max=10000, tooltip="Adam steps (paper: 500-1000)."),
                io.Float.Input("lr", default=0.05, min=1e-5, max=10.0, step=0.001,
                               tooltip="Adam learning rate on the pseudo-tokens (unit scale)."),
                io.Combo.Input("image_stats", options=_stats_names(), default=NONE,
                               tooltip="Statistics of real image embeddings from BuildImageStats "
                               "(models/ovi_stats); needed when lambda_m or lambda_n > 0."),
                io.Float.Input("lambda_m", default=0.0, min=0.0, max=10.0, step=0.001,
                               tooltip="Mahalanobis pull toward the images' mean (paper: 0.009 with a large "
                               "image set; >= 0.05 collapses every prompt toward a generic image). " + LAMBDA_GUIDE),
                io.Float.Input("lambda_n", default=0.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Nearest-neighbour pull toward the closest real embeddings (paper: 0.5 with a "
                               "large image set; with a few images it pulls toward those images)."),
                io.Int.Input("nn_k", default=1, min=1, max=64,
                             tooltip="How many nearest real embeddings the lambda_n term pulls toward."),
                io.Int.Input("token_seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the random pseudo-tokens the optimisation starts from."),
                io.Combo.Input("negative", options=[NEG_BLANK, NEG_PROMPT], default=NEG_BLANK,
                               tooltip="The image embedding for the negative conditioning (negative_clip_vision_"
                               "output): 'blank image' = the vision model's embedding of a blank (all-zero "
                               "normalised) image, the ECLIPSE default the paper uses (Fig. 1: no embedding, i.e. "
                               "zeros, casts violet); 'negative prompt (OVI)' = OVI toward negative_prompt's text, "
                               "optimised alongside the prompt."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="The negative text for negative = 'negative prompt (OVI)' (empty = the "
                                "unconditional text); ignored with 'blank image'."),
            ],
            outputs=[
                io.ClipVisionOutput.Output("clip_vision_output", display_name="clip_vision_output", tooltip="image_embeds [1, D] for "
                                           "unCLIPConditioning (only image_embeds is set)."),
                io.Image.Output("similarity_chart", display_name="similarity_chart", tooltip="Cosine similarity to the text embedding per step."),
                io.Float.Output("similarity", display_name="similarity", tooltip="Final cosine similarity to the text embedding."),
                io.ClipVisionOutput.Output("negative_clip_vision_output", display_name="negative_clip_vision_output",
                                           tooltip="image_embeds [1, D] for a second unCLIPConditioning on the "
                                           "negative prompt's conditioning (see 'negative'), so guidance does not "
                                           "run against ComfyUI's zero embedding."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, image_stats=NONE, **_):
        return mtime(folder_paths.get_full_path(OVI_STATS, image_stats)) if image_stats != NONE else 0.0

    @classmethod
    def execute(cls, clip_vision, prompt, clip=None, text_encoder=FROM_CLIP, num_tokens=1, steps=300, lr=0.05,
                image_stats=NONE, lambda_m=0.0, lambda_n=0.0, nn_k=1, token_seed=0, negative=NEG_BLANK,
                negative_prompt="") -> io.NodeOutput:
        if not prompt.strip():
            raise ValueError("prompt: give the text the image should match")
        if negative not in (NEG_BLANK, NEG_PROMPT):
            raise ValueError(f"negative: {negative!r} is not one of {NEG_BLANK!r}, {NEG_PROMPT!r}")
        settings = ovi.OVISettings(num_tokens=num_tokens, steps=steps, lr=lr, lambda_m=lambda_m, lambda_n=lambda_n,
                                   nn_k=nn_k, seed=token_seed)
        target = text_embedding(clip, text_encoder, prompt)
        if negative == NEG_PROMPT:  # one batch: the rows are optimised independently (optimize.py)
            target = torch.cat([target, text_embedding(clip, text_encoder, negative_prompt)], 0)
        stats_path = _stats_path(image_stats, lambda_m > 0 or lambda_n > 0)
        with torch.inference_mode(False), torch.enable_grad():
            stats = None if stats_path is None else ovi.load_image_stats(stats_path)
            tower = vision_tower(clip_vision)
            if target.shape[-1] != tower.embed_dim:
                raise ValueError(
                    f"clip/text_encoder: the text embedding is {target.shape[-1]}-d but the vision model embeds "
                    f"in {tower.embed_dim}-d; use the text side of the same CLIP (SD2.x CLIP with clip_vision_h)"
                )
            with on_compute_device(tower.model):
                result = ovi.optimize_visual_inversion(tower, target.clone(), settings, stats, progress_callback(steps))
                neg = result.embeds[1:2] if negative == NEG_PROMPT else ovi.blank_image_embedding(tower)
        sims = result.similarity[:, 0].tolist()
        return io.NodeOutput(clip_vision_output(result.embeds[0:1]), charts.similarity_chart(sims).unsqueeze(0),
                             float(sims[-1]), clip_vision_output(neg))


def clip_vision_output(embeds: torch.Tensor) -> comfy.clip_vision.Output:
    """A CLIP_VISION_OUTPUT carrying only ``image_embeds`` as 2-D [1, D] (unclip_adm iterates rows)."""
    out = comfy.clip_vision.Output()
    out["image_embeds"] = embeds.reshape(1, -1).to(comfy.model_management.intermediate_device())
    out["mm_projected"] = None
    return out


def text_embedding(clip, text_encoder: str, prompt: str) -> torch.Tensor:
    """The prompt's projected text embedding [1, D] from the open_clip file or the CLIP input."""
    if text_encoder and text_encoder != FROM_CLIP:
        model = load_open_clip(text_encoder)
        with on_compute_device(model.model, model):
            return ovi.OpenClipTextTower(model).encode_text([prompt]).cpu()
    if clip is None:
        raise ValueError("clip: connect an SD2.x CLIP (or pick an open_clip text_encoder) for the text embedding")
    return ComfyClipTextTower(clip).encode_text([prompt])


def _stats_path(image_stats: str, constrained: bool) -> str | None:
    """The file of combo entry ``image_stats`` (None for "none", refused when a constraint needs one)."""
    if image_stats != NONE:
        path = folder_paths.get_full_path(OVI_STATS, image_stats)
        if path is None:
            raise ValueError(f"image_stats: {image_stats!r} not found in {model_dirs(OVI_STATS)}")
        return path
    if constrained:
        raise ValueError("image_stats: lambda_m / lambda_n > 0 need image statistics; build them from your "
                         "images with the BuildImageStats node, or set both to 0")
    return None


class BuildImageStats(io.ComfyNode):
    """Mean, covariance and embedding bank of the user's images for OVI's constraints."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InversionBuildImageStats",
            display_name="Build Image Stats (Inversion)",
            category=CATEGORY,
            is_output_node=True,
            description=(
                "Encodes your images with a CLIP vision model and saves their mean, covariance (shrunk, so a "
                "few images suffice) and embeddings to models/ovi_stats/<name>.safetensors, for OVIPrior's "
                "Mahalanobis and nearest-neighbour constraints. A folder is streamed in batches (progress bar, "
                "Cancel), so a large image set like the paper's works too. " + LAMBDA_GUIDE
            ),
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="The same CLIP vision model OVIPrior will use."),
                io.String.Input("name", default="my_images",
                                tooltip="File name in models/ovi_stats (.safetensors is added)."),
                io.Image.Input("images", optional=True, tooltip="Images to describe (an IMAGE batch)."),
                io.String.Input("folder", default="",
                                tooltip="Or a folder of images (absolute, or under ComfyUI's input folder)."),
                io.Float.Input("shrinkage", default=-1.0, min=-1.0, max=1.0, step=0.01,
                               tooltip="Covariance shrinkage toward the identity: -1 = automatic (Ledoit-Wolf), "
                               "0 = sample covariance, 1 = isotropic."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name."),
                io.Boolean.Input("recursive", default=False,
                                 tooltip="Also read the images in the folder's sub-folders (a large image set "
                                 "such as COCO's train2017 or a photo library)."),
                io.Int.Input("batch_size", default=16, min=1, max=512,
                             tooltip="Images decoded and encoded at a time: only this many are ever in memory, "
                             "so a folder of any size works (the embeddings, D floats per image, are kept)."),
            ],
            outputs=[io.String.Output("stats_file", display_name="stats_file", tooltip="The file name to pick in OVIPrior's image_stats.")],
        )

    @classmethod
    def execute(cls, clip_vision, name, images=None, folder="", shrinkage=-1.0, overwrite=False, recursive=False,
                batch_size=16) -> io.NodeOutput:
        name = safe_file_name(name)
        node_id = None if cls.hidden is None else cls.hidden.unique_id
        dest = Path(model_dirs(OVI_STATS)[0]) / f"{name}.safetensors"
        if dest.exists() and not overwrite:  # refused before encoding, not after an hour of it
            raise FileExistsError(f"name: {dest} exists; choose another name or set overwrite")
        folder = (folder or "").strip()
        files = ovi.image_files(resolve_folder(folder), recursive) if folder else []
        if folder and not files:
            raise ValueError(f"folder: no images ({', '.join(dataset.SUFFIXES)}) in {resolve_folder(folder)}"
                             + ("" if recursive else "; set recursive to read its sub-folders"))
        if images is None and not files:
            raise ValueError("images/folder: connect images or give a folder of images (at least 2)")
        embeds, skipped = encode_image_sources(clip_vision, images, files, batch_size, node_id)
        if skipped:
            warn_user(node_id, f"skipped {len(skipped)} image(s) in {resolve_folder(folder)}: "
                      + "; ".join(f"{p.name} ({why})" for p, why in skipped[:20])
                      + (" ..." if len(skipped) > 20 else ""))
        total = int(embeds.shape[0])
        with torch.inference_mode(False):
            stats = ovi.stats_from_embeddings(embeds.clone(), None if shrinkage < 0 else shrinkage,
                                              {"images": str(total), "source": folder or "IMAGE input"})
            ovi.save_image_stats(stats, dest, overwrite=overwrite)
        folder_paths.filename_list_cache.pop(OVI_STATS, None)
        log.info("saved image statistics of %d images (shrinkage %.3f) to %s", total, stats.shrinkage, dest)
        return io.NodeOutput(dest.name, ui={"text": [f"{dest.name}: {total} images, {stats.embed_dim}-d, "
                                                      f"shrinkage {stats.shrinkage:.3f}"]})


def encode_image_sources(clip_vision, images: torch.Tensor | None, files: list[Path], batch_size: int,
                         node_id: str | None = None) -> tuple[torch.Tensor, list[tuple[Path, str]]]:
    """The image embeddings [N, D] (float32, CPU) of an IMAGE batch and of image files, ``batch_size`` at a
    time, with a progress bar and a Cancel check per batch; returns them and the files skipped.

    Files are decoded lazily (``inversion.ovi.image_batches``), centre-cropped at the encoder's resolution
    (what CLIP's preprocessing keeps), so only one batch of pixels is in memory. ComfyUI's own encoder and
    preprocessing: the embeddings CLIPVisionEncode would give."""
    total = (0 if images is None else int(images.shape[0])) + len(files)
    bar = comfy.utils.ProgressBar(total, node_id=node_id)
    embeds: list[torch.Tensor] = []
    skipped: list[tuple[Path, str]] = []

    def encode(batch: torch.Tensor, advance: int) -> None:
        check_cancel()
        embeds.append(clip_vision.encode_image(batch.float(), crop=True)["image_embeds"].float().cpu())
        bar.update(advance)

    if images is not None:
        for i in range(0, images.shape[0], batch_size):
            chunk = images[i:i + batch_size, ..., :3]
            encode(chunk, chunk.shape[0])
    done = len(skipped)
    for pixels, used in ovi.image_batches(files, int(clip_vision.image_size), batch_size,
                                          on_skip=lambda p, why: skipped.append((p, why))):
        encode(pixels.movedim(1, -1), len(used) + len(skipped) - done)  # skipped files count as done
        done = len(skipped)
    if not embeds:
        raise ValueError("images/folder: none of the images could be read; see the skipped files")
    return torch.cat(embeds, 0), skipped


NODES = [OVIPrior, BuildImageStats]
