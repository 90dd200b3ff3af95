"""The LoRA + embedding pair of a pivotal run (issue 25): save it as two files or as A1111's bundle, and load
any tool's pair, the LoRA by ComfyUI's own loader and each embedding as its own word.

ComfyUI's LoraLoader drops a bundle's embeddings (``lora key not loaded: bundle_emb...``) and its
``embedding:`` route cannot read them, so Load LoRA + Embedding splits the file (``inversion.files.bundle``):
the LoRA keys go to ``comfy.sd.load_lora_for_models``, every embedding to Apply Learned Embedding's route.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

import folder_paths
from comfy_api.latest import io

from ..inversion.embedding import LearnedEmbedding, validate_name
from ..inversion.files import formats
from ..inversion.files.bundle import FORGE_UNMATCHED_LIMIT, save_bundle, split_bundle
from ..inversion.files.lora_file import load_lora, lora_layers, save_lora
from ..inversion.files.safefile import read_safetensors, torch_load_safely
from .comfy_embed import check_embedding_fits, clip_with_embedding, for_clip
from .comfy_run import embedding_path
from .embedding_nodes import _embedding_files
from .lora_nodes import lora_path as loras_file
from .types import EmbeddingType

__all__ = ["NODES", "LoadLoraEmbedding", "SaveLoraEmbedding", "LAYOUTS", "read_pair"]

log = logging.getLogger(__name__)
CATEGORY = "inversion/embeddings"
AUTO, NONE = "auto", "none"
TWO_FILES, BUNDLE = "two files (every UI)", "A1111 bundle (one LoRA file)"
LAYOUTS = [TWO_FILES, BUNDLE]
_FORGE = (f"Forge skips a whole LoRA with more than {FORGE_UNMATCHED_LIMIT} keys it cannot match, and every "
          "bundled tensor is one (SDXL: two per concept): for Forge, or more concepts, use two files.")


def _read_lora_file(path: str) -> tuple[dict, dict[str, str]]:
    if path.lower().endswith(".safetensors"):
        return read_safetensors(path, what="the LoRA file")
    obj = torch_load_safely(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a LoRA state dict")
    return obj, {}


def _beside(lora_file: str) -> str | None:
    """The separate embedding of a LoRA file: models/embeddings/<stem>.safetensors (this pack's pair), or
    <stem>_emb.safetensors beside the LoRA (diffusers' advanced scripts)."""
    stem = Path(lora_file).stem
    for p in (folder_paths.get_full_path("embeddings", f"{stem}.safetensors"),
              os.path.join(os.path.dirname(lora_file), f"{stem}_emb.safetensors")):
        if p and os.path.isfile(p):
            return p
    return None


def read_pair(lora_file: str, embedding: str) -> tuple[dict, list[LearnedEmbedding], list[str]]:
    """The LoRA tensors of ``lora_file``, the embeddings to apply with it (``embedding``: auto, none or a file
    in models/embeddings), and notes on where each came from."""
    tensors, meta = _read_lora_file(lora_file)
    lora, bundled = split_bundle(tensors, meta, stem=Path(lora_file).stem, where=os.path.basename(lora_file))
    notes = [f"bundled: {e.name} ({e.num_vectors} vectors, {', '.join(e.keys)})" for e in bundled]
    if embedding == NONE:
        return lora, [], notes
    embeddings = list(bundled)
    if embedding != AUTO:
        embeddings.append(formats.load_embedding(folder_paths.get_full_path_or_raise("embeddings", embedding),
                                                 name_from_file=True))
        notes.append(f"file: {embedding}")
    elif not bundled:
        separate = _beside(lora_file)
        if separate:
            embeddings.append(formats.load_embedding(separate, name_from_file=True))
            notes.append(f"beside it: {separate}")
        else:
            notes.append("no embedding bundled in the file or beside it (models/embeddings/<lora name>.safetensors, "
                         "<lora name>_emb.safetensors)")
    words = [e.name for e in embeddings]
    if len(set(words)) != len(words):
        raise ValueError(f"embeddings {words}: two have the same word; choose embedding = none, or rename the file")
    return lora, embeddings, notes


class LoadLoraEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InversionLoadLoraEmbedding",
            display_name="Load LoRA + Embedding (Inversion)",
            category=CATEGORY,
            description=(
                "Load a pivotal-tuning pair: the LoRA by ComfyUI's own LoRA loader, and every embedding bundled in "
                "the file (A1111's bundle_emb.*, OneTrainer's, ai-toolkit's emb_params / clip_l / clip_g) as its own "
                "trigger word, which ComfyUI's LoraLoader would drop. A LoRA without bundled embeddings gets the "
                "embedding file beside it (models/embeddings/<lora name>, or diffusers' <lora name>_emb)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the LoRA was trained on."),
                io.Clip.Input("clip", tooltip="Its CLIP: the embeddings become words of it."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A LoRA file in models/loras."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="The LoRA's strength on the diffusion model, as in LoraLoader."),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="The LoRA's strength on the text encoder (only where it has text-encoder "
                               "layers), as in LoraLoader."),
                io.Combo.Input("embedding", options=[AUTO, NONE] + _embedding_files(), default=AUTO,
                               tooltip="auto: the bundled embeddings, else the file beside the LoRA. none: the LoRA "
                               "alone. A file: that embedding, with any bundled ones."),
                io.Float.Input("embedding_strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Prompt weight of each concept's tokens."),
            ],
            outputs=[
                io.Model.Output("model_out", display_name="model", tooltip="The model with the LoRA."),
                io.Clip.Output("clip_out", display_name="clip", tooltip="The CLIP with the LoRA and the trigger words."),
                io.String.Output("triggers", display_name="triggers",
                                 tooltip="The trigger words, comma-separated, to put in prompts."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, embedding=AUTO, **_):
        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            return ""
        other = _beside(path) if embedding == AUTO else (
            None if embedding == NONE else folder_paths.get_full_path("embeddings", embedding))
        return "|".join(f"{os.path.getmtime(p)}:{os.path.getsize(p)}" for p in (path, other) if p)

    @classmethod
    def validate_inputs(cls, lora_name, embedding=AUTO, **_):
        if folder_paths.get_full_path("loras", lora_name) is None:
            return f"lora_name: {lora_name!r} is not in models/loras"
        if embedding not in (AUTO, NONE) and folder_paths.get_full_path("embeddings", embedding) is None:
            return f"embedding: {embedding!r} is not in models/embeddings"
        return True

    @classmethod
    def execute(cls, model, clip, lora_name, strength_model, strength_clip, embedding, embedding_strength) -> io.NodeOutput:
        import comfy.sd

        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        lora, embeddings, notes = read_pair(path, embedding)
        embeddings = [for_clip(clip, e) for e in embeddings]
        for e in embeddings:
            check_embedding_fits(clip, e)
        if lora and (strength_model != 0 or strength_clip != 0):
            model, clip = comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)
        elif not lora:
            notes.append("the file holds no LoRA layers, only embeddings")
        for e in embeddings:
            clip = clip_with_embedding(clip, e, e.name, embedding_strength)
        words = ", ".join(e.name for e in embeddings)
        text = f"{lora_name}: {len(lora_layers(lora))} LoRA layers; triggers: {words or '(none)'}\n" + "\n".join(notes)
        return io.NodeOutput(model, clip, words, ui={"text": [text]})


class SaveLoraEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InversionSaveLoraEmbedding",
            display_name="Save LoRA + Embedding (Inversion)",
            category=CATEGORY,
            description=(
                "Export a pivotal run's pair. Two files: models/loras/<name>.safetensors and "
                "models/embeddings/<name>.safetensors, which every UI loads (the LoRA in its LoRA loader, the "
                "embedding as embedding:<name>). A1111 bundle: one LoRA file with the embeddings inside "
                "(bundle_emb.<word>.*), which A1111 loads as LoRA + trigger words and Load LoRA + Embedding reads; "
                "ComfyUI's own LoraLoader ignores the embeddings. " + _FORGE
            ),
            is_output_node=True,
            inputs=[
                io.String.Input("lora_path", force_input=True,
                                tooltip="The LoRA file (Train Textual Inversion's lora_path)."),
                EmbeddingType.Input("embedding", tooltip="The embedding trained with it."),
                io.String.Input("name", default="",
                                tooltip="File name without extension. Empty = the embedding's name (a bundle: "
                                "<name>_bundle, beside the trainer's LoRA). The trigger words are the embeddings' "
                                "names."),
                io.Combo.Input("layout", options=LAYOUTS, default=TWO_FILES, tooltip=_FORGE),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace existing files of that name. Off: an existing file is an error "
                                 "and nothing is written."),
                io.String.Input("paths", force_input=True, optional=True,
                                tooltip="More concepts' embedding files, one per line (the trainer's paths output): "
                                "all of them go with the LoRA."),
            ],
            outputs=[io.String.Output("lora_file", display_name="lora_file", tooltip="The LoRA file written."),
                     io.String.Output("embedding_files", display_name="embedding_files",
                                      tooltip="The embedding files written (two files), one per line.")],
        )

    @classmethod
    def execute(cls, lora_path, embedding, name, layout, overwrite, paths=None) -> io.NodeOutput:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        tensors, meta = load_lora(lora_path)
        lora, bundled = split_bundle(tensors, meta, stem=Path(lora_path).stem)
        if bundled:
            raise ValueError(f"{lora_path} already holds bundled embeddings ({', '.join(e.name for e in bundled)}); "
                             "save from the trainer's LoRA file")
        concepts = _concepts(embedding, paths)
        same = (lambda p: p.resolve() == Path(lora_path).resolve())
        if layout == BUNDLE:
            out_lora = loras_file(name.strip() or f"{embedding.name}_bundle")
            try:  # refuses names A1111 cannot read, and an existing file, before anything is written
                written = save_bundle(lora, concepts, out_lora, metadata=meta, overwrite=overwrite)
            except FileExistsError:
                raise ValueError(f"{out_lora} exists; nothing was written. Switch overwrite on or choose another "
                                 "name") from None
            n = sum(len(e.keys) for e in concepts)
            note = f"bundled {', '.join(e.name for e in concepts)} in {written}"
            if n > FORGE_UNMATCHED_LIMIT:
                note += f"; {n} bundled tensors: Forge will skip this LoRA (use two files there)"
                log.warning(note)
            return io.NodeOutput(str(written), "", ui={"text": [note]})
        stem = validate_name(name.strip() or embedding.name)
        out_lora = loras_file(stem)
        emb_files = [Path(embedding_path(stem if i == 0 else e.name)) for i, e in enumerate(concepts)]
        todo = [(p, e) for p, e in zip(emb_files, concepts) if not _holds(p, e)]  # the trainer's own file: kept
        taken = [str(p) for p, _ in todo if p.exists()] + ([str(out_lora)] if out_lora.exists() and not same(out_lora) else [])
        if taken and not overwrite:
            raise ValueError(f"{', '.join(taken)}: already there with other contents; nothing was written. Switch "
                             "overwrite on or choose another name")
        if not same(out_lora):
            save_lora(lora, out_lora, metadata=meta, overwrite=overwrite)
        for p, e in todo:
            formats.save_embedding(e, p, overwrite=overwrite)
        files = "\n".join(str(p) for p in emb_files)
        return io.NodeOutput(str(out_lora), files, ui={"text": [f"saved {out_lora}", files]})


def _holds(path: Path, emb: LearnedEmbedding) -> bool:
    """Whether ``path`` already holds exactly ``emb``'s vectors (the file the trainer wrote)."""
    if not path.is_file():
        return False
    try:
        old = formats.load_embedding(path)
    except ValueError:
        return False
    return set(old.keys) == set(emb.keys) and all(
        torch.equal(old.vectors[k], emb.vectors[k].detach().to("cpu", torch.float32)) for k in emb.keys)


def _concepts(embedding: LearnedEmbedding, paths: str | None) -> list[LearnedEmbedding]:
    """The embedding, then every other concept file of ``paths`` (one per line; each its own word)."""
    out = [embedding]
    for line in (paths or "").splitlines():
        if line.strip():
            e = formats.load_embedding(line.strip(), name_from_file=True)
            if all(e.name != o.name for o in out):
                out.append(e)
    return out


NODES = [LoadLoraEmbedding, SaveLoraEmbedding]
