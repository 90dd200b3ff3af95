"""The concepts as one table of training data: what a step draws, and its prompts encoded.

``ConceptSet`` is shared by the trainer and the profiler: every concept's latents (encoded once),
captions or templates, and masks in one table; each concept's rows of the learned-vector table;
prompts tokenised once per distinct prompt for the whole run. ``draw`` makes one micro-batch's
random choices (images, prompts, timesteps, noise) in a fixed order from a generator, and
``step_generator`` derives that generator from (seed, step) alone, so a resumed run makes exactly
the draws the uninterrupted run would have made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from .host import Conditioning, TextSide
from .prompts import build_prompt_batch

__all__ = ["ConceptSet", "Draw", "step_generator", "autocast"]

TimestepDraw = Callable[[int, torch.Generator], torch.Tensor]


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """A fresh generator per (seed, step, micro-batch): draws never depend on the run's history."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + micro) % (2**63 - 1))


def autocast(device: torch.device, dtype: str | None):
    """Mixed precision on an accelerator ("bf16" / "fp16"); a no-op on the CPU or for None."""
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype or "")
    if dt is None or device.type == "cpu":
        return torch.autocast("cpu", enabled=False)
    return torch.autocast(device.type, dtype=dt)


@dataclass
class Draw:
    """One micro-batch's random choices, on the concepts' device."""

    idx: torch.Tensor  # [B] rows of the latent table (CPU, long)
    prompts: list[str]
    t: torch.Tensor  # [B] timesteps (CPU, long: what the sampler and the history see)
    x0: torch.Tensor  # [B, C, h, w] latents
    noise: torch.Tensor  # [B, C, h, w] eps
    mask: torch.Tensor | None  # [B, 1, h, w] loss weights, or None


class ConceptSet:
    """Several concepts' data in one table; concept i owns rows ``rows[i]`` of the learned vectors."""

    def __init__(self, text: TextSide, concepts: Sequence, templates: Sequence[str],
                 device: torch.device | str | None = None):
        if not concepts:
            raise ValueError("no concepts to train: give at least one ConceptData (prepare_concept)")
        self.text = text
        self.concepts = list(concepts)
        self.templates = tuple(templates)
        self.device = torch.device(device) if device is not None else self.concepts[0].latents.device
        self._check()
        self.rows: list[range] = []
        self.placeholders: dict[str, tuple[int, int]] = {}
        offset = 0
        for c in self.concepts:
            k = c.embedding.num_vectors
            self.rows.append(range(offset, offset + k))
            self.placeholders[c.embedding.placeholder] = (offset, k)
            offset += k
        self.latents = torch.cat([c.latents for c in self.concepts]).to(self.device)
        self.owner = torch.cat([torch.full((len(c.latents),), i, dtype=torch.long)
                                for i, c in enumerate(self.concepts)])
        self.captions = [cap for c in self.concepts
                         for cap in (c.captions if c.captions is not None else [None] * len(c.latents))]
        self.masks = None
        if any(c.masks is not None for c in self.concepts):
            self.masks = torch.cat([c.masks if c.masks is not None else torch.ones_like(c.latents[:, :1])
                                    for c in self.concepts]).to(self.device)
        self._tok_cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def initial_vectors(self) -> dict[str, torch.Tensor]:
        """{encoder key: [K_total, d]}: every concept's initial vectors, in row order (float32, detached)."""
        return {e.key: torch.cat([c.embedding.vectors[e.key].float() for c in self.concepts]).to(self.device)
                .detach().clone() for e in self.text.encoders}

    def _check(self) -> None:
        widths = {e.key: e.width for e in self.text.encoders}
        seen = set()
        for c in self.concepts:
            emb = c.embedding
            if set(emb.vectors) != set(widths):
                raise ValueError(
                    f"embedding {emb.name!r} has vectors for {sorted(emb.vectors)} but the model's text "
                    f"encoders are {sorted(widths)}; initialise it from this model's CLIP "
                    "(an SDXL embedding needs clip_l and clip_g)")
            for k, v in emb.vectors.items():
                if v.shape[1] != widths[k]:
                    raise ValueError(f"embedding {emb.name!r}: {k} vectors are {v.shape[1]}-d but the encoder "
                                     f"expects {widths[k]}-d; this embedding was made for another model")
            if emb.placeholder in seen:
                raise ValueError(f"two concepts share the placeholder {emb.placeholder!r}; give each its own")
            seen.add(emb.placeholder)
            if len(c.latents) == 0:
                raise ValueError(f"concept {emb.name!r} has no images; load at least one")
        total_k = sum(c.embedding.num_vectors for c in self.concepts)
        for e in self.text.encoders:
            longest = max(len(e.tokenize(t.replace("{}", ""))) for t in self.templates)
            if longest + total_k + 2 > e.max_length:
                raise ValueError(f"{total_k} vectors plus the longest template do not fit in {e.max_length} "
                                 "tokens; use fewer vectors or shorter templates")

    # ---- drawing -----------------------------------------------------------------------------
    def prompts(self, idx: torch.Tensor, gen: torch.Generator) -> list[str]:
        """Each row's caption, or a template drawn from ``gen`` filled with its concept's placeholder."""
        tpl = torch.randint(0, len(self.templates), (len(idx),), generator=gen).tolist()
        out = []
        for i, j in zip(idx.tolist(), tpl):
            cap = self.captions[i]
            if cap is None:
                cap = self.templates[j].format(self.concepts[int(self.owner[i])].embedding.placeholder)
            out.append(cap)
        return out

    def draw(self, gen: torch.Generator, batch_size: int, timesteps: TimestepDraw) -> Draw:
        """Images, prompts, timesteps (``timesteps(n, gen)``) and noise, drawn in that order."""
        idx = torch.randint(0, len(self.latents), (batch_size,), generator=gen)
        prompts = self.prompts(idx, gen)
        t = timesteps(batch_size, gen)
        return self.draw_at(gen, idx, prompts, t)

    def draw_at(self, gen: torch.Generator, idx: torch.Tensor, prompts: list[str], t: torch.Tensor) -> Draw:
        """A draw whose images, prompts and timesteps are given; only the noise comes from ``gen``."""
        on = idx.to(self.device)
        x0 = self.latents[on]
        noise = torch.randn(x0.shape, generator=gen).to(self.device, x0.dtype)
        return Draw(idx, prompts, t, x0, noise, None if self.masks is None else self.masks[on])

    # ---- encoding ----------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], vectors: Mapping[str, torch.Tensor]) -> Conditioning:
        """Encode each distinct prompt once with ``vectors`` in the placeholders' slots; rows follow ``prompts``."""
        unique = list(dict.fromkeys(prompts))
        inverse = torch.tensor([unique.index(p) for p in prompts], device=self.device)
        outs = []
        for enc in self.text.encoders:
            ids, slots = self._tokens(enc, unique)
            outs.append(enc.encode(ids, slots, vectors[enc.key]))
        cond = self.text.combine(outs)
        return cond if len(unique) == len(prompts) else cond.index(inverse)

    def _tokens(self, enc, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and slots of ``prompts``, tokenised once per distinct prompt for the whole run."""
        missing = [p for p in prompts if (enc.key, p) not in self._tok_cache]
        if missing:
            pb = build_prompt_batch(enc, missing, self.placeholders, device=self.device)
            for i, p in enumerate(missing):
                self._tok_cache[(enc.key, p)] = (pb.ids[i], pb.slots[i])
        rows = [self._tok_cache[(enc.key, p)] for p in prompts]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
