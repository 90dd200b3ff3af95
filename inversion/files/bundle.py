"""One LoRA file that carries its embeddings: A1111's bundle, and the layouts other trainers write.

**A1111's bundle** (``extensions-builtin/Lora``, since v1.7): a kohya-layout LoRA whose extra keys
``bundle_emb.<word>.<part>`` are embeddings. A1111 splits such a key at its first two dots into
``<word>`` and ``<part>`` and hands each word's parts to its embedding reader, which takes
``string_to_param.*`` (one tensor [k, d]: SD1/SD2), or ``clip_l`` + ``clip_g`` (SDXL), or one other
tensor. So a word holds no dot, and an SD1/SD2 word is written as ``string_to_param.*``.

Written by this module: ``bundle_emb.<word>.string_to_param.*`` for a one-encoder embedding,
``bundle_emb.<word>.clip_l`` / ``.clip_g`` for SDXL, beside the LoRA's own keys.

Read: those, and the variants other tools write, each turned into a ``LearnedEmbedding`` named by its word:

- ``bundle_emb.<word>.string_to_param.*`` / ``.emb_params`` / ``.<encoder>`` (A1111, OneTrainer, kohya-style
  LoRAs with bundles; ``t5`` is read as ``t5xxl``);
- no prefix: top-level ``emb_params`` or ``clip_l`` / ``clip_g`` beside the LoRA keys (ai-toolkit): one
  embedding, named by the file's header ``name`` or else the file's stem.

ComfyUI's LoRA loader does not know these keys (it logs ``lora key not loaded: bundle_emb...``) and
Forge skips a whole LoRA that has more than 12 keys it cannot match, so a bundle holding more than 12
embedding tensors loads in A1111 but not in Forge: for Forge, export the pair as two files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from ..embedding import LearnedEmbedding, validate_name
from .formats import _check_vectors, _resolve_key
from .lora_file import lora_layers
from .safefile import atomic_save_safetensors

__all__ = ["BUNDLE_PREFIX", "FORGE_UNMATCHED_LIMIT", "bundle_tensors", "save_bundle", "split_bundle",
           "a1111_bundle_words"]

BUNDLE_PREFIX = "bundle_emb."
FORGE_UNMATCHED_LIMIT = 12  # Forge drops a LoRA with more unmatched keys than this (OneTrainer #485)
_SINGLE = "string_to_param.*"
# the parts an embedding's tensor may be stored under, with the encoder it means (None: by its width)
_PART_KEYS = {"string_to_param.*": None, "string_to_param": None, "emb_params": None,
              "clip_l": "clip_l", "clip_h": "clip_h", "clip_g": "clip_g", "t5": "t5xxl", "t5xxl": "t5xxl"}
_TOP_LEVEL = ("emb_params", "clip_l", "clip_g")  # ai-toolkit: the embedding's keys without a prefix


def bundle_word(name: str) -> str:
    """The bundle's word for an embedding: its name, which A1111 cuts at the first dot, so none is allowed."""
    validate_name(name)
    if "." in name:
        raise ValueError(f"embedding {name!r}: a bundled embedding's name cannot hold a '.' (A1111 reads "
                         f"bundle_emb.<word>.<part> by cutting at the dots); rename it, e.g. "
                         f"{name.replace('.', '_')!r}, or export the pair as two files")
    return name


def bundle_tensors(embeddings: list[LearnedEmbedding]) -> dict[str, torch.Tensor]:
    """The ``bundle_emb.*`` tensors of ``embeddings`` in A1111's layout (float32, contiguous)."""
    out: dict[str, torch.Tensor] = {}
    for emb in embeddings:
        word = bundle_word(emb.name)
        if any(k.startswith(f"{BUNDLE_PREFIX}{word}.") for k in out):
            raise ValueError(f"two embeddings are named {word!r}: each bundled concept needs its own word")
        _check_vectors(emb)
        vec = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in emb.vectors.items()}
        if len(vec) == 1:
            out[f"{BUNDLE_PREFIX}{word}.{_SINGLE}"] = next(iter(vec.values()))
        elif sorted(vec) == ["clip_g", "clip_l"]:
            out.update({f"{BUNDLE_PREFIX}{word}.{k}": vec[k] for k in ("clip_l", "clip_g")})
        else:
            raise ValueError(f"embedding {word!r} has encoders {', '.join(vec)}: A1111's bundle holds one encoder "
                             "(SD1/SD2) or clip_l + clip_g (SDXL)")
    return out


