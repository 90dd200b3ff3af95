"""Preview Options: images of the concept while it trains, as one ``INVERSION_PREVIEWS`` socket.

Wired into Train Textual Inversion's ``previews`` input, it makes the trainer sample the prompts
every N steps with ComfyUI's own sampler on the model being trained (``comfy_preview``), show each
row on the node, and return them all as its ``previews`` IMAGE. Unconnected, nothing is sampled.
"""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from .comfy_preview import MAX_PROMPTS, MAX_ROWS, PreviewSettings
from .downloads import download_sizes, open_clip_names
from .folders import OPEN_CLIP
from .types import PreviewsType

__all__ = ["NODES", "PreviewOptionsNode"]

_D = PreviewSettings()  # the defaults, written once


class PreviewOptionsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InversionPreviewOptions",
            display_name="Preview Options (Inversion)",
            category="inversion/train",
            description=(
                "Images of the concept while it trains: every N steps (and after the last) Train Textual Inversion "
                "samples each prompt with ComfyUI's own sampler on the model being trained, with the vectors learned "
                "so far, shows the row on the node and returns all rows as its previews image (a row per preview "
                "step, a column per prompt). Same seed for every image, so rows differ only by training. Each "
                "preview costs one KSampler run per prompt; training itself is unchanged."
            ),
            inputs=[
                io.Int.Input("every", default=_D.every, min=1, max=100000,
                             tooltip=f"Preview after every N training steps, and after the last step (at most "
                             f"{MAX_ROWS} previews per run)."),
                io.String.Input("prompts", default=_D.prompts, multiline=True,
                                tooltip=f"One prompt per line (at most {MAX_PROMPTS}), with {{}} or [name] where the "
                                "concept goes: the concept itself ('a photo of {}') and an edit that shows whether it "
                                "combines with other words ('a painting of {} on the beach')."),
                io.String.Input("negative", default=_D.negative, multiline=True,
                                tooltip="The negative prompt of every preview."),
                io.Int.Input("seed", default=_D.seed, min=0, max=2**31 - 1,
                             tooltip="Noise seed of every preview image (the same for each prompt and step)."),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default=_D.sampler_name,
                               tooltip="ComfyUI's sampler, as in KSampler."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default=_D.scheduler,
                               tooltip="ComfyUI's scheduler, as in KSampler."),
                io.Int.Input("steps", default=_D.steps, min=1, max=1000,
                             tooltip="Sampling steps per preview image (fewer = cheaper previews)."),
                io.Float.Input("cfg", default=_D.cfg, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale, as in KSampler."),
                io.Int.Input("width", default=_D.width, min=64, max=4096, step=8,
                             tooltip="Preview width in pixels (smaller = cheaper)."),
                io.Int.Input("height", default=_D.height, min=64, max=4096, step=8,
                             tooltip="Preview height in pixels."),
                io.Combo.Input("open_clip_model", options=open_clip_names(), default=_D.open_clip_model,
                               tooltip="Score each preview row with this open_clip model (the list of Caption "
                               "Init's class mode): CLIP image similarity of the first prompt's image to the "
                               "concept images, and text similarity of the other prompts' images to their prompt "
                               "without the concept (Textual Inversion's two metrics), drawn on the chart. One "
                               "seed, so one sample per prompt: read the trend. none = no scores, nothing loaded. "
                               "A '(download)' entry is fetched into models/open_clip on its first run ("
                               + download_sizes(OPEN_CLIP) + ")."),
            ],
            outputs=[PreviewsType.Output("previews", display_name="previews",
                                         tooltip="Wire into Train Textual Inversion's previews input.")],
        )

    @classmethod
    def execute(cls, every, prompts, negative, seed, sampler_name, scheduler, steps, cfg, width,
                height, open_clip_model=_D.open_clip_model) -> io.NodeOutput:
        settings = PreviewSettings(every=every, prompts=prompts, negative=negative, seed=seed,
                                   sampler_name=sampler_name, scheduler=scheduler, steps=steps, cfg=cfg, width=width,
                                   height=height, open_clip_model=open_clip_model)
        return io.NodeOutput(settings.validate())  # a bad prompt is an error here, at the node that holds it


NODES = [PreviewOptionsNode]
