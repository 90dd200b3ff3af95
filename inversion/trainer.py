"""The textual-inversion training loop (Gal et al. 2022), with pluggable timesteps, optimiser and objective.

    v* = argmin_v E_{x, eps, t} || eps_theta(x_t, t, c_theta(y(v))) - eps ||^2      (seeds/000 Eq. 3)

(or the denoiser's own objective, v or rectified flow: ``host.Objective``). What is trained are
parameter groups (``groups.py``): the learned vectors, always, as one [K_total, d] leaf per encoder,
and any group a caller adds (a LoRA beside them), each with its own optimiser and schedule; the text
encoder(s) and the denoiser stay frozen, and their token tables never receive a gradient or an
optimiser state. Latents are encoded once (``concepts.prepare_concept``); each step encodes each
distinct prompt once; per-sample gradient norms of seeds/000 Eq. 4 fall out of the same backward pass
(``methods.g_reading``) and feed the adaptive timestep sampler, the callback and the history. With a
``replica`` several processes train one run together (``replica.py``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from .data.batch import ConceptSet, autocast, step_generator
from .concepts import ConceptData, prepare_concept  # noqa: F401 - also importable from here, as the README does
from .embedding import LearnedEmbedding
from .methods.g_reading import DEFAULT as DEFAULT_G_READING, check_profile_reading, check_reading, reading as g_reading_of
from .groups import ParamGroup, VectorGroup, check_groups
from .history import StepInfo, TrainHistory, TrainResult, TrainState
from .host import Conditioning, Denoiser, TextSide, is_trainable, step_context
from .methods.loss import draw_loss_terms, per_sample_mse
from .loss_scale import DynamicLossScale
from .methods.optim import AdamW, VectorOptimizer
from .replica import Replica
from .data.prompts import OBJECT_TEMPLATES, CaptionOptions, check_templates
from .methods.regularizers import RegContext, Regularizer
from .methods.score import DVAR_THRESHOLD, DVAR_WINDOW, ScoreConfig, check_score_settings, deterministic_score, dvar_ratio
from .methods.timesteps import TimestepSampler, Uniform, reads_gradients

__all__ = [
    "TrainConfig",
    "ConceptData",
    "DynamicLossScale",
    "prepare_concept",
    "StepInfo",
    "TrainHistory",
    "TrainResult",
    "TrainState",
    "Trainer",
    "TrainingDiverged",
    "lr_at",
]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one run. Defaults follow diffusers' / A1111's textual inversion unless noted."""

    steps: int = 500  # optimisation steps (each may accumulate several micro-batches)
    batch_size: int = 1  # images per micro-batch; B=1 is what most users can afford on SD
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float | None = None  # None = the optimiser's own default (AdamW 5e-3, DTI's Riemannian SGD 1e-2 rad)
    lr_schedule: str = "constant"  # constant | linear | cosine (after warm-up)
    warmup_steps: int = 0  # linear warm-up from 0, in optimiser steps
    templates: tuple[str, ...] = OBJECT_TEMPLATES  # "{}" becomes the placeholder
    flip: bool = True  # horizontal-flip augmentation, cached as extra latents
    seed: int = 0  # every random draw of step s derives from (seed, s): runs resume exactly
    checkpoint_every: int = 0  # 0 = never; else the checkpoint callback runs every N steps
    autocast_dtype: str | None = None  # "bf16" / "fp16" on GPU; None = the models' own dtype
    # "dynamic": the loss is scaled before backward and unscaled after; a step whose gradient
    # overflows is skipped and the scale halved, and it doubles after a run of good steps (fp16)
    loss_scale: str = "none"
    captions: CaptionOptions = CaptionOptions()  # per-image captions: shuffle and dropout
    max_grad_norm: float = 0.0  # 0 = off; else clip the vectors' gradient norm
    # Divergence guard, in multiples of the largest token-table norm of each encoder (0 = off). Real
    # words lie at 0.3-0.6 (SD1.5 clip_l); AdamW's norm inflation (DTI's motivation) reaches 2-3x
    # that in a normal run (the miniature world: 1.1-1.2 against 0.59), so 8x is far outside any
    # run we measured; 50x means the step size is wrong (lr 10 gives ~1000x after a few steps).
    norm_warn: float = 8.0  # warn once: the vectors have left the vocabulary's range
    norm_stop: float = 50.0  # stop; keep the last vectors that were within norm_warn
    # What seeds/000 Eq. 4's g (the adaptive sampler's signal) differentiates: "context" = the text
    # encoder's output c (as Eq. 4 is written; free from the step's backward), "tokens" = the learned
    # rows (encodes each sample's prompt on its own copy of the rows; only samplers that read g pay it).
    g_reading: str = DEFAULT_G_READING
    # A deterministic score (``score.py``: the loss on fixed draws) every N steps; 0 = off, because
    # each costs ScoreConfig.draws forward passes per concept. Needed by early_stop and keep = "best".
    score_every: int = 0
    early_stop: bool = False  # DVAR's rule on the scores; off until runs show it safe (issue 14)
    dvar_window: int = DVAR_WINDOW  # in evaluations (= steps when score_every = 1, the paper's cadence)
    dvar_threshold: float = DVAR_THRESHOLD  # the paper's TI setting
    keep: str = "last"  # "best": the run's file holds the lowest-score step's vectors; "last": the last step's
    # Several concepts: sample j of a micro-batch comes from concept j mod N, so batch_size = b x N gives each
    # concept exactly b draws per micro-batch (``ConceptSet``, one bucket); False draws rows uniformly.
    balance_concepts: bool = False

    def validate(self) -> "TrainConfig":
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}; set how many optimisation steps to run")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be a positive number, got {self.lr}")
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"lr_schedule must be constant, linear or cosine, got {self.lr_schedule!r}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0:
            raise ValueError("warmup_steps and checkpoint_every must be >= 0")
        if self.norm_warn < 0 or self.norm_stop < 0 or (self.norm_warn and self.norm_stop
                                                        and self.norm_stop < self.norm_warn):
            raise ValueError(f"norm_warn ({self.norm_warn}) and norm_stop ({self.norm_stop}) must be >= 0 "
                             "(0 = off), with norm_stop >= norm_warn")
        if self.loss_scale not in ("none", "dynamic"):
            raise ValueError(f"loss_scale must be 'none' or 'dynamic', got {self.loss_scale!r}")
        self.captions.validate()
        if self.autocast_dtype not in (None, "bf16", "fp16"):
            raise ValueError(f"autocast_dtype must be None, 'bf16' or 'fp16', got {self.autocast_dtype!r}")
        check_templates(self.templates)
        check_reading(self.g_reading)
        check_score_settings(self.score_every, self.early_stop, self.dvar_window, self.dvar_threshold, self.keep)
        return self


