"""The concepts as one table of training data: what a step draws, and its prompts encoded.

``ConceptSet`` is shared by the trainer and the profiler: every concept's latents (encoded once),
captions or templates, and masks in one table; each concept's rows of the learned-vector table;
prompts tokenised once per distinct prompt for the whole run. ``draw`` makes one micro-batch's
random choices (images, prompts, timesteps, noise) in a fixed order from a generator, and
``step_generator`` derives that generator from (seed, step) alone, so a resumed run makes exactly
the draws the uninterrupted run would have made.

Aspect buckets: latents of different sizes live in one table per size ("bucket"); a micro-batch
draws its first row from all rows (as with one bucket) and the rest from that row's bucket, since
a batch must share one shape. Captions: per row, None meaning a template; ``CaptionOptions``
shuffles their parts and drops them out with the step's generator. Both draw extra random numbers
only where they apply (several buckets; captions with shuffle / dropout), so a square run without
captions makes exactly the draws it always made.

Several concepts, ``balanced``: sample j of a micro-batch belongs to concept j mod N (an image of it
drawn uniformly), so a batch of b x N draws exactly b per concept whatever their image counts. It
applies when every concept's latents share one shape (one bucket); with several buckets a batch
must share one shape, so rows are drawn as without it (uniformly over all images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from ..host import Conditioning, TextSide
from .prompts import CaptionOptions, build_prompt_batch, shuffle_caption

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
                 device: torch.device | str | None = None, captions: CaptionOptions = CaptionOptions(),
                 balanced: bool = False):
        if not concepts:
            raise ValueError("no concepts to train: give at least one ConceptData (prepare_concept)")
        self.text = text
        self.concepts = list(concepts)
        self.templates = tuple(templates)
        self.caption_options = captions.validate()
        self.device = torch.device(device) if device is not None else self.concepts[0].tables()[0].device
        self._check()
        self.rows: list[range] = []
        self.placeholders: dict[str, tuple[int, int]] = {}
        offset = 0
        for c in self.concepts:
            k = c.embedding.num_vectors
            self.rows.append(range(offset, offset + k))
            self.placeholders[c.embedding.placeholder] = (offset, k)
            offset += k
        # Rows: concept by concept, each concept's buckets in its order. Each bucket (latent shape)
        # has one table; row r is row ``pos[r]`` of table ``bucket[r]``.
        shapes: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
        bucket, pos, owner = [], [], []
        any_mask = any(c.masks is not None for c in self.concepts)
        for i, c in enumerate(self.concepts):
            masks = c.mask_tables() or (None,) * len(c.tables())
            for lat, m in zip(c.tables(), masks):
                parts = shapes.setdefault(tuple(lat.shape[1:]), [])
                start = sum(len(x) for x, _ in parts)
                bucket.append(torch.full((len(lat),), list(shapes).index(tuple(lat.shape[1:])), dtype=torch.long))
                pos.append(torch.arange(start, start + len(lat)))
                owner.append(torch.full((len(lat),), i, dtype=torch.long))
                parts.append((lat, m if m is not None or not any_mask else torch.ones_like(lat[:, :1])))
        self.tables = [torch.cat([x for x, _ in parts]).to(self.device) for parts in shapes.values()]
        self.mask_tables = None if not any_mask else [torch.cat([m for _, m in parts]).to(self.device)
                                                      for parts in shapes.values()]
        self.bucket, self.pos, self.owner = torch.cat(bucket), torch.cat(pos), torch.cat(owner)
        self.bucket_rows = [(self.bucket == b).nonzero().flatten() for b in range(len(self.tables))]
        counts = torch.bincount(self.owner, minlength=len(self.concepts))
        self._concept_count = counts  # rows per concept (contiguous, concept by concept)
        self._concept_start = torch.cumsum(counts, 0) - counts
        self.balanced = bool(balanced)
        self.captions = [cap for c in self.concepts
                         for cap in (c.captions if c.captions is not None else [None] * len(c))]
        self.has_captions = any(cap is not None for cap in self.captions)
        self._tok_cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        if self.has_captions:  # a caption too long for an encoder is an error now, not at some later step
            for enc in self.text.encoders:
                self._tokens(enc, list(dict.fromkeys(c for c in self.captions if c is not None)))

    @property
    def latents(self) -> torch.Tensor:
        """The latent table [N, C, h, w] when every row shares one shape (one bucket)."""
        if len(self.tables) > 1:
            raise ValueError(f"the concepts' latents are in {len(self.tables)} aspect buckets, not one table; "
                             "draw rows with sample_rows, which keeps each micro-batch in one bucket")
        return self.tables[0]

    @property
    def masks(self) -> torch.Tensor | None:
        """The mask table [N, 1, h, w] (one bucket), or None when no concept has masks."""
        if self.mask_tables is None:
            return None
        self.latents  # noqa: B018 - the same error as latents when there are several buckets
        return self.mask_tables[0]

    def __len__(self) -> int:
        return len(self.owner)

    def initial_vectors(self) -> dict[str, torch.Tensor]:
        """{encoder key: [K_total, d]}: every concept's initial vectors, in row order (float32, detached)."""
        return {e.key: torch.cat([c.embedding.vectors[e.key].float() for c in self.concepts]).to(self.device)
                .detach().clone() for e in self.text.encoders}

    def initial_keys(self) -> list[str]:
        """The encoders' keys, in the text side's order (the order an embedding keeps its vectors in)."""
        return [e.key for e in self.text.encoders]

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
            if len(c) == 0:
                raise ValueError(f"concept {emb.name!r} has no images; load at least one")
        total_k = sum(c.embedding.num_vectors for c in self.concepts)
        for e in self.text.encoders:
            longest = max(len(e.tokenize(t.replace("{}", ""))) for t in self.templates)
            if longest + total_k + 2 > e.max_length:
                raise ValueError(f"{total_k} vectors plus the longest template do not fit in {e.max_length} "
                                 "tokens; use fewer vectors or shorter templates")

    # ---- drawing -----------------------------------------------------------------------------
    def sample_rows(self, gen: torch.Generator, n: int, batch_size: int | None = None) -> torch.Tensor:
        """``n`` rows drawn uniformly; with several buckets, each run of ``batch_size`` (default: all
        ``n``) keeps its first row and takes the others from that row's bucket."""
        if self.balanced and len(self.concepts) > 1 and len(self.tables) == 1:
            return self._balanced_rows(gen, n)
        idx = torch.randint(0, len(self), (n,), generator=gen)
        if len(self.tables) == 1 or n < 2:
            return idx  # one bucket: exactly the draw of a square run
        batch_size = batch_size or n
        for s in range(0, n, batch_size):
            e = min(n, s + batch_size)
            rows = self.bucket_rows[int(self.bucket[idx[s]])]
            idx[s + 1:e] = rows[torch.randint(0, len(rows), (e - s - 1,), generator=gen)]
        return idx

    def _balanced_rows(self, gen: torch.Generator, n: int) -> torch.Tensor:
        """``n`` rows, sample j from concept j mod N (an image of it uniformly): b x N samples give b each."""
        concept = torch.arange(n) % len(self.concepts)
        count, start = self._concept_count[concept], self._concept_start[concept]
        pick = (torch.rand(n, generator=gen) * count).long()
        return start + torch.minimum(pick, count - 1)

    def concept_of(self, idx: torch.Tensor) -> torch.Tensor:
        """The concept (its index in ``concepts``) each row of ``idx`` belongs to."""
        return self.owner[idx]

    def prompts(self, idx: torch.Tensor, gen: torch.Generator) -> list[str]:
        """Each row's caption, or a template drawn from ``gen`` filled with its concept's placeholder.

        With captions: a caption is replaced by its template with chance ``dropout``, and (``shuffle``)
        its parts after the first ``keep`` are put in an order drawn from ``gen``, as kohya does."""
        tpl = torch.randint(0, len(self.templates), (len(idx),), generator=gen).tolist()
        opts = self.caption_options
        drop = [False] * len(idx)
        if self.has_captions and opts.dropout > 0:
            drop = (torch.rand(len(idx), generator=gen) < opts.dropout).tolist()
        out = []
        for i, j, dropped in zip(idx.tolist(), tpl, drop):
            cap = self.captions[i]
            if cap is None or dropped:
                cap = self.templates[j].format(self.concepts[int(self.owner[i])].embedding.placeholder)
            elif opts.shuffle:
                cap = shuffle_caption(cap, opts.keep, gen)
            out.append(cap)
        return out

    def draw(self, gen: torch.Generator, batch_size: int, timesteps: TimestepDraw) -> Draw:
        """Images (one bucket), prompts, timesteps (``timesteps(n, gen)``) and noise, drawn in that order."""
        idx = self.sample_rows(gen, batch_size)
        prompts = self.prompts(idx, gen)
        t = timesteps(batch_size, gen)
        return self.draw_at(gen, idx, prompts, t)

    def draw_at(self, gen: torch.Generator, idx: torch.Tensor, prompts: list[str], t: torch.Tensor) -> Draw:
        """A draw whose images, prompts and timesteps are given; only the noise comes from ``gen``."""
        b = self.bucket[idx].unique()
        if len(b) != 1:
            raise ValueError(f"rows {idx.tolist()} are in {len(b)} aspect buckets; one micro-batch must share one "
                             "shape: draw them with sample_rows(gen, n, batch_size)")
        b = int(b)
        on = self.pos[idx].to(self.device)
        x0 = self.tables[b][on]
        noise = torch.randn(x0.shape, generator=gen).to(self.device, x0.dtype)
        return Draw(idx, prompts, t, x0, noise, None if self.mask_tables is None else self.mask_tables[b][on])

    def fixed_draws(self, n: int, seed: int, num_timesteps: int, batch_size: int) -> list[Draw]:
        """A fixed evaluation set of ``n`` draws (image, prompt, t uniform in [0, T), noise) that depends
        only on ``seed`` and ``n``, never on the run (its batch size, step, sampler), in micro-batches of at
        most ``batch_size`` that each keep to one aspect bucket. Several concepts (``balanced``): sample j
        is concept j mod N, so n = b x N draws b of each."""
        gen = step_generator(seed, 0, 0)
        idx = self.sample_rows(gen, n, batch_size=1)  # each row on its own: any bucket, one draw for any B
        prompts = self.prompts(idx, gen)
        t = torch.randint(0, num_timesteps, (n,), generator=gen)
        singles = [self.draw_at(step_generator(seed, 1, i), idx[i:i + 1], prompts[i:i + 1], t[i:i + 1])
                   for i in range(n)]  # each sample's noise from its own generator: chunking cannot change it
        out: list[Draw] = []
        for d in singles:
            last = out[-1] if out else None
            if last is not None and len(last.idx) < batch_size and last.x0.shape[1:] == d.x0.shape[1:]:
                out[-1] = Draw(torch.cat([last.idx, d.idx]), last.prompts + d.prompts, torch.cat([last.t, d.t]),
                               torch.cat([last.x0, d.x0]), torch.cat([last.noise, d.noise]),
                               None if d.mask is None else torch.cat([last.mask, d.mask]))
            else:
                out.append(d)
        return out

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

    def encode_per_sample(self, prompts: Sequence[str], vectors: Mapping[str, torch.Tensor]
                          ) -> tuple[Conditioning, dict[str, torch.Tensor]]:
        """Encode every prompt (no sharing) on its own copy of ``vectors``; return the conditioning and,
        per encoder, the copies [B, K, d] (seeds/000 Eq. 4's "tokens" reading, ``loss.token_grad_norms``).

        Sample b's slots point at rows b*K .. b*K+K-1 of one [B*K, d] table, so a loss summed over
        samples has, w.r.t. copy b, sample b's own gradient, and (through the copy) the sum of them
        w.r.t. ``vectors``: the gradient ``encode`` would give. The cost: one encoder pass over all B
        prompts instead of the distinct ones, and B copies of the rows (B*K*d numbers)."""
        n = len(prompts)
        outs, copies = [], {}
        for enc in self.text.encoders:
            v = vectors[enc.key]
            k = v.shape[0]
            ids, slots = self._tokens(enc, prompts)
            if not v.requires_grad:  # a frozen encoder's rows: no gradient to split per sample
                outs.append(enc.encode(ids, slots, v))
                continue
            shift = torch.arange(n, device=slots.device).unsqueeze(1) * k
            copy = v.unsqueeze(0).expand(n, *v.shape).clone()
            outs.append(enc.encode(ids, torch.where(slots >= 0, slots + shift, slots), copy.view(n * k, -1)))
            copies[enc.key] = copy
        return self.text.combine(outs), copies

    def _tokens(self, enc, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and slots of ``prompts``, tokenised once per distinct prompt for the whole run."""
        missing = [p for p in prompts if (enc.key, p) not in self._tok_cache]
        if missing:
            pb = build_prompt_batch(enc, missing, self.placeholders, device=self.device)
            for i, p in enumerate(missing):
                self._tok_cache[(enc.key, p)] = (pb.ids[i], pb.slots[i])
        rows = [self._tok_cache[(enc.key, p)] for p in prompts]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
