"""Method presets by name: a timestep strategy plus an optimiser (plus a default learning rate).

Every part stays composable (``inversion.timesteps``, ``inversion.optim``); a preset is only a
convenient, documented combination for the node layer's single method selector.

| preset                  | timesteps                         | optimiser            | paper      |
|-------------------------|-----------------------------------|----------------------|------------|
| vanilla                 | uniform [0, T)                    | AdamW                | Gal et al. |
| interval                | uniform [a, b]                    | AdamW                | seeds/000  |
| single_step             | one t (400)                       | AdamW                | seeds/000  |
| high_grad               | best window of a g(t) profile     | AdamW                | seeds/000  |
| adaptive                | t ~ PDF(g(t)), g on the fly       | AdamW                | seeds/000  |
| directional             | uniform                           | Riemannian SGD + vMF | seeds/002  |
| directional_adamw       | uniform                           | AdamW + projection   | seeds/002 (ablation) |
| adaptive_directional    | t ~ PDF(g(t))                     | Riemannian SGD + vMF | 000 + 002  |
| high_grad_directional   | best window of a g(t) profile     | Riemannian SGD + vMF | 000 + 002  |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .init import from_word, vocab_mean_norm
from .optim import AdamW, ProjectedAdamW, RiemannianSGD, VectorOptimizer
from .timesteps import Adaptive, Interval, Single, TimestepSampler, Uniform, high_grad

__all__ = ["PRESETS", "MethodParams", "Method", "build_method", "describe_presets"]

PRESETS: dict[str, tuple[str, str, str]] = {
    # name: (timesteps, optimiser, one-line description)
    "vanilla": ("uniform", "adamw", "Textual inversion as published: t ~ U[0, T), AdamW."),
    "interval": ("interval", "adamw", "t ~ U[a, b] (seeds/000 baselines: [900,1000], [0,100], [350,450])."),
    "single_step": ("single", "adamw", "Always the same t (seeds/000: t = 400 alone can invert)."),
    "high_grad": ("high_grad", "adamw", "Train on the window where the profiled g(t) is highest (seeds/000)."),
    "adaptive": ("adaptive", "adamw", "t ~ PDF(g(t)) with g measured during training (seeds/000 Eq. 5)."),
    "directional": ("uniform", "rsgd", "DTI: fixed norm, Riemannian SGD on the sphere, vMF prior (seeds/002)."),
    "directional_adamw": ("uniform", "padamw", "DTI's ablation: AdamW then projection to the fixed norm."),
    "adaptive_directional": ("adaptive", "rsgd", "Adaptive timesteps with DTI's optimiser."),
    "high_grad_directional": ("high_grad", "rsgd", "High-grad window with DTI's optimiser."),
}

# Learning rates that suit each optimiser: 5e-3 is A1111's and (after diffusers' batch scaling)
# diffusers' usual AdamW rate on SD; DTI's Riemannian step is an angle in radians (authors' 0.01).
DEFAULT_LR = {"adamw": 5e-3, "padamw": 5e-3, "rsgd": 1e-2}


@dataclass(frozen=True)
class MethodParams:
    """Parameters of the presets; each is used only by the presets it concerns."""

    interval: tuple[int, int] = (350, 450)  # for "interval": the paper's high-g(t) baseline
    single_t: int = 400  # for "single_step": the paper's single timestep
    window: int = 100  # for "high_grad": window width, the paper's intervals are 100 wide
    bins: int = 20  # for "adaptive": timestep bins of the running g(t) estimate
    explore: float = 0.1  # for "adaptive": uniform mass mixed in so every bin stays measured
    kappa: float = 1e-4  # for DTI: vMF concentration, the paper's default
    class_word: str = ""  # for DTI: the prior direction mu; empty = the initial vectors' direction
    norm_scale: float = 1.0  # for DTI: m* = norm_scale x the vocabulary's mean norm (paper: 1)
    dti_beta: float = 0.0  # for DTI: EMA of squared gradient norms (authors' code; 0 = plain normalisation)


@dataclass
class Method:
    name: str
    sampler: TimestepSampler
    optimizer: VectorOptimizer
    lr: float
    description: str


def describe_presets() -> str:
    return "\n".join(f"{k}: {v[2]}" for k, v in PRESETS.items())


def _directional_parts(text_side, params: MethodParams, init: dict[str, torch.Tensor] | None
                       ) -> tuple[dict[str, float], dict[str, torch.Tensor] | None]:
    if params.norm_scale <= 0:
        raise ValueError(f"norm_scale must be > 0, got {params.norm_scale}")
    norms = {e.key: vocab_mean_norm(e) * params.norm_scale for e in text_side.encoders}
    if params.class_word.strip():
        if init is None:
            raise ValueError("the vMF prior needs the initial vectors to know k")
        k = next(iter(init.values())).shape[0]
        mu = from_word(text_side, params.class_word.strip(), k)
    else:
        mu = None if init is None else {kk: v.detach().float().clone() for kk, v in init.items()}
    return norms, mu


def build_method(name: str, text_side, num_timesteps: int, params: MethodParams = MethodParams(), *,
                 profile=None, init_vectors: dict[str, torch.Tensor] | None = None) -> Method:
    """The sampler and optimiser of preset ``name``.

    ``profile``: a ``GradProfile`` (needed by the high-grad presets; seeds the adaptive ones).
    ``init_vectors``: the run's initial ``{key: [K, d]}`` (the DTI prior's fallback direction and k).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(PRESETS)}")
    ts, opt, desc = PRESETS[name]
    T = num_timesteps
    if ts == "uniform":
        sampler: TimestepSampler = Uniform(T)
    elif ts == "interval":
        a, b = params.interval
        sampler = Interval(a, b, T)
    elif ts == "single":
        sampler = Single(params.single_t, T)
    elif ts == "high_grad":
        if profile is None:
            raise ValueError(f"method {name!r} needs a gradient profile: run the gradient-norm profiler "
                             "(GradNormProfiler node) first and connect its profile, or choose 'adaptive', "
                             "which measures g(t) while training")
        sampler = high_grad(profile, params.window, T)
    else:
        sampler = Adaptive(T, bins=params.bins, explore=params.explore, profile=profile)
    if opt == "adamw":
        optimizer: VectorOptimizer = AdamW()
    else:
        norms, mu = _directional_parts(text_side, params, init_vectors)
        if opt == "rsgd":
            optimizer = RiemannianSGD(norms, mu, params.kappa, beta=params.dti_beta)
        else:
            optimizer = ProjectedAdamW(norms, mu, params.kappa)
    return Method(name, sampler, optimizer, DEFAULT_LR[opt], desc)


def preset_names() -> Sequence[str]:
    return list(PRESETS)
