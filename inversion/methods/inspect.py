"""What a learned embedding has become: each vector against the vocabulary it lives among.

Per vector and per text encoder (``inspect_embedding``):

- its norm against the distribution of the token table's row norms (min, 5 %, median, 95 %, max)
  and its percentile in it: a vector far above the largest word's norm drowns out the rest of a
  prompt, which is why DTI fixes the norm at the vocabulary's (seeds/002);
- its cosine to the vector it started from, when that is known (``initial_vectors`` recomputes it
  from the ``init_text`` the pack's files carry, as ``inversion.methods.init`` made it);
- its nearest vocabulary tokens by cosine, decoded to words: what the concept "reads as";
- its drift across a run's earlier snapshots (``load_snapshots``): cosine to the final vector and
  norm at each saved step.

The caller hands in each encoder's token table and a ``decode(ids) -> words`` (``Vocabulary``;
``hf_decoder`` makes one from a transformers ``CLIPTokenizer``), so no UI is imported here.
``format_report`` writes the readable report, ``VectorReport.chart_row`` the data
``inversion.charts.inspect_chart`` draws.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from . import init as init_vectors
from ..files.checkpoint import load_state, read_state_meta
from ..embedding import LearnedEmbedding
from ..files.formats import load_embedding

__all__ = [
    "QUANTILES",
    "Vocabulary",
    "NormStats",
    "Neighbour",
    "DriftPoint",
    "Snapshot",
    "VectorReport",
    "hf_decoder",
    "norm_stats",
    "initial_vectors",
    "load_snapshots",
    "inspect_embedding",
    "format_report",
]

# The quantiles of the vocabulary's norms a report shows: the whole range and the bulk of the words.
QUANTILES = (("min", 0.0), ("5%", 0.05), ("median", 0.5), ("95%", 0.95), ("max", 1.0))
_SNAPSHOT_RE = re.compile(r"^step-(\d+)\.safetensors$")
_END_OF_WORD = "</w>"
_CHUNK = 8192  # token-table rows per step: bounded memory for the largest vocabularies


@dataclass(frozen=True)
class Vocabulary:
    """One text encoder's vocabulary: its key, token table [V, d] and ``decode(ids) -> words``."""

    key: str
    table: torch.Tensor
    decode: Callable[[Sequence[int]], list[str]]


@dataclass(frozen=True)
class NormStats:
    """The token table's row norms: ``quantiles`` (label -> value, labels as in ``QUANTILES``) over ``count`` rows."""

    quantiles: dict[str, float]
    count: int

    @property
    def band(self) -> list[float]:
        return [self.quantiles[label] for label, _ in QUANTILES]


@dataclass(frozen=True)
class Neighbour:
    token_id: int
    word: str
    cosine: float


@dataclass(frozen=True)
class DriftPoint:
    """A snapshot of the vector at ``step``: its cosine to the final vector and its norm."""

    step: int
    cosine_to_final: float
    norm: float


@dataclass(frozen=True)
class Snapshot:
    """A run's vectors at ``step`` ({encoder key: [k, d]}), read from ``source``."""

    step: int
    vectors: dict[str, torch.Tensor]
    source: str = ""


@dataclass(frozen=True)
class VectorReport:
    """Vector ``index`` of encoder ``encoder``, seen against its vocabulary."""

    encoder: str
    index: int
    width: int
    norm: float
    percentile: float  # % of the vocabulary's rows whose norm is <= this vector's
    vocab: NormStats
    cosine_to_initial: float | None  # None: the initial vector is not known
    neighbours: tuple[Neighbour, ...]
    drift: tuple[DriftPoint, ...] = field(default=())

    @property
    def label(self) -> str:
        return f"{self.encoder} v{self.index}"

    def chart_row(self) -> dict:
        """The plain data ``inversion.charts.inspect_chart`` draws for this vector."""
        return {
            "label": self.label,
            "norm": self.norm,
            "percentile": self.percentile,
            "band": self.vocab.band,
            "drift_step": [p.step for p in self.drift],
            "drift_cosine": [p.cosine_to_final for p in self.drift],
        }


# --------------------------------------------------------------------------- words from token ids