def save_bundle(lora: Mapping[str, torch.Tensor], embeddings: list[LearnedEmbedding], path: str | os.PathLike, *,
                metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write one LoRA file with ``embeddings`` bundled in it (A1111's layout), atomically; an existing file
    is replaced only with ``overwrite``. The header lists the words (``bundle_words``)."""
    if not lora_layers(lora):
        raise ValueError("a bundle needs the LoRA's tensors (<layer>.lora_down.weight ...): none were given")
    if not embeddings:
        raise ValueError("a bundle needs at least one embedding; without one, save the LoRA alone")
    clash = [k for k in lora if k.startswith(BUNDLE_PREFIX)]
    if clash:
        raise ValueError(f"the LoRA already holds bundled embeddings ({clash[0]}, ...): bundle from the LoRA alone")
    emb = bundle_tensors(embeddings)
    meta = {**(metadata or {}), "bundle_words": ",".join(e.name for e in embeddings)}
    return atomic_save_safetensors({**lora, **emb}, path, meta, overwrite=overwrite)


def a1111_bundle_words(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """What A1111 makes of a file's ``bundle_emb`` keys: per word, its parts, with A1111's checks.

    A key is cut as ``bundle_emb.<word>.<part>``; ``string_to_param.<x>`` becomes that word's one
    textual-inversion tensor; a word is then read as string_to_param (exactly one term), or as SDXL
    (``clip_l`` and ``clip_g``), or as one other tensor. Raises ``ValueError`` where A1111 would fail.
    """
    words: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith(BUNDLE_PREFIX):
            continue
        pieces = key.split(".", 2)
        if len(pieces) != 3 or not pieces[1] or not pieces[2]:
            raise ValueError(f"{key}: a bundled embedding key is bundle_emb.<word>.<part>")
        words.setdefault(pieces[1], {})[pieces[2]] = t
    for word, parts in words.items():
        s2p = [p for p in parts if p.split(".")[0] == "string_to_param"]
        if s2p:
            if len(s2p) != 1:
                raise ValueError(f"bundle word {word!r}: more than one string_to_param term")
        elif not ({"clip_l", "clip_g"} <= set(parts)) and len(parts) != 1:
            raise ValueError(f"bundle word {word!r} has parts {sorted(parts)}: A1111 reads string_to_param, "
                             "clip_l + clip_g, or one tensor")
        for p, t in parts.items():
            if not isinstance(t, torch.Tensor) or t.ndim not in (1, 2) or not t.is_floating_point():
                raise ValueError(f"bundle word {word!r}: {p} is not a float [k, d] tensor")
    return words


def _vectors(word: str, parts: Mapping[str, torch.Tensor], where: str, notes: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for part, t in parts.items():
        if part not in _PART_KEYS:
            raise ValueError(f"{where}: embedding {word!r} has a part {part!r} this pack does not know; known: "
                             f"{', '.join(_PART_KEYS)}")
        t = t.detach().to("cpu", torch.float32)
        t = t.unsqueeze(0) if t.ndim == 1 else t
        if t.ndim != 2 or 0 in t.shape or not torch.isfinite(t).all():
            raise ValueError(f"{where}: embedding {word!r} part {part!r} is not a finite [k, d] tensor "
                             f"(shape {tuple(t.shape)})")
        key = _PART_KEYS[part] or _resolve_key(int(t.shape[1]), {}, None, notes)
        if key in out:
            raise ValueError(f"{where}: embedding {word!r} holds two tensors for {key}")
        out[key] = t.contiguous().clone()
    return out


def split_bundle(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *,
                 stem: str = "embedding", where: str = "the LoRA file"
                 ) -> tuple[dict[str, torch.Tensor], list[LearnedEmbedding]]:
    """A LoRA file's state dict split into (the LoRA's own tensors, the embeddings bundled in it), for every
    layout in this module's docstring. A file without embeddings gives an empty list."""
    metadata = dict(metadata or {})
    words: dict[str, dict[str, torch.Tensor]] = {}
    lora: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.startswith(BUNDLE_PREFIX):
            pieces = key.split(".", 2)
            if len(pieces) != 3:
                raise ValueError(f"{where}: {key} is not bundle_emb.<word>.<part>")
            words.setdefault(pieces[1], {})[pieces[2]] = t
        elif key in _TOP_LEVEL:  # ai-toolkit's unprefixed embedding
            words.setdefault("", {})[key] = t
        else:
            lora[key] = t
    embeddings = []
    for word, parts in words.items():
        name = word or _top_level_name(metadata, stem)
        notes: dict[str, str] = {}
        vec = _vectors(name, parts, where, notes)
        k = {v.shape[0] for v in vec.values()}
        if len(k) != 1:
            raise ValueError(f"{where}: embedding {name!r} has different numbers of vectors per encoder")
        meta = {"bundled_in": where, "bundle_part": ",".join(sorted(parts)), **notes}
        embeddings.append(LearnedEmbedding(validate_name(name), vec, metadata=meta))
    return lora, embeddings


def _top_level_name(metadata: Mapping[str, str], stem: str) -> str:
    from .formats import _sanitise_name

    for key in ("name", "ss_output_name"):
        if metadata.get(key):
            return _sanitise_name(metadata[key])
    return _sanitise_name(stem)