def lr_at(config: TrainConfig, step: int, default: float = AdamW.default_lr) -> float:
    """Learning rate at optimiser step ``step`` (0-based): linear warm-up, then the schedule.

    ``default`` stands in for ``config.lr = None`` (the optimiser's own rate)."""
    lr = config.lr if config.lr is not None else default
    if config.warmup_steps and step < config.warmup_steps:
        return lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    frac = min(1.0, (step - config.warmup_steps) / span)
    if config.lr_schedule == "linear":
        return lr * (1.0 - frac)
    if config.lr_schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    return lr


class TrainingDiverged(ValueError):
    """The loss became NaN or inf, or the vectors exploded. ``embeddings`` holds the last good vectors."""

    def __init__(self, message: str, embeddings: list[LearnedEmbedding]):
        super().__init__(message)
        self.embeddings = embeddings


def _max_row_norm(table: torch.Tensor, chunk: int = 8192) -> float:
    # In chunks: a float32 copy of SDXL's clip_g table at once would be 250 MB.
    t = table.detach()
    return max(float(t[i:i + chunk].float().norm(dim=-1).max()) for i in range(0, t.shape[0], chunk))


class Trainer:
    """Learns the vectors of one or several concepts against a frozen text-to-image model.

    Several concepts train together in one table of vectors (each prompt names one concept),
    which is what lets the contrastive regulariser use the others as negatives.
    """

    def __init__(self, text: TextSide, denoiser: Denoiser, concepts: Sequence[ConceptData],
                 config: TrainConfig = TrainConfig(), *, timesteps: TimestepSampler | None = None,
                 optimizer: VectorOptimizer | None = None, regularizers: Sequence[Regularizer] = (),
                 device: torch.device | str | None = None, resume: TrainState | None = None,
                 checkpoint: Callable[["Trainer"], None] | None = None, metadata: Mapping[str, str] | None = None,
                 snapshot: Callable[["Trainer"], None] | None = None, groups: Sequence[ParamGroup] = (),
                 replica: Replica | None = None):
        self.config = config.validate()
        self.replica = replica  # data-parallel: this process's share of every micro-batch (``replica.py``)
        if replica is not None and self.config.batch_size % replica.world_size:
            raise ValueError(f"batch_size {self.config.batch_size} cannot be shared evenly by {replica.world_size} "
                             f"processes; use a multiple of {replica.world_size} (the global batch)")
        self.text = text
        self.denoiser = denoiser
        self.data = ConceptSet(text, concepts, self.config.templates, device, self.config.captions,
                               balanced=self.config.balance_concepts)
        self.concepts = self.data.concepts
        self.rows = self.data.rows
        self.device = self.data.device
        self.sampler = timesteps or Uniform(denoiser.num_timesteps)
        if self.sampler.num_timesteps != denoiser.num_timesteps:
            raise ValueError(f"timestep sampler is for T={self.sampler.num_timesteps} but the model has "
                             f"T={denoiser.num_timesteps}")
        check_profile_reading(getattr(self.sampler, "profile_reading", None), self.config.g_reading)
        # The run's reading of Eq. 4 where the sampler reads g; else the free context reading, recorded only
        # (the tokens reading encodes once per sample: only a sampler that reads g pays for it).
        self.reading = g_reading_of(self.config.g_reading if reads_gradients(self.sampler) else "context")
        self.optimizer = optimizer or AdamW()
        self.lr = self.config.lr if self.config.lr is not None else self.optimizer.default_lr
        self.regularizers = list(regularizers)
        self.checkpoint_fn = checkpoint
        self.snapshot_fn = snapshot  # called after each score, with ``history.score[-1]`` that step's
        self.score_config = ScoreConfig(every=self.config.score_every).validate()
        self.metadata = dict(metadata or {})
        self.tables = {e.key: e.token_table() for e in text.encoders}
        # The largest word norm per encoder: the divergence guard's unit.
        self.vocab_norm = {k: _max_row_norm(t) for k, t in self.tables.items()}
        # The only trainable tensors: one [K_total, d] leaf per encoder that learns. A frozen encoder's rows
        # (``trainable = False``, e.g. T5 beside SD3's or Flux's CLIPs) stay at their initial values.
        start = self.data.initial_vectors()
        frozen = {e.key for e in text.encoders if not is_trainable(e)}
        if frozen >= set(start):
            raise ValueError(f"every text encoder ({', '.join(start)}) is frozen: nothing would learn; let at "
                             "least one encoder train its vectors")
        self.frozen = {k: v for k, v in start.items() if k in frozen}
        self.params = {k: v.requires_grad_(True) for k, v in start.items() if k not in frozen}
        self.initial = self.data.initial_vectors()  # v0 for regularisers that pull back toward the init
        self.history = TrainHistory()
        self.step = 0
        self.scaler = DynamicLossScale() if self.config.loss_scale == "dynamic" else None
        # What the run trains: the vectors, and any further groups (``groups.py``), each stepped in turn.
        self.vectors = VectorGroup(self.params, self.optimizer, lambda step: lr_at(self.config, step, self.lr),
                                   self.config.max_grad_norm)
        self.extra_groups = list(groups)
        self.groups = [self.vectors, *self.extra_groups]
        check_groups(self.groups)
        if resume is not None:
            self._load_state(resume)
        else:
            self.optimizer.prepare(self.params)
        self._good = {k: v.detach().clone() for k, v in self.params.items()}
        self._good_groups = {g.name: g.snapshot() for g in self.extra_groups}  # the other groups' last good step
        # The last vectors within ``norm_warn`` of the vocabulary (and the other groups' parameters of that
        # step): what an exploding run falls back to.
        self._sane = (self.step, {k: v.clone() for k, v in self._good.items()}, len(self.history.step),
                      {n: dict(v) for n, v in self._good_groups.items()})
        self._warned: set[str] = set()
        self._optimizer_stale = False
        self._concept_sum = torch.zeros(len(self.concepts), dtype=torch.float64)  # this step's, per concept
        self._concept_n = torch.zeros(len(self.concepts), dtype=torch.long)
        self._fixed = None  # ((draws, seed), the evaluation set): drawn once, on the first evaluation

    # ---- state -------------------------------------------------------------------------------
    def all_vectors(self) -> dict[str, torch.Tensor]:
        """Every encoder's rows: the learned leaves, and a frozen encoder's constant initial rows."""
        return {**self.frozen, **self.params} if self.frozen else self.params

    def embeddings(self) -> list[LearnedEmbedding]:
        """The last good vectors of every concept (never a NaN step's), as detached embeddings."""
        out = []
        good = {**self.frozen, **self._good}
        for c, r in zip(self.concepts, self.rows):
            vec = {k: good[k][r.start:r.stop].detach().cpu().float().clone() for k in self.data.initial_keys()}
            meta = dict(c.embedding.metadata)
            meta.update(self.metadata)
            meta.update({"steps": str(self.step), "seed": str(self.config.seed),
                         "timesteps": self.sampler.describe(), "optimizer": type(self.optimizer).__name__})
            out.append(LearnedEmbedding(c.embedding.name, vec, c.embedding.placeholder, meta))
        return out

    def state(self) -> TrainState:
        # After a roll-back to earlier vectors the optimiser's moments belong to later steps: a resumed
        # run restarts the optimiser rather than continue with them.
        opt = {} if self._optimizer_stale else self.optimizer.state_dict()
        if self.scaler is not None:  # beside the optimiser's own keys: a checkpoint's layout is unchanged
            opt = {**opt, **self.scaler.state_dict()}
        groups = {g.name: {**{f"param.{k}": v.detach().cpu().clone() for k, v in self._good_groups[g.name].items()},
                           **({} if self._optimizer_stale else {f"state.{k}": v for k, v in g.state_dict().items()})}
                  for g in self.extra_groups}
        return TrainState(self.step, {k: v.detach().cpu().clone() for k, v in self._good.items()},
                          opt, self.sampler.state_dict(),
                          TrainHistory.from_dict(self.history.to_dict()), groups)

    def _load_state(self, s: TrainState) -> None:
        if set(s.vectors) != set(self.params):
            raise ValueError(f"resume state has vectors for {sorted(s.vectors)}, this run trains {sorted(self.params)}")
        for k, v in s.vectors.items():
            if v.shape != self.params[k].shape:
                raise ValueError(f"resume state: {k} vectors are {tuple(v.shape)}, expected {tuple(self.params[k].shape)}")
            with torch.no_grad():
                self.params[k].copy_(v.to(self.device))
        if s.step >= self.config.steps:
            raise ValueError(f"the checkpoint is already at step {s.step} of {self.config.steps}; "
                             "raise steps to continue training")
        self.step = s.step
        opt = dict(s.optimizer)
        scaler = {k: opt.pop(k) for k in list(opt) if k.startswith(DynamicLossScale.PREFIX)}
        if self.scaler is not None:
            self.scaler.load_state_dict(scaler)
        if not opt:  # resumed from an embedding alone: the optimiser starts fresh
            self.optimizer.prepare(self.params)
        self.optimizer.load_state_dict(opt)
        self.sampler.load_state_dict(s.sampler)
        self.history = s.history
        self._load_groups(s.groups)

    def _load_groups(self, saved: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """The other groups' parameters and state from a checkpoint; a group it lacks starts fresh (a resume
        from an embedding file alone), a group it has that this run does not train is an error."""
        mine = {g.name: g for g in self.extra_groups}
        unknown = sorted(set(saved) - set(mine))
        if unknown:
            raise ValueError(f"resume state has parameter groups {unknown} that this run does not train "
                             f"({sorted(mine) or 'only the vectors'}); train with the same groups to resume it")
        for name, entries in saved.items():
            g = mine[name]
            params = {k[len("param."):]: v for k, v in entries.items() if k.startswith("param.")}
            if set(params) != set(g.parameters()):
                raise ValueError(f"resume state: group {name!r} has parameters {sorted(params)}, this run's has "
                                 f"{sorted(g.parameters())}")
            g.restore({k: v.to(g.parameters()[k].device) for k, v in params.items()})
            g.load_state_dict({k[len("state."):]: v for k, v in entries.items() if k.startswith("state.")})

    # ---- one step ----------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Encode each distinct prompt once with the current vectors; rows follow ``prompts``."""
        return self.data.encode(prompts, self.all_vectors())

    def _micro_step(self, gen: torch.Generator, scale: float, loss_scale: float = 1.0):
        d = self.data.draw(gen, self.config.batch_size, self.sampler.sample)
        t_all = d.t
        if self.replica is not None:
            d = self.replica.shard(d)
        with autocast(self.device, self.config.autocast_dtype):
            cond, handle = self.reading.encode(self.data, d.prompts, self.all_vectors())
            pred, target = draw_loss_terms(self.denoiser, d, cond)
        per, n_eff = per_sample_mse(pred, target, d.mask)
        loss = per.mean()
        seen = loss.detach() if self.replica is None else self._replica_mean(loss.detach())  # the same on every process
        if not torch.isfinite(seen):
            return None, t_all, d.prompts
        self._tally_concepts(per.detach(), d.idx)
        (loss * scale if loss_scale == 1.0 else loss * (scale * loss_scale)).backward(retain_graph=False)
        g = self.reading.norms(handle, per.detach(), n_eff, len(per) / (scale * loss_scale))
        if self.replica is not None:
            g = self.replica.gather(g.detach())
        return (seen, g.cpu()), t_all, d.prompts

    def _replica_mean(self, value: torch.Tensor) -> torch.Tensor:
        v = value.float().reshape(1).clone()
        self.replica.average([v])
        return v[0]

    def _tally_concepts(self, per: torch.Tensor, idx: torch.Tensor) -> None:
        """Add a micro-batch's per-sample losses to its concepts' sums (runs of several concepts only)."""
        if len(self.concepts) < 2:
            return
        owner = self.data.concept_of(idx).to(per.device)
        n = len(self.concepts)
        self._concept_sum += torch.zeros(n, device=per.device).index_add_(0, owner, per.float()).cpu()
        self._concept_n += torch.bincount(owner.cpu(), minlength=n)

    def _concept_report(self) -> dict[str, Any]:
        """``StepInfo``'s per-concept fields for the step just done (nothing with one concept)."""
        if len(self.concepts) < 2:
            return {}
        loss = [float(s / c) if c else None for s, c in zip(self._concept_sum.tolist(), self._concept_n.tolist())]
        norms = []
        for r in self.rows:
            x = [float(n) for v in self.params.values() for n in v.detach()[r.start:r.stop].float().norm(dim=-1)]
            norms.append(sum(x) / len(x))
        return {"concept_loss": loss, "concept_norms": norms}

    def _reg_loss(self) -> torch.Tensor | None:
        active = [r for r in self.regularizers if r.weight]
        if not active:  # none, or all at weight 0 (a Python 0 is no tensor)
            return None
        ctx = RegContext(self.tables, self.rows, self.initial)
        return sum(r(self.params, ctx) for r in active)

    def _all_params(self):
        """Every trainable tensor of every group."""
        return [p for g in self.groups for p in g.parameters().values()]

    def _grads_finite(self) -> bool:
        return not any(p.grad is not None and not torch.isfinite(p.grad).all() for p in self._all_params())

    def _clip(self) -> None:
        for g in self.groups:
            if g.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for p in g.parameters().values() if p.grad is not None],
                                               g.max_grad_norm)

    def train_step(self) -> StepInfo:
        """One optimiser step (``grad_accum`` micro-batches). Raises ``TrainingDiverged`` on NaN/inf.

        With dynamic loss scaling a NaN/inf loss or gradient skips the step instead (``StepInfo.skipped``)."""
        cfg = self.config
        for p in self._all_params():
            p.grad = None
        self._concept_sum = torch.zeros(len(self.concepts), dtype=torch.float64)
        self._concept_n = torch.zeros(len(self.concepts), dtype=torch.long)
        losses, gs, ts = [], [], []
        scale = 1.0 / cfg.grad_accum
        loss_scale = self.scaler.scale if self.scaler is not None else 1.0
        for micro in range(cfg.grad_accum):
            gen = step_generator(cfg.seed, self.step, micro)
            with step_context(self.denoiser):
                res, t, prompts = self._micro_step(gen, scale, loss_scale)
            if res is None:
                if self.scaler is not None:
                    return self._skip_step("loss", losses, ts + [t])
                raise self._diverged(f"the loss became NaN/inf at step {self.step + 1} (timesteps {t.tolist()}, "
                                     f"prompts {prompts[:2]})")
            losses.append(float(res[0]))
            gs.append(res[1])
            ts.append(t)
        if self.replica is not None:  # the global batch's gradient: the mean of the processes' shards'
            self.replica.average([p.grad for p in self._all_params() if p.grad is not None])
        if self.scaler is not None:
            if not all(bool(torch.isfinite(g).all()) for g in gs) or not self._grads_finite():
                return self._skip_step("gradient", losses, ts)
            for p in self._all_params():
                if p.grad is not None:
                    p.grad.div_(loss_scale)
        reg = self._reg_loss()
        reg_val = 0.0
        if reg is not None:
            if not torch.isfinite(reg):
                raise self._diverged(f"a regulariser became NaN/inf at step {self.step + 1}")
            reg.backward()
            reg_val = float(reg.detach())
        if not self._grads_finite():
            raise self._diverged(f"the gradient became NaN/inf at step {self.step + 1}")
        t_all, g_all = torch.cat(ts), torch.cat(gs)
        self.sampler.observe(t_all, g_all)
        self._clip()
        lrs = {g.name: g.step(self.step) for g in self.groups}
        for g in self.groups:
            if not all(torch.isfinite(p).all() for p in g.parameters().values()):
                raise self._diverged(f"the {g.name} became NaN/inf after step {self.step + 1}")
        self.step += 1
        for k, v in self.params.items():
            self._good[k].copy_(v.detach())
        for g in self.extra_groups:
            self._good_groups[g.name] = g.snapshot()
        warnings = self._guard_norms()
        if self.scaler is not None:
            self.scaler.update(True)
        return self._step_info(loss=sum(losses) / len(losses), reg_loss=reg_val, lr=lrs["vectors"],
                               timesteps=t_all.tolist(), grad_norms=g_all.tolist(), grad_norm=float(g_all.mean()),
                               warnings=warnings, loss_scale=None if self.scaler is None else self.scaler.scale,
                               group_lrs=lrs)

    def _step_info(self, group_lrs: Mapping[str, float] | None = None, **fields) -> StepInfo:
        """The step just done as plain data: ``fields`` plus what every report carries (the vectors'
        norms, the sampler's and the vector optimiser's reports; each other group's report and rate)."""
        fields = {**self._concept_report(), **fields}
        if self.extra_groups:
            fields["groups"] = {g.name: {**g.report(), "lr": (group_lrs or {}).get(g.name, 0.0)}
                                for g in self.extra_groups}
        return StepInfo(step=self.step, total=self.config.steps, elapsed=0.0, sampler=self.sampler.describe(),
                        vector_norms={k: v.detach().float().norm(dim=-1).tolist() for k, v in self.params.items()},
                        **fields, **self.sampler.report(), **self.vectors.report())

    def _restore_good(self) -> None:
        """Put the last good step (``_good``, ``_good_groups``) back into every group's parameters."""
        self.vectors.restore(self._good)
        for g in self.extra_groups:
            g.restore(self._good_groups[g.name])

    def _skip_step(self, what: str, losses: list[float], ts: list[torch.Tensor]) -> StepInfo:
        """Dynamic loss scaling: the ``what`` ("loss" / "gradient") overflowed, so the step changes
        nothing (no optimiser step, no sampler observation), counts as done, and the scale halves."""
        cfg = self.config
        for p in self._all_params():
            p.grad = None
        used = self.scaler.scale
        self.scaler.update(False)
        precision = cfg.autocast_dtype or "reduced precision"
        if self.scaler.skips >= self.scaler.max_skips:
            self._restore_good()
            raise TrainingDiverged(
                f"the {what} overflowed ({precision}: NaN/inf) in {self.scaler.skips} steps in a row, up to step "
                f"{self.step + 1}, although dynamic loss scaling lowered the scale to {self.scaler.scale:g}: this "
                f"model's values exceed fp16's range here. Training stopped; the last good vectors (step {self.step}) "
                "are kept. Train in bf16 (where the GPU has it) or fp32 (precision in Training Options), or lower "
                f"the learning rate (now {self.lr:g}).", self.embeddings())
        lr = lr_at(cfg, self.step, self.lr)
        self.step += 1
        warnings = []
        if "loss_scale" not in self._warned:
            self._warned.add("loss_scale")
            warnings.append(
                f"step {self.step} was skipped: its {what} overflowed in {precision} at loss scale {used:g}, so the "
                f"vectors were left unchanged and the scale lowered to {self.scaler.scale:g}. A few such steps at "
                "the start of an fp16 run are normal (the scale finds its level); many mean fp16 is too narrow "
                "for this model: train in bf16 or fp32.")
        warnings += self._guard_norms()
        t_all = torch.cat(ts)
        finite = [x for x in losses if math.isfinite(x)]
        loss = sum(finite) / len(finite) if finite else (self.history.loss[-1] if self.history.loss else 0.0)
        return self._step_info(loss=loss, reg_loss=0.0, lr=lr, timesteps=t_all.tolist(),
                               grad_norms=[0.0] * len(t_all), grad_norm=0.0, warnings=warnings, skipped=True,
                               loss_scale=self.scaler.scale)

    def norm_ratio(self) -> tuple[float, str]:
        """The largest learned-vector norm over the largest word norm, and the encoder it is in."""
        return max((float(v.detach().float().norm(dim=-1).max()) / max(self.vocab_norm[k], 1e-12), k)
                   for k, v in self._good.items())

    def _guard_norms(self) -> list[str]:
        """Warn once when the vectors leave the vocabulary's range; stop when they explode.

        A vector many times longer than any word dominates the prompt's attention, so the concept
        ignores the rest of the prompt, and at ``norm_stop`` x the run has clearly diverged (a
        learning rate far too high): the vectors roll back to the last step within ``norm_warn``.
        """
        cfg = self.config
        if not (cfg.norm_warn or cfg.norm_stop):
            return []
        ratio, key = self.norm_ratio()
        unit = self.vocab_norm[key]
        if cfg.norm_stop and ratio > cfg.norm_stop:
            step, vectors, hist_len, others = self._sane
            with torch.no_grad():
                for k, v in self.params.items():
                    v.copy_(vectors[k])
                    self._good[k].copy_(vectors[k])
            for g in self.extra_groups:
                g.restore(others[g.name])
                self._good_groups[g.name] = g.snapshot()
            bad_step = self.step
            self.step = step
            self.history = self.history.upto(hist_len)
            self._optimizer_stale = True
            raise TrainingDiverged(
                f"the vectors exploded: after step {bad_step} a {key} vector's norm is {ratio * unit:.3g}, "
                f"{ratio:.0f} times the largest word's ({unit:.3g}). Training stopped; the vectors of step {step}, "
                f"the last within {cfg.norm_warn:g}x, are kept. Lower the learning rate (now {self.lr:g}) "
                "or use a directional method (its norm is fixed).", self.embeddings())
        if not cfg.norm_warn or ratio <= cfg.norm_warn:
            self._sane = (self.step, {k: v.clone() for k, v in self._good.items()}, len(self.history.step) + 1,
                          {n: dict(v) for n, v in self._good_groups.items()})
            return []
        if "norm" in self._warned:
            return []
        self._warned.add("norm")
        return [f"after step {self.step} a {key} vector's norm is {ratio * unit:.3g}, {ratio:.1f} times the "
                f"largest word's ({unit:.3g}): the concept may drown out the rest of the prompt. Consider a lower "
                f"learning rate (now {self.lr:g}), fewer steps, or a directional method."]

    def _diverged(self, what: str) -> TrainingDiverged:
        self._restore_good()
        return TrainingDiverged(
            f"{what}. Training stopped; the last good vectors (step {self.step}) are kept. "
            f"Lower the learning rate (now {self.lr:g}), use fp32 instead of "
            f"{self.config.autocast_dtype or 'the current precision'}, or check the concept images.",
            self.embeddings())

    @torch.no_grad()
    def evaluate(self, draws: int = 4, seed: int = 12345) -> float:
        """The training loss (masked where the concept has masks) averaged over a fixed set of ``draws``
        draws per concept (images, prompts, t, noise; ``ConceptSet.fixed_draws``) that depends only on
        ``seed``, not on the run's batch size: a low-variance measure for comparing vectors across a run."""
        key = (draws, seed)
        if self._fixed is None or self._fixed[0] != key:
            n = draws * len(self.concepts)
            self._fixed = key, self.data.fixed_draws(n, seed, self.denoiser.num_timesteps, self.config.batch_size)
        total, count = 0.0, 0
        for d in self._fixed[1]:
            with autocast(self.device, self.config.autocast_dtype):
                pred, target = draw_loss_terms(self.denoiser, d, self.encode_prompts(d.prompts))
            per, _ = per_sample_mse(pred, target, d.mask)
            total += float(per.double().sum())
            count += len(per)
        return total / count

    # ---- the loop ----------------------------------------------------------------------------
    def run(self, callback: Callable[[StepInfo], Any] | None = None) -> TrainResult:
        """Train until ``config.steps``. ``callback(info)`` returning False stops early (gracefully);
        an exception from it propagates and ``embeddings()`` still gives the last good vectors.

        With ``score_every`` the vectors are scored on fixed draws (``score.py``), the ``snapshot``
        callback runs after each score, and ``early_stop`` ends the run gracefully when DVAR's rule
        fires on the scores so far (``TrainResult.stop_step`` / ``stop_reason``)."""
        t0 = time.perf_counter()
        cfg = self.config
        stopped, stop_step, stop_reason = False, None, ""
        while self.step < cfg.steps:
            info = self.train_step()
            scored = self._due_score()
            if scored:  # the fixed draws: no random state of training is touched, so its steps are unchanged
                info.score = deterministic_score(self, self.score_config)
            info.elapsed = time.perf_counter() - t0
            self.history.append(info)
            if scored and self.snapshot_fn:
                self.snapshot_fn(self)
            if scored and cfg.early_stop and self.step < cfg.steps:
                ratio = dvar_ratio(self.history.score, cfg.dvar_window)
                if ratio is not None and ratio < cfg.dvar_threshold:
                    stop_step = self.step
                    stop_reason = info.stop_reason = (
                        f"DVAR early stop at step {self.step}: the variance of the last {cfg.dvar_window} scores "
                        f"is {ratio:.3g} of all {len(self.history.score)} scores' (threshold {cfg.dvar_threshold:g})")
            if self.checkpoint_fn and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 \
                    and self.step < cfg.steps and stop_step is None:
                self.checkpoint_fn(self)
            if callback is not None and callback(info) is False:
                stopped = self.step < cfg.steps
                break
            if stop_step is not None:
                stopped = True
                break
        return TrainResult(self.embeddings(), self.history, self.step, stopped, stop_step, stop_reason)

    def _due_score(self) -> bool:
        """Score after every ``score_every`` steps, and after the last step (so ``keep = "best"`` sees it)."""
        every = self.score_config.every
        return bool(every) and (self.step % every == 0 or self.step >= self.config.steps)
