"""Initial vectors for a new concept.

- ``from_text``: one vector per token of a text, copied from each encoder's token table: the
  multi-token initialisation of *An Image is Worth One Sentence* (seeds/001), where the text is a
  caption or class label of the concept image and k = its number of tokens;
- ``from_word``: one word's token row repeated k times (vanilla TI's "initializer token");
- ``random_init``: random directions scaled to the vocabulary's mean norm;
- ``word_rows``: which rows of a text's init stand for a given word (DTI's class-word rows).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..embedding import LearnedEmbedding
from ..host import TextEncoder

__all__ = ["from_text", "from_word", "random_init", "vocab_mean_norm", "make_embedding", "text_tokens",
           "word_rows"]


def _encoders(text_side_or_encoders) -> Sequence[TextEncoder]:
    if hasattr(text_side_or_encoders, "encoders"):
        return list(text_side_or_encoders.encoders)
    if hasattr(text_side_or_encoders, "token_table"):
        return [text_side_or_encoders]
    return list(text_side_or_encoders)


def text_tokens(encoder: TextEncoder, text: str) -> list[int]:
    ids = encoder.tokenize(text)
    if not ids:
        raise ValueError(f"init text {text!r} has no tokens; give a word or a caption such as 'a red toy car'")
    return ids


def from_text(text_side, text: str, max_vectors: int = 74) -> dict[str, torch.Tensor]:
    """One vector per token of ``text`` (seeds/001, "Supreme Initialization"), per encoder.

    k is the number of tokens of the first encoder (a CLIP). An encoder whose tokenizer splits the
    text into another number of pieces (T5's sentencepiece beside CLIP's BPE, in SD3 and Flux) gets
    the mean of its pieces' rows k times, as ``from_word`` does for a word of several tokens: every
    encoder then holds k vectors, which the file formats require.
    """
    out: dict[str, torch.Tensor] = {}
    for enc in _encoders(text_side):
        ids = text_tokens(enc, text)
        if len(ids) > max_vectors:
            raise ValueError(f"init text {text!r} is {len(ids)} tokens, more than the {max_vectors} that "
                             "fit in a prompt; shorten it")
        table = enc.token_table()
        out[enc.key] = table.detach()[torch.tensor(ids, device=table.device)].float().cpu().clone()
    k = next(iter(out.values())).shape[0]
    return {key: v if v.shape[0] == k else v.mean(dim=0, keepdim=True).repeat(k, 1) for key, v in out.items()}


def word_rows(encoder: TextEncoder, text: str, word: str) -> list[int]:
    """Positions of ``word``'s token sequence inside ``text``'s tokens (every occurrence, in order).

    With ``from_text`` the init's row i is token i of the text, so these are the rows that stand
    for the word: "a red toy" and "toy" give [2]; a word the text does not contain gives []."""
    ids, sub = encoder.tokenize(text), encoder.tokenize(word)
    if not sub:
        return []
    n = len(sub)
    return [j for i in range(len(ids) - n + 1) if ids[i:i + n] == sub for j in range(i, i + n)]


def from_word(text_side, word: str, k: int = 1) -> dict[str, torch.Tensor]:
    """The row(s) of ``word`` repeated to k vectors: a one-token word gives k copies of its row;
    a multi-token word is averaged first (so every vector starts at the word's meaning)."""
    if k < 1:
        raise ValueError(f"number of vectors k must be >= 1, got {k}; use at least one vector per concept")
    out = {}
    for key, rows in from_text(text_side, word).items():
        out[key] = rows.mean(dim=0, keepdim=True).repeat(k, 1)
    return out


def vocab_mean_norm(encoder: TextEncoder) -> float:
    """Mean Euclidean norm of the token table's rows (DTI's m*, seeds/002)."""
    return float(encoder.token_table().detach().float().norm(dim=-1).mean())


def random_init(text_side, k: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """k random directions, each scaled to the vocabulary's mean norm."""
    if k < 1:
        raise ValueError(f"number of vectors k must be >= 1, got {k}; use at least one vector per concept")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for enc in _encoders(text_side):
        v = torch.randn(k, enc.width, generator=g)
        out[enc.key] = v / v.norm(dim=-1, keepdim=True) * vocab_mean_norm(enc)
    return out


def make_embedding(text_side, name: str, *, init_text: str | None = None, init_word: str | None = None,
                   k: int = 1, seed: int = 0, placeholder: str | None = None, **metadata) -> LearnedEmbedding:
    """A new ``LearnedEmbedding`` initialised from a text (k = its tokens), a word (k copies) or at random."""
    if init_text and init_word:
        raise ValueError("give init_text (one vector per token) or init_word (k copies), not both")
    if init_text:
        vectors, mode = from_text(text_side, init_text), "text"
    elif init_word:
        vectors, mode = from_word(text_side, init_word, k), "word"
    else:
        vectors, mode = random_init(text_side, k, seed), "random"
    meta = {"init": mode, "init_text": init_text or init_word or ""}
    meta.update({k_: str(v) for k_, v in metadata.items()})
    return LearnedEmbedding(name, vectors, placeholder or f"<{name}>", meta)
