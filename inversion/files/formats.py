"""Embedding files: write a ``LearnedEmbedding`` in the layouts other UIs read, and read theirs back.

Layouts written (always safetensors, float32, contiguous CPU tensors):

- ``"single"``: ``{"emb_params": [k, d]}``. Loaded by ComfyUI (``embedding:NAME``; it takes the
  first tensor of a file), AUTOMATIC1111 / Forge (a one-key dict; they refuse files with more
  than one tensor key, so nothing else is stored), InvokeAI and kohya sd-scripts (``emb_params``).
- ``"sdxl"``: ``{"clip_l": [k, 768], "clip_g": [k, 1280]}``. Loaded by ComfyUI (each SDXL
  tokenizer picks its own key; an SD1 model uses ``clip_l``), A1111 / Forge, InvokeAI and kohya's
  SDXL scripts.
- ``"keyed"``: one tensor per encoder under ComfyUI's encoder key, for any set of encoders: SD3
  ``{"clip_l", "clip_g", "t5xxl"}`` (or without ``t5xxl``), Flux ``{"clip_l", "t5xxl"}``. ComfyUI's
  tokenizers each pick their own key (``embedding:NAME``); "auto" writes it for SD3's and Flux's sets
  (SD3 without T5 is clip_l + clip_g: "sdxl", the same file).
  Read back also with diffusers' / OneTrainer's ``t5`` for ``t5xxl``.
- ``"diffusers"``: ``{placeholder_token: [k, d]}``, the ``learned_embeds.safetensors`` that
  diffusers' ``pipe.load_textual_inversion(path)`` reads (k > 1 becomes ``<tok> <tok>_1 ...``);
  ComfyUI and A1111 also read it as a one-key file.

Layouts read: those three, plus ``.pt`` / ``.bin`` / ``.ckpt`` files (A1111's
``{"string_to_param": {"*": tensor}, "name", "step", ...}``, diffusers' ``learned_embeds.bin``
``{token: tensor}``, a ``{"clip_l", "clip_g"}`` dict), which are opened only with
``torch.load(weights_only=True)``: a pickle that carries code or objects is refused, never run.

Files are written and read through ``safefile``: every write is atomic (temp file in the same
folder, fsync, rename), so a crash or an error mid-save never leaves a half-written or clobbered
file; a pickle is opened only by ``safefile.torch_load_safely``. A trainer's state file is
``checkpoint``'s business.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..embedding import ENCODER_KEYS, LearnedEmbedding, validate_name
from .safefile import atomic_save_safetensors, read_safetensors, torch_load_safely

__all__ = [
    "FORMATS",
    "detect_format",
    "load_embedding",
    "save_embedding",
]

FORMATS = ("auto", "single", "sdxl", "keyed", "diffusers")
SDXL_KEYS = ("clip_l", "clip_g")
# Other tools' names for an encoder's tensor (diffusers' and OneTrainer's Flux / SD3 files say "t5").
KEY_ALIASES = {"t5": "t5xxl"}
# The encoder sets of SD3 (with and without T5) and Flux: what "auto" saves as "keyed".
FLOW_KEY_SETS = (("clip_l", "clip_g", "t5xxl"), ("clip_l", "clip_g"), ("clip_l", "t5xxl"))
# Token-embedding widths of the CLIP text encoders used by SD1 (ViT-L), SD2 (OpenCLIP ViT-H) and
# SDXL's second encoder (OpenCLIP ViT-bigG): how a file without a header says which encoder.
WIDTH_TO_KEY = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}
DIFFUSERS_FILENAME = "learned_embeds.safetensors"
# Header keys that save_embedding writes from the embedding itself; on load they become the
# name/placeholder/keys again instead of metadata (inversion_version stays, as provenance).
_STRUCTURAL_KEYS = ("name", "placeholder", "format", "encoder_keys", "num_vectors")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SUPPORTED_LAYOUTS = (
    "'emb_params' [k, d] (ComfyUI/A1111/kohya single file); 'clip_l' + 'clip_g' (SDXL, also 'clip_h' "
    "alone; SD3 adds 't5xxl', Flux is 'clip_l' + 't5xxl', also written 't5'); one '<token>' tensor [d] or [k, d] (diffusers learned_embeds); A1111 .pt with "
    "'string_to_param'"
)


# ---------------------------------------------------------------------------------------------
# Saving embeddings
# ---------------------------------------------------------------------------------------------


def _library_version() -> str:
    package = sys.modules.get(__package__ or "")
    return str(getattr(package, "__version__", "0"))


def _embedding_path(path: str | os.PathLike, fmt: str) -> Path:
    p = Path(path)
    if fmt == "diffusers" and p.is_dir():
        return p / DIFFUSERS_FILENAME
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return p
    if suffix in _PICKLE_SUFFIXES:
        raise ValueError(
            f"save path {p}: embeddings are written as safetensors only (pickle files can carry "
            "code); use a name ending in .safetensors, which ComfyUI, A1111 and diffusers all load"
        )
    # No or another suffix (names may contain dots, e.g. "cat.v2"): loaders look for .safetensors.
    return p.with_name(p.name + ".safetensors")


def _check_vectors(emb: LearnedEmbedding) -> None:
    counts = {}
    for key, v in emb.vectors.items():
        if not isinstance(v, torch.Tensor) or v.ndim != 2 or not v.is_floating_point():
            raise ValueError(
                f"embedding {emb.name!r}: vectors[{key!r}] must be a float tensor [k, d], got "
                f"{getattr(v, 'shape', type(v).__name__)}"
            )
        if not torch.isfinite(v).all():
            raise ValueError(
                f"embedding {emb.name!r}: vectors[{key!r}] contain NaN or inf (training diverged); "
                "save an earlier checkpoint or lower the learning rate"
            )
        counts[key] = v.shape[0]
    if len(set(counts.values())) != 1:
        raise ValueError(
            f"embedding {emb.name!r}: every encoder needs the same number of vectors k, got "
            + ", ".join(f"{k}={n}" for k, n in counts.items())
        )
    if 0 in counts.values():
        raise ValueError(f"embedding {emb.name!r} has k = 0 vectors; use at least one")


def _resolve_format(emb: LearnedEmbedding, fmt: str) -> str:
    keys = emb.keys
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not known; use one of {', '.join(FORMATS)}")
    if fmt == "auto":
        if sorted(keys) == sorted(SDXL_KEYS):
            return "sdxl"
        if len(keys) == 1:
            return "single"
        if sorted(keys) in (sorted(k) for k in FLOW_KEY_SETS):
            return "keyed"
        raise ValueError(
            f"format 'auto': no standard file layout holds encoders {', '.join(keys)}; embeddings are saved for "
            "one encoder ('single'), clip_l + clip_g ('sdxl'), or SD3's / Flux's encoders ('keyed')"
        )
    if fmt in ("single", "diffusers") and len(keys) != 1:
        raise ValueError(
            f"format {fmt!r} holds one encoder but embedding {emb.name!r} has {', '.join(keys)}; "
            "use format='sdxl' for clip_l + clip_g, 'keyed' (or 'auto') for any set of encoders"
        )
    if fmt == "sdxl" and sorted(keys) != sorted(SDXL_KEYS):
        raise ValueError(
            f"format 'sdxl' needs exactly the encoders clip_l and clip_g, embedding {emb.name!r} has "
            f"{', '.join(keys)}; use format='single' (or 'auto') for one encoder"
        )
    return fmt


def save_embedding(
    emb: LearnedEmbedding,
    path: str | os.PathLike,
    *,
    format: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Save ``emb`` as a safetensors file in one of the layouts other UIs load; return its path.

    ``format``: "single" (``emb_params``: ComfyUI, A1111/Forge, InvokeAI, kohya), "sdxl"
    (``clip_l`` + ``clip_g``: ComfyUI, A1111/Forge, InvokeAI, kohya SDXL), "diffusers"
    (``{placeholder: [k, d]}``: diffusers ``load_textual_inversion``; also ComfyUI, A1111), or
    "auto" ("sdxl" for clip_l + clip_g, else "single" for one encoder). A path without the
    ``.safetensors`` suffix gets it; with "diffusers", an existing folder receives
    ``learned_embeds.safetensors``. Vectors are stored float32. The header holds the embedding's
    metadata plus name, placeholder, format, encoder_keys, num_vectors and inversion_version
    (these win over metadata entries of the same name).
    """
    fmt = _resolve_format(emb, format)
    _check_vectors(emb)
    vectors = {k: v.detach().to("cpu", torch.float32) for k, v in emb.vectors.items()}
    if fmt == "single":
        tensors = {"emb_params": next(iter(vectors.values()))}
    elif fmt == "sdxl":
        tensors = {k: vectors[k] for k in SDXL_KEYS}
    elif fmt == "keyed":
        tensors = dict(vectors)
    else:
        token = emb.placeholder
        if token == "emb_params" or token in ENCODER_KEYS:
            raise ValueError(
                f"format 'diffusers': placeholder {token!r} would be read back as another layout; "
                "choose a placeholder such as '<name>'"
            )
        tensors = {token: next(iter(vectors.values()))}
    header = dict(emb.metadata)
    header.update(
        name=emb.name,
        placeholder=emb.placeholder,
        format=fmt,
        encoder_keys=",".join(emb.keys),
        num_vectors=str(emb.num_vectors),
        inversion_version=_library_version(),
    )
    return atomic_save_safetensors(tensors, _embedding_path(path, fmt), header, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# Loading embeddings
# ---------------------------------------------------------------------------------------------


@dataclass
class _Parsed:
    layout: str  # single | sdxl | diffusers | a1111
    tensors: dict[str, Any]  # encoder key -> tensor for "sdxl"; {"": tensor} otherwise
    token: str | None = None  # the token a diffusers file is keyed by
    info: dict[str, str] = field(default_factory=dict)  # extra metadata (A1111 fields)


def _read(path: Path) -> tuple[Any, dict[str, str]]:
    """The file's raw object (a dict of tensors, an A1111 dict, ...) and its header metadata."""
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix in _PICKLE_SUFFIXES:
        return torch_load_safely(path), {}
    raise ValueError(
        f"{path}: unsupported file type {suffix or '(none)'!r}; use .safetensors (or .pt/.bin/.ckpt for "
        "A1111 and diffusers files)"
    )


def _classify(obj: Any, path: Path) -> _Parsed:
    if isinstance(obj, torch.Tensor):
        return _Parsed("single", {"": obj})
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not an embedding; supported layouts: {_SUPPORTED_LAYOUTS}")
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        if isinstance(params, Mapping) and params:
            value = params["*"] if "*" in params else next(iter(params.values()))
        else:
            value = params
        info = {}
        for src, dst in (("name", "a1111_name"), ("step", "step"), ("sd_checkpoint", "sd_checkpoint"),
                         ("sd_checkpoint_name", "sd_checkpoint_name")):
            if obj.get(src) is not None:
                info[dst] = str(obj[src])
        return _Parsed("a1111", {"": value}, info=info)
    keys = [str(k) for k in obj]
    if keys and set(KEY_ALIASES.get(k, k) for k in keys) <= set(ENCODER_KEYS) and len(set(
            KEY_ALIASES.get(k, k) for k in keys)) == len(keys):
        return _Parsed("sdxl", {KEY_ALIASES.get(str(k), str(k)): v for k, v in obj.items()})
    if keys == ["emb_params"]:
        return _Parsed("single", {"": obj["emb_params"]})
    if len(keys) == 1 and isinstance(next(iter(obj.values())), torch.Tensor):
        return _Parsed("diffusers", {"": next(iter(obj.values()))}, token=keys[0])
    shown = ", ".join(repr(k) for k in keys[:20]) + (f", ... ({len(keys)} keys)" if len(keys) > 20 else "")
    raise ValueError(
        f"{path}: unrecognised embedding layout, keys found: [{shown}]. Supported layouts: "
        f"{_SUPPORTED_LAYOUTS}. Re-export the embedding in one of them"
    )


def _as_vectors(t: Any, what: str, path: Path) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{path}: {what} is a {type(t).__name__}, not a tensor; supported layouts: {_SUPPORTED_LAYOUTS}")
    if not t.is_floating_point():
        raise ValueError(f"{path}: {what} has dtype {t.dtype}; embedding vectors must be floating point")
    t = t.detach()
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2:
        raise ValueError(
            f"{path}: {what} has shape {tuple(t.shape)}; an embedding is a 2-D tensor [k, d] (k vectors "
            "of width d) or a single vector [d]; re-export it as [k, d]"
        )
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{path}: {what} has shape {tuple(t.shape)}, i.e. 0 vectors; the file is empty or corrupt")
    if not torch.isfinite(t).all():
        raise ValueError(f"{path}: {what} contains NaN or inf values; the file is corrupt")
    return t.to("cpu", torch.float32).contiguous().clone()


def _sanitise_name(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.\-]+", "_", text.strip())
    s = re.sub(r"_+", "_", s).strip("_.-")[:128].rstrip("_.-")
    if s.lower().endswith(".state"):  # a name validate_name refuses (training-state files' suffix)
        s = s[: -len(".state")].rstrip("_.-")
    return s or "embedding"


def _resolve_key(width: int, header: Mapping[str, str], encoder_key: str | None, notes: dict[str, str]) -> str:
    stored = [k.strip() for k in header.get("encoder_keys", "").split(",") if k.strip()]
    if len(stored) == 1:
        return stored[0]
    if encoder_key:
        return encoder_key
    if width in WIDTH_TO_KEY:
        return WIDTH_TO_KEY[width]
    notes["encoder_key_note"] = (
        f"width {width} is not a standard CLIP width (768, 1024, 1280); assumed clip_l; pass encoder_key= to choose"
    )
    return "clip_l"


def detect_format(path: str | os.PathLike) -> str:
    """The layout of an embedding file: "single", "sdxl" (per-encoder keys), "diffusers" or "a1111"."""
    path = Path(path)
    obj, _ = _read(path)
    return _classify(obj, path).layout


def load_embedding(
    path: str | os.PathLike,
    *,
    name: str | None = None,
    encoder_key: str | None = None,
    name_from_file: bool = False,
) -> LearnedEmbedding:
    """Read an embedding file written by this library, ComfyUI/A1111/kohya, InvokeAI or diffusers.

    For a one-tensor file the encoder key comes from the header's ``encoder_keys``, else
    ``encoder_key``, else the width (768 clip_l, 1024 clip_h, 1280 clip_g; other widths: clip_l,
    noted in the metadata). The name is ``name``, else the header's, else the file stem made into a
    valid name (a diffusers ``learned_embeds`` file uses its token instead); ``name_from_file``
    skips the header's name, so renamed copies of one file load as different words (a replaced
    header name is kept as ``metadata["stored_name"]``). The placeholder is the header's (unless it
    was ``<stored name>`` and the name changed), else a diffusers file's token, else ``<name>``.
    Vectors come back float32 [k, d].
    Pickle files are opened with ``torch.load(weights_only=True)`` only; a file that needs more is
    refused with ``ValueError`` and nothing in it runs.
    """
    path = Path(path)
    obj, header = _read(path)
    parsed = _classify(obj, path)
    notes: dict[str, str] = {}
    if parsed.layout == "sdxl":
        # safetensors sorts keys; restore the saved order, else the canonical clip_l, clip_h, clip_g.
        stored = [k.strip() for k in header.get("encoder_keys", "").split(",")]
        order = stored if sorted(stored) == sorted(parsed.tensors) else ENCODER_KEYS
        keys = sorted(parsed.tensors, key=order.index)
        vectors = {k: _as_vectors(parsed.tensors[k], f"tensor {k!r}", path) for k in keys}
    else:
        what = {"single": "the embedding tensor", "a1111": "string_to_param", "diffusers": f"tensor {parsed.token!r}"}
        t = _as_vectors(parsed.tensors[""], what[parsed.layout], path)
        vectors = {_resolve_key(t.shape[1], header, encoder_key, notes): t}
    counts = {k: v.shape[0] for k, v in vectors.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(
            f"{path}: the encoders carry different numbers of vectors ("
            + ", ".join(f"{k}={n}" for k, n in counts.items())
            + "); every encoder must have the same k; re-export the file with matching k"
        )
    stored_k = header.get("num_vectors")
    if stored_k is not None and stored_k.strip().isdigit() and int(stored_k) != next(iter(counts.values())):
        raise ValueError(f"{path}: header says {stored_k} vectors but the tensors hold {next(iter(counts.values()))}; the file is corrupt")

    if name is not None:
        final_name = validate_name(name)
    elif header.get("name") and not name_from_file:
        final_name = _sanitise_name(header["name"])
    elif parsed.layout == "diffusers" and path.stem == Path(DIFFUSERS_FILENAME).stem and parsed.token:
        final_name = _sanitise_name(parsed.token)
    else:
        final_name = _sanitise_name(path.stem)
    placeholder = header.get("placeholder") or parsed.token or ""
    stored = header.get("name", "")
    if stored and stored != final_name:
        notes["stored_name"] = stored
        if placeholder == f"<{stored}>":  # the default placeholder of the old name follows the new one
            placeholder = ""
    metadata = {k: v for k, v in header.items() if k not in _STRUCTURAL_KEYS}
    metadata.update(parsed.info)
    metadata.update(notes)
    return LearnedEmbedding(final_name, vectors, placeholder=placeholder, metadata=metadata)
