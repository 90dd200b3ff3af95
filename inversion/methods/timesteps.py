"""Timestep strategies: which diffusion timesteps each training step looks at.

All strategies share one interface, ``TimestepSampler``: ``sample(n, generator)`` returns n integer
timesteps in [0, T); ``observe(t, g)`` receives, after the backward pass, the conditioning gradient
norm g = ||grad_c ||eps_hat - eps|| || measured for each sampled t (seeds/000 Eq. 4), which the
adaptive strategy learns from and the others ignore.

From Wang & Kalogeiton, *Conditional Gradient-based Textual Inversion* (seeds/000):
- ``Uniform``: t ~ U[0, T), vanilla textual inversion;
- ``Interval``: t ~ U[a, b], the paper's baselines [900, 1000], [0, 100], [350, 450];
- ``Single``: one fixed t (the paper's t = 400);
- ``high_grad``: the interval of a gradient profile's highest window (strategy (1) of Sec. 3);
- ``Adaptive``: t ~ PDF(g(t)) with g estimated on the fly (Eq. 5, strategy (2)).

From Esser et al., *Scaling Rectified Flow Transformers* (SD3, 2024), Sec. 3.1:
- ``LogitNormal``: t / T ~ logit-normal(m, s), the density SD3 was trained with.

On a flow-matching model (SD3, Flux) the integer t indexes ComfyUI's table of sigmas (``model_sampling``:
1000 entries for SD3, with its shift applied; 10000 for Flux, with the shift of its resolution): every
strategy draws over that table, so "uniform" is uniform in the unshifted time and the shift moves the
draws toward the noisy end exactly as it does for sampling. Fixed intervals and single steps are given
on the 1000-step scale and scaled to the table (``scaled``), so [350, 450] is the same part of the
schedule for a 10000-entry table.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["TimestepSampler", "FixedRange", "Uniform", "Interval", "Single", "Adaptive", "LogitNormal", "high_grad",
           "reads_gradients", "scaled"]


@runtime_checkable
class TimestepSampler(Protocol):
    num_timesteps: int
    # Whether ``observe``'s g steers the draws. Every sampler declares it: the trainer then pays for the
    # run's g reading only where it is read (the tokens reading encodes once per sample), and records
    # the free context reading otherwise.
    reads_g: bool

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n integer timesteps (CPU, long)."""
        ...

    def observe(self, t: torch.Tensor, g: torch.Tensor) -> None:
        """Feedback: the Eq. 4 gradient norm ``g`` [n] measured at timesteps ``t`` [n]."""
        ...

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...

    def describe(self) -> str:
        ...

    def report(self) -> dict[str, Any]:
        """What a progress report shows of the sampler (StepInfo fields, e.g. ``g_estimate``)."""
        ...


