"""Use an in-memory ``LearnedEmbedding`` in ComfyUI prompts without writing a file.

``clip_with_embedding`` returns a new CLIP whose tokenizers resolve ``embedding:<trigger>`` (and the
bare trigger word) to the learned vectors, the "tokenizer override" route of
../shared/COMFYUI_NOTES.md section 3: ``CLIP.clone()`` shares the tokenizer object, so the
tokenizer and each of its sub-tokenizers (clip_l/clip_h/clip_g) are shallow-copied and given their
own ``_try_get_embedding``. The standard CLIPTextEncode then splices the vectors exactly as it
splices an embedding file (same code path, identical conditioning), and because the output is a
new CLIP object ComfyUI's cache re-runs the encoders downstream whenever the embedding changes.
Applying several embeddings chains: each copy keeps the triggers of the CLIP it came from.
"""

from __future__ import annotations

import copy
import re

import torch

import comfy.sd1_clip

from ..inversion.embedding import LearnedEmbedding, validate_name
from .comfy_host import encoder_keys, is_sd3_clip

__all__ = ["clip_with_embedding", "check_embedding_fits", "embedding_family", "for_clip", "GUESSED_KEY"]

_TRIGGERS = "_inversion_triggers"  # attribute on a sub-tokenizer copy: {trigger: (tensor, strength)}
_IDENTIFIER = "embedding:"
_TRAILING = ",.;:!?"


def embedding_family(keys) -> str:
    keys = set(keys)
    if keys == {"clip_l", "clip_g"}:
        return "SDXL"
    if keys == {"clip_l", "clip_g", "t5xxl"}:
        return "SD3"
    if keys == {"clip_l", "t5xxl"}:
        return "Flux"
    if keys == {"clip_h"}:
        return "SD2.x"
    if keys == {"clip_l"}:
        return "SD1.x"
    return "+".join(sorted(keys))


def check_embedding_fits(clip, emb: LearnedEmbedding, what: str = "embedding") -> dict[str, int]:
    """Raise a ValueError a user can act on unless ``emb`` has exactly the CLIP's encoders and widths."""
    keys = encoder_keys(clip)
    widths = {k: int(getattr(clip.cond_stage_model, k).transformer.get_input_embeddings().weight.shape[1])
              for k in keys}
    # An SD3 embedding's T5 rows go unused on an SD3 CLIP loaded without T5 (a checkpoint without it).
    unused_t5 = is_sd3_clip(clip) and "t5xxl" not in keys and set(emb.keys) == set(keys) | {"t5xxl"}
    if set(emb.keys) != set(keys) and not unused_t5:
        raise ValueError(
            f"{what} {emb.name!r} was learned for {embedding_family(emb.keys)} ({', '.join(emb.keys)}) but this "
            f"CLIP is {embedding_family(keys)} ({', '.join(keys)}); wire the CLIP of the model family it was "
            "trained on, or train it again on this model"
        )
    bad = {k: (emb.vectors[k].shape[1], w) for k, w in widths.items() if emb.vectors[k].shape[1] != w}
    if bad:
        raise ValueError(
            f"{what} {emb.name!r}: vector width mismatch "
            + ", ".join(f"{k} has {a} but the CLIP expects {b}" for k, (a, b) in bad.items())
            + "; the embedding belongs to a different model"
        )
    return widths


GUESSED_KEY = "encoder_key_note"  # formats' note: a one-tensor file's encoder guessed from a non-standard width


def for_clip(clip, emb: LearnedEmbedding) -> LearnedEmbedding:
    """``emb`` on this CLIP's only encoder when its one tensor's encoder was a guess (``GUESSED_KEY``: a width no
    standard CLIP has), as reading it with ``encoder_key=`` that encoder would give; otherwise ``emb`` itself."""
    keys = encoder_keys(clip)
    if GUESSED_KEY not in emb.metadata or len(keys) != 1 or len(emb.keys) != 1:
        return emb
    meta = {k: v for k, v in emb.metadata.items() if k != GUESSED_KEY}
    return LearnedEmbedding(emb.name, {keys[0]: next(iter(emb.vectors.values()))}, emb.placeholder, meta)


def _is_vocabulary_word(sub, word: str) -> bool:
    vocab = sub.tokenizer.get_vocab()
    return f"{word.lower()}</w>" in vocab


def _split_name(text: str) -> tuple[str, str]:
    parts = text.split()
    return (parts[0] if parts else ""), " ".join(parts[1:])


_ARITY: dict[type, int] = {}  # per tokenizer class: how many values its _try_get_embedding returns


