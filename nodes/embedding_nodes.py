"""Using and sharing learned embeddings: Apply (in memory), Save, Load, Slerp."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..inversion import formats
from ..inversion.checkpoint import STATE_SUFFIX
from ..inversion.embedding import validate_name
from ..inversion.interpolate import slerp_embeddings
from .comfy_embed import clip_with_embedding
from .comfy_run import embedding_path
from .types import EmbeddingType

__all__ = ["NODES", "ApplyLearnedEmbedding", "SaveEmbedding", "LoadEmbedding", "EmbeddingSlerp"]

CATEGORY = "inversion/embeddings"
FORMATS = ["auto", "single", "sdxl", "diffusers"]


class ApplyLearnedEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InversionApplyLearnedEmbedding",
            display_name="Apply Learned Embedding (Inversion)",
            category=CATEGORY,
            description=(
                "A CLIP whose prompts understand the trigger word (bare, or as embedding:<trigger>) as the learned "
                "embedding, without writing a file. Wire it into the usual CLIP Text Encode nodes; downstream "
                "nodes re-run whenever the embedding changes."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the model family the embedding was trained on."),
                EmbeddingType.Input("embedding", tooltip="The learned embedding (from the trainer, Load or Slerp)."),
                io.String.Input("trigger", default="",
                                tooltip="The word that stands for the concept in prompts. Empty = the embedding's "
                                "name. Must not be a word CLIP already knows."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Prompt weight of the concept's tokens, as (embedding:<trigger>:strength)."),
            ],
            outputs=[
                io.Clip.Output("clip_out", display_name="clip", tooltip="The CLIP with the trigger word."),
                io.String.Output("trigger_out", display_name="trigger", tooltip="The trigger word to put in prompts."),
            ],
        )

    @classmethod
    def execute(cls, clip, embedding, trigger, strength) -> io.NodeOutput:
        word = trigger.strip() or embedding.name
        return io.NodeOutput(clip_with_embedding(clip, embedding, word, strength), word)


class SaveEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InversionSaveEmbedding",
            display_name="Save Embedding (Inversion)",
            category=CATEGORY,
            description="Save an embedding to models/embeddings/<name>.safetensors, the file ComfyUI, A1111/Forge, "
                        "InvokeAI and kohya load (embedding:<name> in ComfyUI prompts).",
            is_output_node=True,
            inputs=[
                EmbeddingType.Input("embedding", tooltip="The embedding to save."),
                io.String.Input("name", default="",
                                tooltip="File name without extension. Empty = the embedding's name."),
                io.Combo.Input("format", options=FORMATS, default="auto",
                               tooltip="auto: clip_l + clip_g for SDXL, one tensor otherwise. diffusers: "
                               "{token: vectors}, for diffusers' load_textual_inversion."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of that name. Off: an existing file is an error."),
            ],
            outputs=[io.String.Output("path", display_name="path", tooltip="The file written.")],
        )

    @classmethod
    def execute(cls, embedding, name, format, overwrite) -> io.NodeOutput:
        path = embedding_path(name.strip() or embedding.name)
        try:
            written = formats.save_embedding(embedding, path, format=format, overwrite=overwrite)
        except FileExistsError as e:
            raise ValueError(f"name: {e}. Choose another name or switch 'overwrite' on") from None
        return io.NodeOutput(str(written), ui={"text": [f"saved {written}"]})


def _embedding_files() -> list[str]:
    """The embeddings ComfyUI lists, without training-state files older versions kept there."""
    return [f for f in folder_paths.get_filename_list("embeddings") if not f.endswith(STATE_SUFFIX)]


class LoadEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InversionLoadEmbedding",
            display_name="Load Embedding (Inversion)",
            category=CATEGORY,
            description="Read an embedding file from models/embeddings (this pack's, ComfyUI/A1111 .pt or "
                        ".safetensors, kohya, InvokeAI or diffusers learned_embeds). Its name (the trigger "
                        "word of Apply Learned Embedding) is the file's name, so renamed copies stay apart.",
            inputs=[
                io.Combo.Input("file", options=_embedding_files(),
                               tooltip="A file in models/embeddings."),
            ],
            outputs=[EmbeddingType.Output("embedding", display_name="embedding", tooltip="The loaded embedding.")],
        )

    @classmethod
    def fingerprint_inputs(cls, file):
        path = folder_paths.get_full_path("embeddings", file)
        return "" if path is None else f"{os.path.getmtime(path)}:{os.path.getsize(path)}"

    @classmethod
    def validate_inputs(cls, file):
        if folder_paths.get_full_path("embeddings", file) is None:
            return f"file: {file!r} is not in models/embeddings"
        return True

    @classmethod
    def execute(cls, file) -> io.NodeOutput:
        # The file's stem, not the name saved inside it, is the embedding's name (and the default
        # trigger word), as in ComfyUI's embedding:<file>: renamed copies stay different words.
        path = folder_paths.get_full_path_or_raise("embeddings", file)
        return io.NodeOutput(formats.load_embedding(path, name_from_file=True))


class EmbeddingSlerp(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InversionEmbeddingSlerp",
            display_name="Embedding Slerp (Inversion)",
            category=CATEGORY,
            description="Blend two concepts along the great circle between their vectors (Directional TI): "
                        "directions are interpolated spherically, norms linearly.",
            inputs=[
                EmbeddingType.Input("a", tooltip="The concept at alpha = 0."),
                EmbeddingType.Input("b", tooltip="The concept at alpha = 1 (same model and number of vectors)."),
                io.Float.Input("alpha", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="0 = a, 1 = b, in between = a blend."),
                io.String.Input("name", default="",
                                tooltip="Name of the blend (its trigger word and file name). Empty = a-b-alpha."),
            ],
            outputs=[EmbeddingType.Output("embedding", display_name="embedding", tooltip="The blended concept.")],
        )

    @classmethod
    def execute(cls, a, b, alpha, name) -> io.NodeOutput:
        return io.NodeOutput(slerp_embeddings(a, b, alpha, validate_name(name.strip()) if name.strip() else None))


NODES = [ApplyLearnedEmbedding, SaveEmbedding, LoadEmbedding, EmbeddingSlerp]
