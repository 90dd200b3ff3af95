"""Generation: DDIM (Song et al. 2021, Eq. 12 with sigma = 0) with classifier-free guidance.

Prompts may hold placeholders of learned embeddings; they are tokenised with
``inversion.data.prompts.build_prompt_batch`` and encoded with the encoder's ``encode(ids, slots,
vectors)``, the same path the trainer uses, so a learned vector means the same thing in both.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..embedding import LearnedEmbedding
from ..host import Conditioning, Denoiser, TextSide
from ..data.prompts import build_prompt_batch

__all__ = ["encode_prompts", "ddim_timesteps", "ddim_sample", "Sampler"]


def _as_list(embeddings: LearnedEmbedding | Sequence[LearnedEmbedding] | None) -> list[LearnedEmbedding]:
    if embeddings is None:
        return []
    if isinstance(embeddings, LearnedEmbedding):
        return [embeddings]
    return list(embeddings)


def encode_prompts(text: TextSide, prompts: Sequence[str],
                   embeddings: LearnedEmbedding | Sequence[LearnedEmbedding] | None = None,
                   device: torch.device | str | None = None) -> Conditioning:
    """The conditioning of ``prompts``, each embedding's placeholder replaced by its vectors."""
    embs = _as_list(embeddings)
    outputs = []
    for enc in text.encoders:
        placeholders: dict[str, tuple[int, int]] = {}
        rows: list[torch.Tensor] = []
        offset = 0
        for e in embs:
            if enc.key not in e.vectors:
                raise ValueError(f"embedding {e.name!r} has no vectors for encoder {enc.key!r} (has {e.keys})")
            v = e.vectors[enc.key]
            if v.shape[1] != enc.width:
                raise ValueError(f"embedding {e.name!r}: {enc.key} vectors are {v.shape[1]}-d, the encoder "
                                 f"is {enc.width}-d; it was learned on another model")
            placeholders[e.placeholder] = (offset, v.shape[0])
            rows.append(v)
            offset += v.shape[0]
        table = enc.token_table()
        vectors = torch.cat(rows).to(table.device, table.dtype) if rows else table[:1].detach()
        batch = build_prompt_batch(enc, prompts, placeholders, device=table.device)
        outputs.append(enc.encode(batch.ids, batch.slots, vectors))
    cond = text.combine(outputs)
    if device is not None:
        cond = Conditioning(cond.context.to(device), None if cond.pooled is None else cond.pooled.to(device))
    return cond


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps from T-1 down to 0, evenly spaced ("trailing": the first is pure noise)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ts = torch.linspace(num_timesteps - 1, 0, steps).round().long().tolist()
    return list(dict.fromkeys(ts))


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, cond: Conditioning, uncond: Conditioning | None, noise: torch.Tensor,
                steps: int = 25, guidance: float = 4.0, clip: float | None = 1.0) -> torch.Tensor:
    """Deterministic DDIM from x_T = ``noise``; returns x_0 in the denoiser's space ([-1, 1] for pixels).

    x_{t'} = sqrt(abar_t') x0_hat + sqrt(1 - abar_t') eps_hat, x0_hat = (x_t - sqrt(1 - abar_t) eps_hat)
    / sqrt(abar_t). Classifier-free guidance (Ho & Salimans 2022): eps_hat = eps_u + w (eps_c - eps_u);
    w = 1 or ``uncond=None`` is plain conditional sampling. ``clip`` bounds x0_hat at each step
    (and eps_hat is recomputed from it), which keeps pixel-space samples in range.
    """
    abar = denoiser.schedule.alphas_cumprod  # type: ignore[attr-defined]
    x = noise.to(cond.context.device, torch.float32)
    b = x.shape[0]
    use_cfg = uncond is not None and guidance != 1.0
    if use_cfg:
        both = Conditioning(torch.cat([uncond.context, cond.context]),
                            None if cond.pooled is None else torch.cat([uncond.pooled, cond.pooled]))
    ts = ddim_timesteps(denoiser.num_timesteps, steps)
    for i, t in enumerate(ts):
        a_t = float(abar[t])
        a_prev = float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        tt = torch.full((b,), t, dtype=torch.long, device=x.device)
        if use_cfg:
            e_u, e_c = denoiser.predict_eps(torch.cat([x, x]), torch.cat([tt, tt]), both).chunk(2)
            eps = e_u + guidance * (e_c - e_u)
        else:
            eps = denoiser.predict_eps(x, tt, cond)
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
            eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


class Sampler:
    """Text-to-image for a pixel-space world model: ``generate(prompts) -> images [B, 3, H, W] in [0, 1]``."""

    def __init__(self, text: TextSide, denoiser: Denoiser, image_size: int, channels: int = 3,
                 steps: int = 25, guidance: float = 4.0):
        self.text = text
        self.denoiser = denoiser
        self.image_size = image_size
        self.channels = channels
        self.steps = steps
        self.guidance = guidance

    @torch.no_grad()
    def generate(self, prompts: Sequence[str],
                 embeddings: LearnedEmbedding | Sequence[LearnedEmbedding] | None = None,
                 seed: int = 0, steps: int | None = None, guidance: float | None = None,
                 batch_size: int = 64) -> torch.Tensor:
        """One image per prompt; image i uses noise from ``seed`` and its index, so a prompt's image
        does not depend on the batch it is generated in."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("generate: prompts is empty; pass at least one prompt")
        s = self.image_size
        out = []
        for lo in range(0, len(prompts), batch_size):
            chunk = prompts[lo:lo + batch_size]
            cond = encode_prompts(self.text, chunk, embeddings)
            uncond = encode_prompts(self.text, [""] * len(chunk))
            noise = torch.stack([
                torch.randn(self.channels, s, s, generator=torch.Generator().manual_seed(seed * 1_000_003 + lo + i))
                for i in range(len(chunk))
            ])
            x = ddim_sample(self.denoiser, cond, uncond, noise, steps or self.steps,
                            self.guidance if guidance is None else guidance)
            out.append(((x + 1) / 2).clamp(0, 1).cpu())
        return torch.cat(out)

