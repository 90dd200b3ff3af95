"""LoadConceptImages: the concept's images (a folder or an IMAGE batch) at one training size, or in
aspect-ratio buckets, with their per-image captions (the ``dataset`` output)."""

from __future__ import annotations

from pathlib import Path

import torch

from comfy_api.latest import io

from ..inversion.data import dataset
from .comfy_run import warn_user
from .folders import resolve_folder
from .types import DatasetType

__all__ = ["NODES", "LoadConceptImages"]


class LoadConceptImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InversionLoadConceptImages",
            display_name="Load Concept Images (Inversion)",
            category="inversion/data",
            description=(
                "The images of the concept to learn, from a folder or an IMAGE batch, fitted to one square "
                "training size (EXIF orientation applied, transparency flattened on white and kept as the mask). "
                "3-5 varied images are typical for textual inversion. A caption file image.txt beside image.png "
                "is that image's prompt: write [name] (or {}) where the concept goes, or it is put first. "
                "fit = bucket keeps each image's aspect ratio (kohya's buckets); only the dataset output carries "
                "those sizes and the captions."
            ),
            inputs=[
                io.String.Input("folder", default="",
                                tooltip="Folder of images: an absolute path, or a folder inside ComfyUI's input "
                                "directory (e.g. 'my-cat'). Ignored when images are connected."),
                io.Int.Input("size", default=512, min=64, max=2048, step=8,
                             tooltip="Training resolution in pixels (square). 512 for SD1.x, 768 for SD2.x-768, "
                             "1024 for SDXL; smaller trains faster."),
                io.Combo.Input("fit", options=list(dataset.FIT_MODES), default="crop",
                               tooltip="crop: shortest side to size, centre crop. pad: whole image, white borders "
                               "(excluded from the loss by the mask). stretch: ignore the aspect ratio. bucket: "
                               "each image to the closest of several aspect ratios (1:2 to 2:1) of about size x size "
                               "pixels, cropping the least; the images output is then cropped square for previews, "
                               "and the dataset output carries the buckets."),
                io.Boolean.Input("alpha_as_mask", default=True,
                                 tooltip="Use each image's transparency as its mask, so the loss only counts "
                                 "the concept, not the background."),
                io.Image.Input("images", optional=True,
                               tooltip="Use these images instead of a folder (e.g. from Load Image nodes)."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Masks for the connected images (one, or one per image): where the concept is."),
            ],
            outputs=[
                io.Image.Output("images_out", display_name="images", tooltip="The fitted images [N, size, size, 3]."),
                io.Mask.Output("masks_out", display_name="masks",
                               tooltip="Loss masks [N, size, size] (all ones when there is none)."),
                io.Int.Output("count", display_name="count", tooltip="How many images were loaded."),
                DatasetType.Output("dataset", display_name="dataset",
                                   tooltip="The images (at their bucket sizes with fit = bucket), masks, per-image "
                                   "captions and file names, for the trainer's dataset input."),
            ],
            hidden=[io.Hidden.unique_id],  # names the node in the warning toast
        )

    @classmethod
    def fingerprint_inputs(cls, folder="", images=None, **_):
        if images is not None or not folder.strip():
            return ""
        try:
            root = resolve_folder(folder)
            files = dataset.list_images(root)
        except ValueError:
            return ""
        files += sorted(p for p in Path(root).glob("*.txt") if p.is_file())  # an edited caption reloads too
        return "|".join(f"{p.name}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in files)

    @classmethod
    def execute(cls, folder, size, fit, alpha_as_mask, images=None, masks=None) -> io.NodeOutput:
        node = None if cls.hidden is None else cls.hidden.unique_id
        if images is not None:
            imgs, m = dataset.fit_batch(images.movedim(-1, 1)[:, :3].float().cpu(), size, fit,
                                        None if masks is None else masks.float().cpu())
            if fit == "bucket":  # one size, one bucket; kept per image like a folder's buckets
                imgs, m = list(imgs), None if m is None else list(m)
            loaded = dataset.ConceptImages(imgs, m, [f"image {i + 1}" for i in range(len(imgs))])
        elif folder.strip():
            loaded = dataset.load_concept_folder(resolve_folder(folder), size, fit, alpha_as_mask)
        else:
            raise ValueError("folder: give a folder of concept images (absolute, or inside ComfyUI's input "
                             "directory), or connect an IMAGE batch to 'images'")
        imgs, m = _square(loaded, size)
        if m is None:
            m = torch.ones(imgs.shape[0], *imgs.shape[-2:])
        text = [f"loaded {imgs.shape[0]} image(s)"]
        if fit == "bucket":
            sizes = sorted({f"{w}x{h}" for h, w in loaded.sizes()})
            text.append(f"buckets: {', '.join(sizes)}")
        captioned = sum(c is not None for c in loaded.captions)
        if captioned:
            text.append(f"{captioned} caption(s)")
        if loaded.skipped:  # one toast for all of them; the console alone goes unseen
            text.append(f"skipped {len(loaded.skipped)} file(s) in folder {folder.strip()!r}:\n"
                        + "\n".join(f"{name}: {reason}" for name, reason in loaded.skipped))
            warn_user(node, f"Load Concept Images {text[-1]}")
        for note in loaded.notes:
            text.append(note)
            warn_user(node, f"Load Concept Images: {note}")
        return io.NodeOutput(imgs.movedim(1, -1).contiguous(), m, int(imgs.shape[0]), loaded, ui={"text": text})


def _square(loaded: dataset.ConceptImages, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The IMAGE/MASK outputs: one batch; bucketed images are cropped square as fit = crop would."""
    if isinstance(loaded.images, torch.Tensor):
        return loaded.images, loaded.masks
    masks = loaded.masks if loaded.masks is not None else [None] * len(loaded.images)
    fitted = [dataset.fit(img, size, "crop", m) for img, m in zip(loaded.images, masks)]
    m = None if loaded.masks is None else torch.stack([f[1] for f in fitted])
    return torch.stack([f[0] for f in fitted]), m


NODES = [LoadConceptImages]
