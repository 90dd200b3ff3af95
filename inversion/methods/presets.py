"""Method presets by name: a timestep strategy plus an optimiser (plus a default learning rate).

Every part stays composable (``inversion.methods.timesteps``, ``inversion.methods.optim``); a preset is only a
convenient, documented combination for the node layer's single method selector.

| preset                  | timesteps                         | optimiser            | paper      |
|-------------------------|-----------------------------------|----------------------|------------|
| vanilla                 | uniform [0, T)                    | AdamW                | Gal et al. |
| interval                | uniform [a, b]                    | AdamW                | seeds/000  |
| single_step             | one t (400)                       | AdamW                | seeds/000  |
| high_grad               | best window of a g(t) profile     | AdamW                | seeds/000  |
| adaptive                | t ~ PDF(g(t)), g on the fly       | AdamW                | seeds/000  |
| logit_normal            | t/T ~ logit-normal(0, 1)          | AdamW                | Esser et al. 2024 (SD3) |
| directional             | uniform                           | Riemannian SGD + vMF | seeds/002  |
| directional_adamw       | uniform                           | AdamW + projection   | seeds/002 (ablation) |
| adaptive_directional    | t ~ PDF(g(t))                     | Riemannian SGD + vMF | 000 + 002  |
| high_grad_directional   | best window of a g(t) profile     | Riemannian SGD + vMF | 000 + 002  |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .init import from_word, vocab_mean_norm, word_rows
from .optim import AdamW, ProjectedAdamW, RiemannianSGD, VectorOptimizer
from .timesteps import Adaptive, Interval, LogitNormal, Single, TimestepSampler, Uniform, high_grad, scaled

__all__ = ["PRESETS", "DEFAULT_METHOD", "Preset", "MethodParams", "Method", "build_method", "describe_presets", "prior_directions"]


@dataclass(frozen=True)
class MethodParams:
    """Parameters of the presets; each is used only by the presets it concerns."""

    interval: tuple[int, int] = (350, 450)  # for "interval": the paper's high-g(t) baseline
    single_t: int = 400  # for "single_step": the paper's single timestep
    window: int = 100  # for "high_grad": window width, the paper's intervals are 100 wide
    bins: int = 20  # for "adaptive": timestep bins of the running g(t) estimate
    explore: float = 0.1  # for "adaptive": uniform mass mixed in so every bin stays measured
    kappa: float = 1e-4  # for DTI: vMF concentration, the paper's default
    class_word: str = ""  # for DTI: mu of the vector(s) standing for the class; empty = each row's own init
    norm_scale: float = 1.0  # for DTI: m* = norm_scale x the vocabulary's mean norm (paper: 1)
    dti_beta: float = 0.0  # for DTI: EMA of squared gradient norms (authors' code; 0 = plain normalisation)


SamplerFactory = Callable[[MethodParams, int, object], TimestepSampler]  # (params, T, profile or None)
# (text side, params, initial vectors or None, init text or None)
OptimizerFactory = Callable[[object, MethodParams, "dict[str, torch.Tensor] | None", "str | None"], VectorOptimizer]


def _uniform(p: MethodParams, T: int, profile) -> TimestepSampler:
    return Uniform(T)


def _interval(p: MethodParams, T: int, profile) -> TimestepSampler:
    return Interval(scaled(p.interval[0], T), scaled(p.interval[1], T), T)  # given on 1000 steps


def _single(p: MethodParams, T: int, profile) -> TimestepSampler:
    return Single(scaled(p.single_t, T), T)


def _logit_normal(p: MethodParams, T: int, profile) -> TimestepSampler:
    return LogitNormal(T)


def _high_grad(p: MethodParams, T: int, profile) -> TimestepSampler:
    if profile is None:
        raise ValueError("needs a gradient profile: run the gradient-norm profiler "
                         "(GradNormProfiler node) first and connect its profile, or choose 'adaptive', "
                         "which measures g(t) while training")
    return high_grad(profile, scaled(p.window, T), T)


def _adaptive(p: MethodParams, T: int, profile) -> TimestepSampler:
    return Adaptive(T, bins=p.bins, explore=p.explore, profile=profile)


def prior_directions(text_side, init: dict[str, torch.Tensor], init_text: str | None = None,
                     class_word: str = "") -> dict[str, torch.Tensor]:
    """DTI's vMF prior direction mu for every learned vector, per encoder (seeds/002).

    The DTI authors pull each vector toward the normalised embedding of the token it started
    from; a class word (their 'dog' example) is the direction only of the vector that stands for
    the class. So, with ``init`` [k, d] per encoder (the optimiser normalises each row):

    - no class word: each row's mu is its own initial vector;
    - a class word and an init of one vector per token of ``init_text`` (Caption Init,
      ``init.from_text``): the rows whose tokens are the class word's tokens (``init.word_rows``,
      e.g. "toy" in "a red toy") get those tokens' embeddings and every other row keeps its own
      initial vector, so "a" and "red" are not pulled toward "toy". A class word the text does not
      contain ("dog" for "a plush toy") goes to the last row, the head noun of an English noun
      phrase (and the only row when k = 1);
    - a class word and rows that are not the text's tokens (a word repeated k times, a random
      init, no ``init_text``): every row, since each stands for the whole concept.

    A class word of several tokens contributes the mean of its rows where it is not matched
    token by token (``init.from_word``).
    """
    word = class_word.strip()
    out = {key: v.detach().float().clone() for key, v in init.items()}
    if not word:
        return out
    whole = from_word(text_side, word, 1)
    for enc in text_side.encoders:
        if enc.key not in out:
            continue
        mu, k = out[enc.key], out[enc.key].shape[0]
        ids = enc.tokenize(init_text) if init_text else []
        if len(ids) != k:  # the rows are not the text's tokens: each stands for the concept
            mu[:] = whole[enc.key][0]
            continue
        rows = word_rows(enc, init_text, word)
        if rows:
            table = enc.token_table().detach()
            mu[rows] = table[torch.tensor([ids[r] for r in rows], device=table.device)].float().cpu().to(mu.device)
        else:
            mu[-1] = whole[enc.key][0]
    return out


def _directional_parts(text_side, params: MethodParams, init: dict[str, torch.Tensor] | None,
                       init_text: str | None = None) -> tuple[dict[str, float], dict[str, torch.Tensor] | None]:
    if params.norm_scale <= 0:
        raise ValueError(f"norm_scale must be > 0, got {params.norm_scale}")
    norms = {e.key: vocab_mean_norm(e) * params.norm_scale for e in text_side.encoders}
    if init is None:
        if params.class_word.strip():
            raise ValueError("the vMF prior needs the initial vectors to know k")
        return norms, None
    return norms, prior_directions(text_side, init, init_text, params.class_word)


def _adamw(text_side, p: MethodParams, init, init_text=None) -> VectorOptimizer:
    return AdamW()


def _rsgd(text_side, p: MethodParams, init, init_text=None) -> VectorOptimizer:
    norms, mu = _directional_parts(text_side, p, init, init_text)
    return RiemannianSGD(norms, mu, p.kappa, beta=p.dti_beta)


def _padamw(text_side, p: MethodParams, init, init_text=None) -> VectorOptimizer:
    norms, mu = _directional_parts(text_side, p, init, init_text)
    return ProjectedAdamW(norms, mu, p.kappa)


@dataclass(frozen=True)
class Preset:
    """A named method: a timestep strategy, an optimiser and the step size that optimiser runs at."""

    timesteps: str  # uniform | interval | single | high_grad | adaptive | logit_normal (tables, the demo)
    optimizer: type  # the optimiser class; its ``default_lr`` is the preset's learning rate
    description: str  # one line, shown in the node's description
    make_sampler: SamplerFactory
    make_optimizer: OptimizerFactory

    @property
    def lr(self) -> float:
        return self.optimizer.default_lr

    @property
    def needs_profile(self) -> bool:
        return self.timesteps == "high_grad"


PRESETS: dict[str, Preset] = {
    "vanilla": Preset("uniform", AdamW, "Textual inversion as published: t ~ U[0, T), AdamW.", _uniform, _adamw),
    "interval": Preset("interval", AdamW, "t ~ U[a, b] (seeds/000 baselines: [900,1000], [0,100], [350,450]).",
                       _interval, _adamw),
    "single_step": Preset("single", AdamW, "Always the same t (seeds/000: t = 400 alone can invert).",
                          _single, _adamw),
    "high_grad": Preset("high_grad", AdamW, "Train on the window where the profiled g(t) is highest (seeds/000).",
                        _high_grad, _adamw),
    "adaptive": Preset("adaptive", AdamW, "t ~ PDF(g(t)) with g measured during training (seeds/000 Eq. 5).",
                       _adaptive, _adamw),
    "logit_normal": Preset("logit_normal", AdamW, "t/T ~ logit-normal(0, 1), the density SD3 was trained with "
                           "(Esser et al. 2024).", _logit_normal, _adamw),
    "directional": Preset("uniform", RiemannianSGD,
                          "DTI: fixed norm, Riemannian SGD on the sphere, vMF prior (seeds/002).", _uniform, _rsgd),
    "directional_adamw": Preset("uniform", ProjectedAdamW, "DTI's ablation: AdamW then projection to the fixed norm.",
                                _uniform, _padamw),
    "adaptive_directional": Preset("adaptive", RiemannianSGD, "Adaptive timesteps with DTI's optimiser.",
                                   _adaptive, _rsgd),
    "high_grad_directional": Preset("high_grad", RiemannianSGD, "High-grad window with DTI's optimiser.",
                                    _high_grad, _rsgd),
}

# The method a run gets when it names none (the node's, the demo's, the command line's): t ~ g(t) with g
# w.r.t. the learned rows. On the miniature world it is never behind vanilla, ahead at AdamW 2e-3 on both
# tasks and level or leaning ahead at the node's settings (README, "What held"); its edge is speed.
DEFAULT_METHOD = "adaptive"


@dataclass
class Method:
    name: str
    sampler: TimestepSampler
    optimizer: VectorOptimizer
    lr: float
    description: str


def describe_presets() -> str:
    return "\n".join(f"{k}: {v.description}" for k, v in PRESETS.items())


def build_method(name: str, text_side, num_timesteps: int, params: MethodParams = MethodParams(), *,
                 profile=None, init_vectors: dict[str, torch.Tensor] | None = None,
                 init_text: str | None = None) -> Method:
    """The sampler and optimiser of preset ``name``.

    ``profile``: a ``GradProfile`` (needed by the high-grad presets; seeds the adaptive ones).
    ``init_vectors``: the run's initial ``{key: [K, d]}``: each row's own DTI prior direction.
    ``init_text``: the text the init was built from (its metadata's ``init_text``): tells which
    rows the class word stands for (``prior_directions``).
    """
    preset = PRESETS.get(name)
    if preset is None:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(PRESETS)}")
    try:
        sampler = preset.make_sampler(params, num_timesteps, profile)
    except ValueError as e:
        raise ValueError(f"method {name!r} {e}" if str(e).startswith("needs") else f"method {name!r}: {e}") from None
    optimizer = preset.make_optimizer(text_side, params, init_vectors, init_text)
    return Method(name, sampler, optimizer, preset.lr, preset.description)


def preset_names() -> Sequence[str]:
    return list(PRESETS)