class FixedRange:
    """Base of the samplers whose draws never depend on g: ``observe`` ignores it, no state."""

    reads_g = False

    def observe(self, t: torch.Tensor, g: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def report(self) -> dict[str, Any]:
        return {}


def reads_gradients(sampler: TimestepSampler) -> bool:
    """Whether ``sampler`` uses the g values it is shown (its ``reads_g``); a sampler that does not say is refused."""
    reads = getattr(sampler, "reads_g", None)
    if not isinstance(reads, bool):
        raise TypeError(f"timestep sampler {type(sampler).__name__} must declare reads_g = True or False (whether "
                        "observe's g steers its draws): the trainer encodes per sample only for one that reads it")
    return reads


def scaled(t: int, num_timesteps: int, reference: int = 1000) -> int:
    """Timestep ``t`` given on a ``reference``-step schedule, on one of ``num_timesteps`` steps (Flux's
    sigma table has 10000): the same fraction of the schedule."""
    return t if num_timesteps == reference else int(round(t * num_timesteps / reference))


class Interval(FixedRange):
    """t ~ U{a, ..., b} (both ends included, clipped to [0, T-1])."""

    def __init__(self, a: int, b: int, num_timesteps: int = 1000):
        a, b = int(a), int(b)
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        if a < 0 or a > b:
            raise ValueError(f"timestep interval [{a}, {b}] is empty or negative; need 0 <= a <= b")
        if a >= num_timesteps:
            raise ValueError(f"timestep interval starts at {a}, beyond the model's {num_timesteps} timesteps")
        self.num_timesteps = num_timesteps
        self.a, self.b = a, min(b, num_timesteps - 1)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(self.a, self.b + 1, (n,), generator=generator)

    def describe(self) -> str:
        return f"interval[{self.a},{self.b}]"


class Uniform(Interval):
    """t ~ U{0, ..., T-1}: vanilla textual inversion."""

    def __init__(self, num_timesteps: int = 1000):
        super().__init__(0, num_timesteps - 1, num_timesteps)

    def describe(self) -> str:
        return "uniform"


class Single(Interval):
    """Always the same timestep t0 (seeds/000: even t = 400 alone can invert a concept)."""

    def __init__(self, t0: int = 400, num_timesteps: int = 1000):
        if not 0 <= int(t0) < num_timesteps:
            raise ValueError(f"single timestep {t0} is outside [0, {num_timesteps - 1}]")
        super().__init__(t0, t0, num_timesteps)

    def describe(self) -> str:
        return f"single[{self.a}]"


def high_grad(profile, width: int = 100, num_timesteps: int | None = None) -> Interval:
    """Strategy (1) of seeds/000 Sec. 3: train on the window of width ``width`` where g(t) is highest.

    ``profile`` is a ``GradProfile`` (``inversion.methods.profiler``) or anything with ``best_window(width)``.
    """
    a, b = profile.best_window(width)
    window = Interval(a, b, num_timesteps or profile.num_timesteps)
    window.profile_reading = getattr(profile, "reading", None)  # the trainer checks it against the run's g reading
    return window


class Adaptive:
    """t ~ PDF(g(t)) (seeds/000 Eq. 5), with g(t) estimated on the fly from the training steps.

    [0, T) is cut into ``bins`` equal bins. Each bin keeps a running estimate of
    g = E||grad_c ||eps_hat - eps|| || from the per-sample gradient norms the trainer's backward
    pass already computes (no extra passes): an exponential moving average with factor ``ema``
    once the bin has been seen, the plain mean before. A bin is drawn with probability
    (1 - explore) * g_bin / sum(g) + explore / bins, so every bin keeps being measured and
    the estimate can follow g(t) as it changes during training; t is then uniform inside the bin.
    Each bin's estimate is a running mean over its first 1/(1 - ema) observations, then an EMA.
    Until every bin has ``min_count`` observations the bins are drawn uniformly (unless the
    sampler is seeded with a profile, whose values stand in for the missing observations).
    """

    reads_g = True

    def __init__(self, num_timesteps: int = 1000, bins: int = 20, explore: float = 0.1,
                 ema: float = 0.9, min_count: int = 1, profile=None):
        if bins < 1 or bins > num_timesteps:
            raise ValueError(f"adaptive bins must be in [1, {num_timesteps}], got {bins}")
        if not 0.0 <= explore <= 1.0:
            raise ValueError(f"adaptive explore must be in [0, 1], got {explore}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"adaptive ema must be in [0, 1), got {ema}")
        self.num_timesteps = num_timesteps
        self.bins = bins
        self.explore = float(explore)
        self.ema = float(ema)
        self.min_count = int(min_count)
        self.edges = torch.linspace(0, num_timesteps, bins + 1).round().long()
        self.estimate = torch.zeros(bins, dtype=torch.float64)
        self.count = torch.zeros(bins, dtype=torch.long)
        self.seeded = False
        self.profile_reading = None
        if profile is not None:
            self.seed_from(profile)

    def seed_from(self, profile) -> None:
        """Start from a measured profile: its g(t), resampled at this sampler's bin centres."""
        centers = (self.edges[:-1] + self.edges[1:]).double() / 2
        self.estimate = profile.value_at(centers).double().clamp(min=0)
        self.seeded = True
        self.profile_reading = getattr(profile, "reading", None)  # checked against the run's g reading

    def bin_of(self, t: torch.Tensor) -> torch.Tensor:
        return (torch.bucketize(t.long(), self.edges[1:], right=True)).clamp(max=self.bins - 1)

    def probabilities(self) -> torch.Tensor:
        """The current distribution over bins (Eq. 5 mixed with ``explore`` uniform mass)."""
        uniform = torch.full((self.bins,), 1.0 / self.bins, dtype=torch.float64)
        if not self.seeded and bool((self.count < self.min_count).any()):
            return uniform
        g = self.estimate.clamp(min=0)
        total = float(g.sum())
        if total <= 0 or not torch.isfinite(g).all():
            return uniform
        return (1 - self.explore) * g / total + self.explore * uniform

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        b = torch.multinomial(self.probabilities(), n, replacement=True, generator=generator)
        lo, hi = self.edges[b], self.edges[b + 1]
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return (lo + (u * (hi - lo).double()).floor().long()).clamp(max=self.num_timesteps - 1)

    def observe(self, t: torch.Tensor, g: torch.Tensor) -> None:
        t = t.detach().cpu().long().flatten()
        g = g.detach().cpu().double().flatten()
        for b, val in zip(self.bin_of(t).tolist(), g.tolist()):
            if val != val or val in (float("inf"), float("-inf")):
                continue
            c = int(self.count[b])
            # Running mean for the first 1/(1-ema) observations, then an EMA that follows g(t)
            # as it changes during training.
            alpha = max(1.0 / (c + 1), 1.0 - self.ema)
            self.estimate[b] += alpha * (val - float(self.estimate[b]))
            self.count[b] = c + 1

    def state_dict(self) -> dict[str, Any]:
        return {"estimate": self.estimate.clone(), "count": self.count.clone(),
                "seeded": torch.tensor(int(self.seeded))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.estimate = state["estimate"].double().clone()
        self.count = state["count"].long().clone()
        self.seeded = bool(int(state.get("seeded", torch.tensor(0))))

    def describe(self) -> str:
        return f"adaptive[bins={self.bins},explore={self.explore}]"

    def report(self) -> dict[str, Any]:
        return {"g_estimate": [float(x) for x in self.estimate], "bin_edges": [int(x) for x in self.edges]}


class LogitNormal(FixedRange):
    """t = floor(T u) with u ~ logit-normal(m, s): u = sigmoid(m + s z), z ~ N(0, 1).

    The density of u is pi_ln(u; m, s) = 1 / (s sqrt(2 pi)) * 1 / (u (1 - u)) * exp(-(logit(u) - m)^2 / (2 s^2))
    (Esser et al. 2024, Eq. 19), what SD3 was trained with (m = 0, s = 1): the middle of the schedule
    weighted most, the ends rarely drawn. u is the unshifted time, as diffusers' SD3 and Flux trainers
    draw it (``compute_density_for_timestep_sampling``, then the scheduler's shifted sigma at u), so on
    SD3 (shift 3) the sigmas drawn sit toward the noisy end the way its training did.
    """

    def __init__(self, num_timesteps: int = 1000, mean: float = 0.0, std: float = 1.0):
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        if not std > 0:
            raise ValueError(f"logit-normal std must be > 0, got {std}")
        self.num_timesteps = num_timesteps
        self.mean, self.std = float(mean), float(std)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        u = torch.sigmoid(self.mean + self.std * z)
        return (u * self.num_timesteps).floor().long().clamp(0, self.num_timesteps - 1)

    def describe(self) -> str:
        return f"logit_normal[m={self.mean:g},s={self.std:g}]"
