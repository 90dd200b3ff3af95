"""Using and sharing learned embeddings: Apply (in memory), Save, Load, Slerp, Inspect."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..inversion import charts
from ..inversion.files import formats
from ..inversion.methods import inspect as inspection
from ..inversion.files.checkpoint import STATE_SUFFIX
from ..inversion.embedding import validate_name
from ..inversion.methods.interpolate import slerp_embeddings
from .comfy_embed import check_embedding_fits, clip_with_embedding, for_clip
from .comfy_host import comfy_text_side
from .comfy_run import embedding_path
from .run_files import runs_dir
from .types import EmbeddingType

__all__ = ["NODES", "ApplyLearnedEmbedding", "SaveEmbedding", "LoadEmbedding", "EmbeddingSlerp", "InspectEmbedding"]

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


FROM_INPUT = "(from the embedding input)"


def _run_folders(emb) -> list:
    """The training-run folders that may hold this embedding's snapshots: its name, then the name saved in it."""
    names = [emb.name, emb.metadata.get("stored_name", "")]
    return [runs_dir() / n for n in dict.fromkeys(names) if n and (runs_dir() / n).is_dir()]


def _runs_mtime() -> str:
    """Changes when a run writes a state, an unfinished embedding or a snapshot."""
    root = runs_dir()
    if not root.is_dir():
        return "-"
    files = list(root.glob("*/*.safetensors")) + list(root.glob("*/snapshots/*.safetensors"))
    return f"{len(files)}:{max((os.path.getmtime(p) for p in files), default=0.0)}"


class InspectEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InversionInspectEmbedding",
            display_name="Inspect Embedding (Inversion)",
            category=CATEGORY,
            description="What an embedding has become, per vector and text encoder: its norm against the "
                        "vocabulary's norms, its cosine to the vector it started from, the nearest vocabulary "
                        "words, and its drift across the training run's snapshots. Reads any embedding file the "
                        "pack loads (A1111 .pt, diffusers, SDXL clip_l/clip_g, ...).",
            is_output_node=True,
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the model family the embedding belongs to: its token "
                              "table and tokenizer give the words and the norms."),
                EmbeddingType.Input("embedding", optional=True,
                                    tooltip="The embedding to inspect (from the trainer, Load or Slerp). Used "
                                    f"when file is {FROM_INPUT}."),
                io.Combo.Input("file", options=[FROM_INPUT] + _embedding_files(), default=FROM_INPUT,
                               tooltip="Or a file in models/embeddings, read as Load Embedding reads it. A file "
                               "chosen here is inspected instead of the embedding input."),
                io.Int.Input("neighbours", default=5, min=1, max=50,
                             tooltip="How many nearest vocabulary words to list per vector (by cosine)."),
            ],
            outputs=[
                io.String.Output("report", display_name="report",
                                 tooltip="The report: one block per text encoder, one line per vector."),
                io.Image.Output("chart", display_name="chart",
                                tooltip="Each vector's norm over the vocabulary's norm band; cosine to the final "
                                "vector over the run's snapshots, when there are any."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, file=FROM_INPUT, **_):
        path = None if file == FROM_INPUT else folder_paths.get_full_path("embeddings", file)
        mtime = f"{os.path.getmtime(path)}:{os.path.getsize(path)}" if path else "-"
        return f"{mtime}|{_runs_mtime()}"

    @classmethod
    def validate_inputs(cls, file=FROM_INPUT, **_):
        if file != FROM_INPUT and folder_paths.get_full_path("embeddings", file) is None:
            return f"file: {file!r} is not in models/embeddings"
        return True

    @classmethod
    def execute(cls, clip, file, neighbours, embedding=None) -> io.NodeOutput:
        emb, notes = _embedding_to_inspect(clip, embedding, file)
        check_embedding_fits(clip, emb)
        text_side = comfy_text_side(clip)
        vocabs = [inspection.Vocabulary(e.key, e.token_table(), inspection.hf_decoder(e.tokenizer.tokenizer))
                  for e in text_side.encoders]
        initial, how = inspection.initial_vectors(emb, text_side)
        notes.append(f"initial vectors: {how}")
        snapshots = _snapshots(emb, notes)
        reports = inspection.inspect_embedding(emb, vocabs, initial, snapshots, k=int(neighbours))
        report = inspection.format_report(reports, emb, notes)
        chart = charts.inspect_chart([r.chart_row() for r in reports], title=f"Inspect {emb.name}")[None]
        return io.NodeOutput(report, chart, ui={"text": [report]})


def _embedding_to_inspect(clip, embedding, file) -> tuple:
    """The embedding Inspect Embedding looks at (the file when one is chosen), and the report's first notes."""
    if file == FROM_INPUT:
        if embedding is None:
            raise ValueError(f"embedding: connect an embedding, or choose a file instead of {FROM_INPUT}")
        return embedding, []
    path = folder_paths.get_full_path_or_raise("embeddings", file)
    # A one-tensor file of a width no standard CLIP has can only be meant for this CLIP's encoder.
    emb = for_clip(clip, formats.load_embedding(path, name_from_file=True))
    ignored = ["(the embedding input is ignored: a file is chosen)"] if embedding is not None else []
    return emb, [f"file: {file}"] + ignored


def _snapshots(emb, notes: list[str]) -> list:
    """The run's earlier vectors of this embedding's shape, from its training-run folder; notes say what was found."""
    folders = _run_folders(emb)
    for folder in folders:
        found, skipped = inspection.load_snapshots(folder, folder.name)
        notes.extend(f"snapshot {s}" for s in skipped)
        fits = [s for s in found
                if all(k in s.vectors and s.vectors[k].shape == v.shape for k, v in emb.vectors.items())]
        if len(fits) < len(found):
            notes.append(f"snapshots: {len(found) - len(fits)} in {folder} skipped (other encoders or number of "
                         "vectors: another concept of that name?)")
        if fits:
            notes.append(f"snapshots: {len(fits)} in {folder} (steps {', '.join(str(s.step) for s in fits)})")
            return fits
    where = folders[0] if folders else runs_dir() / emb.name
    notes.append(f"snapshots: none in {where}")
    return []


NODES = [ApplyLearnedEmbedding, SaveEmbedding, LoadEmbedding, EmbeddingSlerp, InspectEmbedding]