def _byte_decoder() -> dict[str, int]:
    """The inverse of CLIP's (GPT-2's) byte-to-unicode table: BPE symbols back to bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTES = _byte_decoder()


def _symbol_text(symbols: str) -> str:
    if symbols.startswith("<|") and symbols.endswith("|>"):  # special tokens stay as they are
        return symbols
    try:
        return bytes(_BYTES[c] for c in symbols).decode("utf-8", errors="replace")
    except KeyError:  # a tokenizer with another symbol table: show its symbols
        return symbols


def hf_decoder(tokenizer) -> Callable[[Sequence[int]], list[str]]:
    """``decode(ids) -> words`` for a transformers CLIP tokenizer (slow or fast).

    A token that ends a word (CLIP's ``</w>`` marker) is the word itself; a piece that continues
    into the next token gets a trailing "-" ("dog" is the word, "dog-" the start of "doggy"), so the
    two rows CLIP has for many words stay apart in a report.
    """
    def decode(ids: Sequence[int]) -> list[str]:
        out = []
        for tok in tokenizer.convert_ids_to_tokens([int(i) for i in ids]):
            tok = str(tok)
            if tok.endswith(_END_OF_WORD):
                out.append(_symbol_text(tok[: -len(_END_OF_WORD)]))
            elif tok.startswith("<|") and tok.endswith("|>"):
                out.append(tok)
            else:
                out.append(_symbol_text(tok) + "-")
        return out

    return decode


# --------------------------------------------------------------------------- the measurements

def norm_stats(table: torch.Tensor) -> tuple[NormStats, torch.Tensor]:
    """The quantiles of the token table's row norms, and the norms themselves ([V], float64, CPU)."""
    norms = torch.cat([chunk.double().norm(dim=-1).cpu() for chunk in table.detach().split(_CHUNK)])
    q = torch.quantile(norms, torch.tensor([p for _, p in QUANTILES], dtype=torch.float64))
    return NormStats({label: float(v) for (label, _), v in zip(QUANTILES, q)}, int(norms.numel())), norms


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _table_cosines(table: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """[V, k] cosines of every token row to every vector, in chunks: the table stays where it lives (a GPU,
    fp16 on some) and no full-size float copy of it is made (SDXL's clip_g table is 49408 x 1280)."""
    unit = _unit(vectors.double()).to(table.device, torch.float32)
    return torch.cat([_unit(chunk.float()) @ unit.T for chunk in table.split(_CHUNK)])


def _cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Row-wise cosine of two [k, d] tensors."""
    return [float(c) for c in (_unit(a.double()) * _unit(b.double())).sum(dim=-1)]


def initial_vectors(emb: LearnedEmbedding, text_side) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The vectors ``emb`` started from, recomputed from its ``init_text`` with ``text_side``'s tables.

    Returns (vectors, how): vectors is None when they cannot be known (no init text, a random
    start, a text that does not tokenise to the embedding's k vectors); ``how`` says which.
    The pack's files record ``init`` ("word": ``init.from_word``, k copies; else ``init.from_text``,
    one vector per token) and ``init_text``.
    """
    text = emb.metadata.get("init_text", "").strip()
    mode = emb.metadata.get("init", "").strip()
    if mode == "random":
        return None, "unknown (random start)"
    if not text:
        return None, "unknown (the file records no init_text)"
    try:
        if mode == "word":
            vectors = init_vectors.from_word(text_side, text, emb.num_vectors)
        else:
            vectors = init_vectors.from_text(text_side, text)
    except ValueError as e:
        return None, f"unknown (init text {text!r}: {e})"
    k = next(iter(vectors.values())).shape[0]
    if k != emb.num_vectors or set(vectors) != set(emb.vectors):
        return None, (f"unknown (init text {text!r} gives {k} vector(s) for {', '.join(vectors)}; the embedding has "
                      f"{emb.num_vectors} for {', '.join(emb.vectors)}: trained on another model?)")
    return vectors, f"recomputed from init text {text!r}"


def _state_vectors(path: Path, name: str | None) -> tuple[int, dict[str, torch.Tensor]]:
    """A training state's step and the rows of concept ``name`` (a run may train several concepts)."""
    meta = read_state_meta(path) or {}
    state = load_state(path)
    vectors = state.vectors
    try:
        concepts = json.loads(meta.get("concepts", "[]"))
    except ValueError:
        concepts = []
    if len(concepts) > 1 and name is not None:
        start = 0
        for c in concepts:
            k = int(c.get("k", 0))
            if c.get("name") == name:
                vectors = {key: v[start:start + k] for key, v in vectors.items()}
                break
            start += k
    return state.step, vectors


def load_snapshots(folder: str | os.PathLike, name: str | None = None) -> tuple[list[Snapshot], list[str]]:
    """A training run's earlier vectors, sorted by step, and notes on the files that could not be read.

    ``folder`` is the run's folder (the ComfyUI pack's ``models/inversion_runs/<name>/``). Read:
    ``snapshots/step-<step>.safetensors`` (embedding files, or training states), ``state.safetensors``
    (the run's latest vectors, ``vec.<encoder>``) and ``<name>.safetensors`` (an unfinished run's
    embedding, its step from the ``steps`` metadata). Two files of the same step count once, the
    snapshot first. A missing folder gives no snapshots.
    """
    root = Path(folder)
    found: dict[int, Snapshot] = {}
    notes: list[str] = []

    def add(path: Path, read: Callable[[Path], tuple[int | None, dict[str, torch.Tensor]]], step: int | None) -> None:
        try:
            got, vectors = read(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            notes.append(f"{path.name}: not read ({e})")
            return
        step = got if step is None else step
        if step is None:
            notes.append(f"{path.name}: skipped (it records no step)")
            return
        if step not in found:
            found[step] = Snapshot(int(step), {k: v.detach().float().cpu() for k, v in vectors.items()},
                                   path.relative_to(root).as_posix())

    def embedding_or_state(path: Path) -> tuple[int | None, dict[str, torch.Tensor]]:
        if read_state_meta(path) is not None:
            return _state_vectors(path, name)
        emb = load_embedding(path)
        steps = emb.metadata.get("steps", "").strip()
        return (int(steps) if steps.isdigit() else None), emb.vectors

    snapshots = root / "snapshots"
    if snapshots.is_dir():
        for path in sorted(snapshots.iterdir()):
            m = _SNAPSHOT_RE.match(path.name)
            if m and path.is_file():
                add(path, embedding_or_state, int(m.group(1)))
    state = root / "state.safetensors"
    if state.is_file():
        add(state, lambda p: _state_vectors(p, name), None)
    if name:
        unfinished = root / f"{name}.safetensors"
        if unfinished.is_file():
            add(unfinished, embedding_or_state, None)
    return [found[s] for s in sorted(found)], notes


def inspect_embedding(emb: LearnedEmbedding, encoders: Sequence[Vocabulary] | Mapping[str, Vocabulary],
                      initial: Mapping[str, torch.Tensor] | None = None, snapshots: Iterable[Snapshot] = (),
                      k: int = 5) -> list[VectorReport]:
    """One ``VectorReport`` per vector and encoder, in the order of ``encoders``.

    ``encoders``: the vocabulary of every encoder ``emb`` has vectors for (extra ones are ignored).
    ``initial``: {key: [k, d]} the vectors training started from, or None (cosine unknown).
    ``snapshots``: earlier vectors of the run; one whose shape differs from the embedding's is skipped.
    ``k``: how many nearest tokens to list (by cosine over the whole token table).
    """
    vocabs = list(encoders.values()) if isinstance(encoders, Mapping) else list(encoders)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"neighbours: k must be an integer >= 1, got {k!r}")
    by_key = {v.key: v for v in vocabs}
    missing = [key for key in emb.vectors if key not in by_key]
    if missing:
        raise ValueError(f"embedding {emb.name!r} has vectors for {', '.join(missing)} but no vocabulary was given "
                         f"for it (encoders: {', '.join(by_key) or 'none'}); use the CLIP it was trained on")
    snapshots = sorted(snapshots, key=lambda s: s.step)
    reports: list[VectorReport] = []
    for vocab in vocabs:
        if vocab.key not in emb.vectors:
            continue
        vectors = emb.vectors[vocab.key].detach().to("cpu", torch.float64)
        table = vocab.table.detach()
        if table.ndim != 2 or table.shape[1] != vectors.shape[1]:
            raise ValueError(f"embedding {emb.name!r}: {vocab.key} vectors are {vectors.shape[1]}-d but the token "
                             f"table is {tuple(table.shape)}; use the CLIP of the model the embedding was trained on")
        stats, norms = norm_stats(table)
        cos = _table_cosines(table, vectors)
        top = cos.topk(min(k, cos.shape[0]), dim=0)
        top_ids, top_cos = top.indices.T.cpu().tolist(), top.values.T.cpu().double().tolist()
        ids = sorted({i for row in top_ids for i in row})
        word_of = dict(zip(ids, vocab.decode(ids)))
        vnorms = vectors.norm(dim=-1)
        init_cos = None
        if initial is not None and vocab.key in initial and tuple(initial[vocab.key].shape) == tuple(vectors.shape):
            init_cos = _cosines(vectors, initial[vocab.key].detach().cpu())
        drift: list[list[DriftPoint]] = [[] for _ in range(vectors.shape[0])]
        for snap in snapshots:
            v = snap.vectors.get(vocab.key)
            if v is None or tuple(v.shape) != tuple(vectors.shape):
                continue
            v = v.detach().cpu().double()
            for j, (c, n) in enumerate(zip(_cosines(v, vectors), v.norm(dim=-1).tolist())):
                drift[j].append(DriftPoint(snap.step, c, float(n)))
        for j in range(vectors.shape[0]):
            n = float(vnorms[j])
            reports.append(VectorReport(
                encoder=vocab.key, index=j, width=int(vectors.shape[1]), norm=n,
                percentile=100.0 * float((norms <= n).double().mean()), vocab=stats,
                cosine_to_initial=None if init_cos is None else init_cos[j],
                neighbours=tuple(Neighbour(int(i), word_of[i], float(c)) for i, c in zip(top_ids[j], top_cos[j])),
                drift=tuple(drift[j]),
            ))
    return reports


# --------------------------------------------------------------------------- the report

def _num(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def _drift_text(points: Sequence[DriftPoint], shown: int = 8) -> str:
    if len(points) > shown:  # the first, the last and evenly spaced ones between; the chart has all
        idx = sorted({round(i * (len(points) - 1) / (shown - 1)) for i in range(shown)})
        pts = [points[i] for i in idx]
        more = f" ({len(pts)} of {len(points)} snapshots)"
    else:
        pts, more = list(points), ""
    return "drift (step: cos to final / norm) " + ", ".join(
        f"{p.step}: {p.cosine_to_final:.3f}/{_num(p.norm)}" for p in pts) + more


def _vector_line(r: VectorReport) -> str:
    q = r.vocab.quantiles
    where = f"p{r.percentile:.0f}"
    if r.norm > q["max"]:
        where += f", {r.norm / q['max']:.1f}x the largest token's"
    elif r.norm < q["5%"] or r.norm > q["95%"]:
        where += ", outside the vocabulary's 5-95%"
    parts = [f"  v{r.index}: norm {_num(r.norm)} ({where})",
             "cos to init " + ("unknown" if r.cosine_to_initial is None else f"{r.cosine_to_initial:.3f}"),
             "nearest " + ", ".join(f"{n.word!r} {n.cosine:.3f}" for n in r.neighbours)]
    if r.drift:
        parts.append(_drift_text(r.drift))
    return " | ".join(parts)


def format_report(reports: Sequence[VectorReport], emb: LearnedEmbedding | None = None,
                  notes: Sequence[str] = ()) -> str:
    """The readable report: a header (the embedding, then ``notes``), one block per encoder, one line per vector."""
    lines = []
    if emb is not None:
        meta = emb.metadata
        head = f"Embedding {emb.name!r}: {emb.num_vectors} vector(s) for {', '.join(emb.keys)}"
        extra = [f"{label} {meta[key]}" for key, label in (("steps", "steps"), ("method", "method"))
                 if meta.get(key)]
        lines.append(head + (f" ({', '.join(extra)})" if extra else ""))
    lines.extend(str(n) for n in notes)
    blocks: dict[str, list[VectorReport]] = {}
    for r in reports:
        blocks.setdefault(r.encoder, []).append(r)
    for key, rows in blocks.items():
        q = rows[0].vocab.quantiles
        band = "  ".join(f"{label} {_num(q[label])}" for label, _ in QUANTILES)
        lines.append("")
        lines.append(f"[{key}] {rows[0].width}-d; norms of the {rows[0].vocab.count} vocabulary tokens: {band}")
        lines.extend(_vector_line(r) for r in rows)
    return "\n".join(lines)