def _lookup_arity(cls) -> int:
    """How many values ``cls._try_get_embedding`` returns, found by asking it once about a name that
    cannot exist (no folders to look in): 2, ``(embed, leftover)``, up to ComfyUI v0.27; 3,
    ``(embed, name, leftover)``, from v0.28, whose tokenizer unpacks the cleaned name too."""
    if cls not in _ARITY:
        probe = object.__new__(cls)
        probe.embedding_directory, probe.embedding_size, probe.embedding_key = [], 0, ""
        _ARITY[cls] = len(cls._try_get_embedding(probe, "inversion-arity-probe"))
    return _ARITY[cls]


def _try_get_embedding(self, embedding_name: str):
    """Learned vectors for a registered trigger (trailing punctuation kept as text), else the file route;
    in the shape this ComfyUI's tokenizer unpacks (``_lookup_arity``)."""
    name, leftover = _split_name(embedding_name)
    stripped = name.rstrip(_TRAILING)
    entry = getattr(self, _TRIGGERS, {}).get(stripped)
    if entry is None:
        return type(self)._try_get_embedding(self, embedding_name)
    rest = name[len(stripped):]
    leftover = f"{rest} {leftover}".strip() if rest else leftover
    return (entry[0], leftover) if _lookup_arity(type(self)) == 2 else (entry[0], stripped, leftover)


def _tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
    """Bare trigger words become ``embedding:<trigger>``; the strength multiplies their token weights."""
    triggers = getattr(self, _TRIGGERS, {})
    for trigger in triggers:
        pattern = r"(?<![\w:.\-])" + re.escape(trigger) + r"(?![\w\-]|\.\w)"
        text = re.sub(pattern, " " + _IDENTIFIER + trigger, text)
    out = type(self).tokenize_with_weights(self, text, return_word_ids, **kwargs)
    scaled = {id(t): s for t, s in triggers.values() if s != 1.0}
    if not scaled:
        return out
    result = []
    for batch in out:
        row = []
        for item in batch:
            t = item[0]
            if torch.is_tensor(t) and (id(t) in scaled or id(t._base) in scaled):
                s = scaled.get(id(t), scaled.get(id(t._base)))
                item = (t, item[1] * s) + tuple(item[2:])
            row.append(item)
        result.append(row)
    return result


def clip_with_embedding(clip, emb: LearnedEmbedding, trigger: str | None = None, strength: float = 1.0):
    """A new CLIP whose prompts understand ``trigger`` (default: the embedding's name).

    ``embedding:<trigger>`` and the bare word both resolve to the learned vectors; ``strength``
    is a prompt weight on those tokens, the same as writing ``(embedding:<trigger>:strength)``.
    """
    trigger = validate_name(trigger.strip() if trigger and trigger.strip() else emb.name)
    if not (isinstance(strength, (int, float)) and -10.0 <= float(strength) <= 10.0):
        raise ValueError(f"strength must be a number in [-10, 10], got {strength!r}")
    check_embedding_fits(clip, emb)
    keys = encoder_keys(clip)
    out = clip.clone()
    out.tokenizer = copy.copy(clip.tokenizer)  # CLIP.clone() shares the tokenizer object
    found = 0
    for attr, sub in list(vars(out.tokenizer).items()):
        if not isinstance(sub, comfy.sd1_clip.SDTokenizer):
            continue
        key = sub.embedding_key
        if key not in emb.vectors or key not in keys:  # SD3's tokenizer has a T5 part even when its CLIP has no T5
            continue
        if _is_vocabulary_word(sub, trigger):
            raise ValueError(
                f"trigger word {trigger!r} is already a word CLIP knows, so ordinary prompts would turn into "
                f"the embedding; pick a made-up word such as 'xq{trigger}'"
            )
        new = copy.copy(sub)
        triggers = dict(getattr(sub, _TRIGGERS, {}))
        vectors = emb.vectors[key].detach().to("cpu", torch.float32).clone()
        triggers[trigger] = (vectors, float(strength))
        setattr(new, _TRIGGERS, triggers)
        if new.embedding_directory is None:
            new.embedding_directory = []  # the tokenizer only looks for "embedding:" when this is set
        new._try_get_embedding = _try_get_embedding.__get__(new)
        new.tokenize_with_weights = _tokenize_with_weights.__get__(new)
        setattr(out.tokenizer, attr, new)
        found += 1
    if found != len(keys):
        raise ValueError(f"clip: could not find a tokenizer for every text encoder {keys}")
    return out
