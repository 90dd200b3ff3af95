"""LoRA Options: pivotal tuning, a LoRA on the UNet trained together with the vectors (issue 25).

The node only describes the LoRA (``inversion.lora.LoraSpec``); Train Textual Inversion trains it when its
``lora`` input is wired (``comfy_lora.lora_clone``: ComfyUI's own training adapters on a MODEL clone) and
writes ``models/loras/<name>.safetensors`` in kohya's layout, which ComfyUI's LoraLoader and A1111/Forge
load. The helpers here are the trainer's file rules for it, the same as for the embedding: ``error`` never
touches an existing file, ``overwrite`` replaces it when the run completes, ``resume`` continues it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..inversion.embedding import validate_name
from ..inversion.files.lora_file import load_lora, save_lora
from ..inversion.lora import DEFAULT_TARGETS, LoraLayers, LoraSpec
from .types import LoraOptionsType

__all__ = ["NODES", "LoraOptionsNode", "BLOCKS", "LAYERS", "lora_path", "check_lora_file", "resume_lora",
           "write_lora", "apply_lora"]

log = logging.getLogger(__name__)

# The LDM UNet's parts (what ComfyUI names its modules): down = input_blocks, mid = middle_block, up = output_blocks
BLOCKS = {"all": (), "down (input_blocks)": ("input_blocks.",), "mid (middle_block)": ("middle_block.",),
          "up (output_blocks)": ("output_blocks.",), "mid + up": ("middle_block.", "output_blocks.")}
LAYERS = {"attention": DEFAULT_TARGETS, "attention + feed-forward": DEFAULT_TARGETS + ("ff.net.0.proj", "ff.net.2")}
_D = LoraSpec()


class LoraOptionsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InversionLoraOptions",
            display_name="LoRA Options (Inversion)",
            category="inversion/train",
            description=(
                "Pivotal tuning: wire into Train Textual Inversion's lora input to train a LoRA on the UNet together "
                "with the embedding (ComfyUI's own LoRA adapters, as core's Train LoRA makes them). The trainer "
                "writes models/loras/<name>.safetensors beside the embedding, in the layout ComfyUI's LoraLoader and "
                "A1111/Forge load, and outputs the MODEL with it applied. Unconnected, only the embedding trains."
            ),
            inputs=[
                io.Int.Input("rank", default=_D.rank, min=1, max=256,
                             tooltip="LoRA rank r: the size of each layer's update (down: r x in, up: out x r)."),
                io.Float.Input("alpha", default=_D.alpha, min=0.01, max=1024.0, step=0.01, round=False,
                               tooltip="The update is scaled by alpha / rank (alpha = rank: scale 1)."),
                io.Float.Input("learning_rate", default=_D.lr, min=1e-7, max=1.0, step=1e-5, round=False,
                               tooltip="The LoRA's own AdamW rate (the embedding keeps the trainer's)."),
                io.Float.Input("start", default=_D.start, min=0.0, max=0.95, step=0.05,
                               tooltip="Fraction of the steps the embedding trains alone before the LoRA joins it "
                               "(0 = together from the first step)."),
                io.Combo.Input("blocks", options=list(BLOCKS), default="all",
                               tooltip="Which part of the UNet gets the LoRA."),
                io.Combo.Input("layers", options=list(LAYERS), default="attention",
                               tooltip="attention: the attention projections (q, k, v, out), as diffusers' and "
                               "kohya's LoRAs by default; + feed-forward adds the transformer blocks' MLPs."),
            ],
            outputs=[LoraOptionsType.Output("lora", display_name="lora",
                                            tooltip="Wire into Train Textual Inversion's lora input.")],
        )

    @classmethod
    def execute(cls, rank, alpha, learning_rate, start, blocks, layers) -> io.NodeOutput:
        if blocks not in BLOCKS or layers not in LAYERS:
            raise ValueError(f"blocks must be one of {list(BLOCKS)} and layers one of {list(LAYERS)}, "
                             f"got {blocks!r} and {layers!r}")
        spec = LoraSpec(rank=int(rank), alpha=float(alpha), lr=float(learning_rate), start=float(start),
                        targets=LAYERS[layers], blocks=BLOCKS[blocks])
        return io.NodeOutput(spec.validate())


# ---------------------------------------------------------------- the trainer's LoRA file

def lora_path(name: str) -> Path:
    """``models/loras/<name>.safetensors`` (the first loras folder ComfyUI searches)."""
    folder = folder_paths.get_folder_paths("loras")[0]
    os.makedirs(folder, exist_ok=True)
    return Path(folder) / f"{validate_name(name)}.safetensors"


def check_lora_file(path: Path, if_exists: str) -> None:
    """Before any work: ``if_exists = error`` never touches an existing LoRA file."""
    if if_exists == "error" and path.exists():
        raise ValueError(f"{path} already exists (the LoRA of an earlier run). Set if_exists = overwrite to replace "
                         "it when this run completes, resume to continue that run, or choose another name")


def resume_lora(group: LoraLayers, path: Path, resume, warn) -> None:
    """A resumed run whose state has no LoRA (an embedding-only state, or none) continues the LoRA file
    when there is one (its optimiser restarts); a state with the LoRA is restored by the trainer."""
    if resume is None or "lora" in resume.groups or not path.exists():
        return
    tensors, _ = load_lora(path)
    group.load_kohya(tensors)
    warn(f"resuming the LoRA from {path} (the run's state has none): its optimiser restarts")


def write_lora(tensors, path: Path, metadata: dict[str, str]) -> Path:
    """The trained LoRA (``LoraLayers.kohya_state_dict``), atomically (the caller checked if_exists before the run)."""
    return save_lora(tensors, path, metadata=metadata, overwrite=True)


def apply_lora(model, clip, tensors):
    """``model`` with the trained LoRA applied by ComfyUI's own LoRA loader (as LoraLoader applies a file)."""
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, clip, tensors, 1.0, 0.0)[0]


NODES = [LoraOptionsNode]
