"""The gradient-norm profiler of *Conditional Gradient-based Textual Inversion* (seeds/000).

    g(t) = E_x [ || grad_c || eps_theta(x_t, t, c) - eps || || ]                        (Eq. 4)

c is the conditioning the denoiser receives (the text encoder's hidden states); the per-sample
norm itself is ``inversion.methods.loss.grad_norms_at``. With ``reading="tokens"`` the gradient is taken
w.r.t. the learned rows instead (``inversion.methods.loss.token_grad_norms_at``, the other reading of
Eq. 4; see ``inversion.methods.loss``). g(t) says how
much the prompt can change the denoiser's prediction at timestep t: timesteps with a large g are
the informative ones for inversion (high-grad interval training, adaptive sampling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..data.batch import ConceptSet, autocast, step_generator
from ..host import Denoiser, TextSide, is_trainable, step_context
from .g_reading import DEFAULT as DEFAULT_G_READING, reading as g_reading_of
from ..progress import Progress
from ..data.prompts import OBJECT_TEMPLATES, check_templates
from ..concepts import ConceptData

__all__ = ["GradProfile", "profile_gradients"]


@dataclass
class GradProfile:
    """g(t) over timestep bins: per-bin mean, spread and count, plus the raw samples."""

    edges: torch.Tensor  # [bins + 1] integer timesteps; bin i is [edges[i], edges[i+1])
    mean: torch.Tensor  # [bins] float64
    std: torch.Tensor  # [bins]
    count: torch.Tensor  # [bins] long
    num_timesteps: int
    t: torch.Tensor | None = None  # [n] the raw timesteps measured
    g: torch.Tensor | None = None  # [n] their g values
    reading: str = "context"  # what g differentiates (g_reading.G_READINGS): c, or the learned rows

    @property
    def bins(self) -> int:
        return int(self.mean.shape[0])

    def centers(self) -> torch.Tensor:
        return (self.edges[:-1] + self.edges[1:]).double() / 2

    def value_at(self, t: torch.Tensor) -> torch.Tensor:
        """g at timesteps ``t``, linearly interpolated between bin centres (constant at the ends)."""
        c = self.centers()
        t = torch.as_tensor(t, dtype=torch.float64).clamp(float(c[0]), float(c[-1]))
        if self.bins == 1:
            return self.mean.expand_as(t).clone()
        i = torch.searchsorted(c, t, right=True).clamp(1, self.bins - 1)
        lo, hi = c[i - 1], c[i]
        w = ((t - lo) / (hi - lo)).clamp(0, 1)
        return self.mean[i - 1] * (1 - w) + self.mean[i] * w

    def best_window(self, width: int = 100) -> tuple[int, int]:
        """The interval [a, a + width - 1] of integer timesteps with the largest total g(t)
        (strategy (1) "high-grad" of seeds/000 Sec. 3)."""
        width = int(width)
        if not 1 <= width <= self.num_timesteps:
            raise ValueError(f"window width must be in [1, {self.num_timesteps}], got {width}")
        g = self.value_at(torch.arange(self.num_timesteps, dtype=torch.float64))
        csum = torch.cat([torch.zeros(1, dtype=torch.float64), g.cumsum(0)])
        totals = csum[width:] - csum[:-width]
        a = int(totals.argmax())
        return a, a + width - 1

    def to_dict(self) -> dict[str, Any]:
        d = {"edges": self.edges.tolist(), "mean": self.mean.tolist(), "std": self.std.tolist(),
             "count": self.count.tolist(), "num_timesteps": self.num_timesteps}
        if self.t is not None:
            d["t"], d["g"] = self.t.tolist(), self.g.tolist()
        if self.reading != "context":  # a context profile's dict is what it always was
            d["reading"] = self.reading
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GradProfile":
        return cls(torch.tensor(d["edges"], dtype=torch.long), torch.tensor(d["mean"], dtype=torch.float64),
                   torch.tensor(d["std"], dtype=torch.float64), torch.tensor(d["count"], dtype=torch.long),
                   int(d["num_timesteps"]),
                   torch.tensor(d["t"], dtype=torch.long) if "t" in d else None,
                   torch.tensor(d["g"], dtype=torch.float64) if "g" in d else None,
                   str(d.get("reading", "context")))

    @classmethod
    def from_samples(cls, t: torch.Tensor, g: torch.Tensor, edges: torch.Tensor, num_timesteps: int,
                     reading: str = "context") -> "GradProfile":
        t, g = t.long().flatten(), g.double().flatten()
        b = torch.bucketize(t, edges[1:], right=True).clamp(max=len(edges) - 2)
        n = len(edges) - 1
        count = torch.bincount(b, minlength=n)
        s1 = torch.zeros(n, dtype=torch.float64).index_add_(0, b, g)
        s2 = torch.zeros(n, dtype=torch.float64).index_add_(0, b, g * g)
        mean = s1 / count.clamp(min=1)
        var = (s2 / count.clamp(min=1) - mean**2).clamp(min=0) * count / (count - 1).clamp(min=1)
        return cls(edges.long(), mean, var.sqrt(), count, num_timesteps, t, g, reading)


def profile_gradients(text: TextSide, denoiser: Denoiser, concepts: Sequence[ConceptData], *,
                      bins: int = 20, samples_per_bin: int = 4, batch_size: int = 4,
                      t_range: tuple[int, int] | None = None, templates: Sequence[str] = OBJECT_TEMPLATES,
                      seed: int = 0, device: torch.device | str | None = None, autocast_dtype: str | None = None,
                      callback: Callable[[Progress], Any] | None = None,
                      reading: str = DEFAULT_G_READING) -> GradProfile:
    """Measure g(t) (Eq. 4) on the concept images with the concepts' current vectors.

    [t_range) (default [0, T)) is cut into ``bins`` bins; each gets ``samples_per_bin`` draws
    (image, flip, template, noise, t uniform in the bin). Draws are processed ``batch_size`` at a
    time with one forward and one backward pass of the denoiser, as in a training step, but the
    text encoder runs only once per distinct prompt for the whole profile and never backwards
    (the gradient is taken w.r.t. its output c), so a profile of ``bins * samples_per_bin /
    batch_size`` batches costs at most as much as that many training steps.
    ``callback(Progress(step, total))`` reports progress (batches) and may raise to cancel.

    ``reading`` ("context" or "tokens", ``g_reading.G_READINGS``): what Eq. 4 differentiates. "tokens"
    differentiates the learned rows, through the text encoder, so the encoder cannot be cached: it
    runs forward and backward on every draw (``ConceptSet.encode_per_sample``), which adds the text
    encoder's forward and backward for ``batch_size`` prompts to every batch.
    """
    g = g_reading_of(reading)
    T = denoiser.num_timesteps
    lo, hi = t_range if t_range is not None else (0, T)
    if not 0 <= lo < hi <= T:
        raise ValueError(f"t_range must satisfy 0 <= start < end <= {T}, got {(lo, hi)}")
    if bins < 1 or bins > hi - lo or samples_per_bin < 1 or batch_size < 1:
        raise ValueError(f"need 1 <= bins <= {hi - lo}, samples_per_bin >= 1, batch_size >= 1; "
                         f"got bins={bins}, samples_per_bin={samples_per_bin}, batch_size={batch_size}")
    data = ConceptSet(text, concepts, check_templates(templates), device)
    edges = torch.linspace(lo, hi, bins + 1).round().long()
    gen = step_generator(seed, 0, 7)
    b = torch.arange(bins).repeat_interleave(samples_per_bin)
    u = torch.rand(len(b), generator=gen, dtype=torch.float64)
    t_all = (edges[b] + (u * (edges[b + 1] - edges[b]).double()).floor().long()).clamp(max=hi - 1)
    t_all = t_all[torch.randperm(len(t_all), generator=gen)]  # mix bins within a batch
    idx_all = data.sample_rows(gen, len(t_all), batch_size)  # a batch never mixes aspect buckets
    prompts_all = data.prompts(idx_all, gen)
    vectors = data.initial_vectors()
    if g.name == "tokens":  # leaves, so each draw's copies of the rows carry a gradient (a frozen encoder's: none)
        learns = {e.key: is_trainable(e) for e in data.text.encoders}
        vectors = {k: v.requires_grad_(learns[k]) for k, v in vectors.items()}
    cache = g.precompute(data, prompts_all, vectors)
    gs = []
    n_batches = (len(t_all) + batch_size - 1) // batch_size
    for k in range(n_batches):
        sl = slice(k * batch_size, (k + 1) * batch_size)
        d = data.draw_at(gen, idx_all[sl], prompts_all[sl], t_all[sl])
        with autocast(data.device, autocast_dtype), step_context(denoiser):
            gs.append(g.measure(denoiser, data, d, vectors, cache).cpu())
        if callback is not None:
            callback(Progress(k + 1, n_batches))
    return GradProfile.from_samples(t_all, torch.cat(gs).double(), edges, T, reading)
