"""LoadConceptImages: the concept's images (a folder or an IMAGE batch) at one training size."""

from __future__ import annotations

import torch

from comfy_api.latest import io

from ..inversion import dataset
from .comfy_run import warn_user
from .folders import resolve_folder

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
                "3-5 varied images are typical for textual inversion."
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
                               "(excluded from the loss by the mask). stretch: ignore the aspect ratio."),
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
            ],
            hidden=[io.Hidden.unique_id],  # names the node in the warning toast
        )

    @classmethod
    def fingerprint_inputs(cls, folder="", images=None, **_):
        if images is not None or not folder.strip():
            return ""
        try:
            files = dataset.list_images(resolve_folder(folder))
        except ValueError:
            return ""
        return "|".join(f"{p.name}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in files)

    @classmethod
    def execute(cls, folder, size, fit, alpha_as_mask, images=None, masks=None) -> io.NodeOutput:
        skipped: list[tuple[str, str]] = []
        if images is not None:
            imgs, m = dataset.fit_batch(images.movedim(-1, 1)[:, :3].float().cpu(), size, fit,
                                        None if masks is None else masks.float().cpu())
        elif folder.strip():
            loaded = dataset.load_concept_folder(resolve_folder(folder), size, fit, alpha_as_mask)
            imgs, m, skipped = loaded.images, loaded.masks, loaded.skipped
        else:
            raise ValueError("folder: give a folder of concept images (absolute, or inside ComfyUI's input "
                             "directory), or connect an IMAGE batch to 'images'")
        if m is None:
            m = torch.ones(imgs.shape[0], size, size)
        text = [f"loaded {imgs.shape[0]} image(s)"]
        if skipped:  # one toast for all of them; the console alone goes unseen
            text.append(f"skipped {len(skipped)} file(s) in folder {folder.strip()!r}:\n"
                        + "\n".join(f"{name}: {reason}" for name, reason in skipped))
            warn_user(None if cls.hidden is None else cls.hidden.unique_id, f"Load Concept Images {text[-1]}")
        return io.NodeOutput(imgs.movedim(1, -1).contiguous(), m, int(imgs.shape[0]), ui={"text": text})


NODES = [LoadConceptImages]
