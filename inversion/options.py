"""``TrainingOptions``: everything a run can set beyond what every run needs, declared once.

Each field is one option: its default, and (``option``) the tooltip, range and choices the node
layer's Training Options node shows for it. The node's inputs are these fields in this order (saved
workflows store widget values by position, so a new option is appended at the end); the node builds
the dataclass from its widgets by name; ``train_config`` hands every field whose name is a
``TrainConfig`` field to the run, and ``method`` / ``captions`` group the method parameters and the
caption options for the parts of the library that take them. A new option is one field here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Sequence

from .methods.g_reading import DEFAULT as DEFAULT_G_READING, G_READINGS, check_reading
from .methods.presets import MethodParams
from .methods.regularizers import L2Norm, L2ToInit, contrastive
from .data.prompts import OBJECT_TEMPLATES, STYLE_TEMPLATES, CaptionOptions, check_templates
from .methods.score import DVAR_THRESHOLD, DVAR_WINDOW, KEEP, ScoreConfig, check_score_settings
from .trainer import TrainConfig

__all__ = ["TrainingOptions", "PRECISIONS", "LR_SCHEDULES", "TEMPLATE_SETS", "option", "widget_fields"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "linear", "cosine")
TEMPLATE_SETS = ("object", "style", "custom")

_M = MethodParams()
_C = CaptionOptions()
_S = ScoreConfig()


def option(default: Any, tooltip: str, *, min: float | None = None, max: float | None = None,
           step: float | None = None, round: bool | None = None, choices: Sequence[str] | None = None,
           multiline: bool = False, widget: bool = True):
    """A ``TrainingOptions`` field with what a UI shows for it (plain data; no UI is imported here).
    ``widget=False``: an option of the library only, not shown on the node."""
    meta = {"tooltip": tooltip, "widget": widget, "multiline": multiline}
    for k, v in (("min", min), ("max", max), ("step", step), ("round", round),
                 ("choices", None if choices is None else tuple(choices))):
        if v is not None:
            meta[k] = v
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainingOptions:
    """Method parameters, schedule, regularisers, augmentation, captions, cadence, precision, memory,
    score. The widgets' order is the fields' order: append new ones at the end."""

    interval_start: int = option(_M.interval[0], "interval method: first timestep (paper baselines 0, 350, 900).",
                                 min=0, max=999)
    interval_end: int = option(_M.interval[1], "interval method: last timestep (paper baselines 100, 450, 999).",
                               min=0, max=999)
    single_t: int = option(_M.single_t, "single_step method: the timestep (paper: 400).", min=0, max=999)
    window: int = option(_M.window, "high_grad methods: width of the interval around the highest g(t).",
                         min=1, max=1000)
    adaptive_bins: int = option(_M.bins, "adaptive methods: timestep bins of the running g(t) estimate.",
                                min=1, max=1000)
    kappa: float = option(_M.kappa, "directional methods: strength of the vMF prior toward each vector's prior "
                          "direction.", min=0.0, max=1.0, step=1e-5, round=False)
    class_word: str = option(
        _M.class_word,
        "directional methods: the class word, e.g. 'dog', whose direction the vMF prior pulls toward. Every other "
        "vector is pulled toward its own initial token. It applies to the init's vectors whose tokens are the class "
        "word's (the 'toy' of 'a red toy'); if the init text does not contain it, to the last vector (the head noun), "
        "or the only one; if the vectors are not the init text's tokens (a word repeated, random), to all of them. "
        "Empty = the init's class word (Caption Init), else no class word: each vector keeps its own initial "
        "direction.")
    l2_weight: float = option(0.0, "L2 penalty on the vectors' norm (seeds/003); 0 = off.",
                              min=0.0, max=10.0, step=1e-5, round=False)
    contrastive_weight: float = option(
        0.0, "Nearest-neighbour contrast (seeds/003 Eq. 2). A run of one concept: the vocabulary contrast, an "
        "adaptation of Eq. 2: pulls each vector toward its 5 nearest real tokens against the rest of the vocabulary "
        "(cosine, tau 0.07). A run of several concepts (Add Concept nodes on the trainer's concepts input): Eq. 2 "
        "itself, the 5 nearest tokens against the other concepts' vectors (dot products, tau 0.07); 0 = off.",
        min=0.0, max=10.0, step=1e-4, round=False)
    # TI's published runs use a constant rate
    lr_schedule: str = option("constant", "Learning rate after warm-up: constant, or decaying linearly / on a "
                              "cosine to 0 at the last step.", choices=LR_SCHEDULES)
    warmup_steps: int = option(0, "Steps of linear warm-up from 0 to the learning rate.", min=0, max=100000)
    grad_accum: int = option(1, "Micro-batches per step: an effective batch of batch_size x grad_accum without its "
                             "memory (each step costs grad_accum forward/backward passes).", min=1, max=64)
    max_grad_norm: float = option(0.0, "Clip the vectors' gradient norm to this; 0 = off.",
                                  min=0.0, max=100.0, step=0.01)
    flip: bool = option(True, "Also train on mirrored images (off for text or asymmetric concepts).")
    templates: str = option("object", "Prompts the concept is trained in: object ('a photo of a {}', ...), style "
                            "('a painting in the style of {}', ...) or your own below. Images with a caption file use "
                            "their caption instead.", choices=TEMPLATE_SETS)
    custom_templates: str = option("a photo of {}", "templates = custom: one prompt per line, '{}' where the concept "
                                   "goes ('{{' and '}}' for literal braces).", multiline=True)
    caption_shuffle: bool = option(_C.shuffle, "Per-image captions (image.txt): shuffle their comma-separated parts "
                                   "each time, after the first caption_keep parts.")
    caption_keep: int = option(_C.keep, "Leading comma-separated caption parts that stay in place when shuffling.",
                               min=0, max=64)
    caption_dropout: float = option(_C.dropout, "Chance that a step uses a template instead of an image's caption.",
                                    min=0.0, max=1.0, step=0.01)
    checkpoint_every: int = option(100, "Save the embedding and the run state every N steps (0 = only at the end). "
                                   "While an existing file is being overwritten, checkpoints go to "
                                   "models/inversion_runs/<name> until the run completes.", min=0, max=100000)
    precision: str = option("auto", "auto: the model's own compute dtype (fp16 models train with dynamic loss "
                            "scaling, which skips a step whose gradient overflows). fp32 / bf16 / fp16: autocast to "
                            "that dtype on a GPU.", choices=PRECISIONS)
    gradient_checkpointing: bool = option(False, "Recompute the UNet's activations in the backward pass: much less "
                                          "memory (SDXL on 8-12 GB cards), slower steps.")
    l2_init_weight: float = option(
        0.0, "L2 pull of each vector back toward its initial vector, w * sum ||v - v0||^2 (seeds/003's tuning-phase "
        "regulariser, with the init as the encoder's prediction): keeps the concept near the init's words; 0 = off.",
        min=0.0, max=10.0, step=1e-4, round=False)
    score_every: int = option(
        0, "Score the vectors every N steps (0 = off): the training loss (masked as training masks it) on a fixed set "
        f"of {_S.draws} draws per concept (images, noise, timesteps; the same whatever the batch size), so the curve "
        f"is smooth and comparable across steps and runs. Each score costs {_S.draws} forward passes per concept "
        "(about one training step more at batch 1); the embedding of each scored step is kept in "
        "models/inversion_runs/<name>/snapshots. Needed by early_stop and keep = best.", min=0, max=100000)
    early_stop: bool = option(
        False, f"Stop when the score has flattened (DVAR, Voronov et al. 2023): the variance of the last {DVAR_WINDOW} "
        f"scores below {DVAR_THRESHOLD:g} of all scores'. Needs score_every (1 = the paper's cadence; with N > 1 it "
        f"waits for {DVAR_WINDOW} scores, N x {DVAR_WINDOW} steps). Off by default until runs show it safe; a stopped "
        "run completes normally and writes its embedding.")
    keep: str = option("last", "Which vectors <name>.safetensors holds when the run completes: last (the last step's) "
                       "or best (the scored step with the lowest score; needs score_every; its metadata names the "
                       "step). The run's state keeps the last step, so resume continues the run.", choices=KEEP)
    g_reading: str = option(
        DEFAULT_G_READING, "What seeds/000 Eq. 4's gradient norm g(t) is taken with respect to, for the adaptive "
        "sampler and the profiler: tokens (the learned vectors themselves, 'collected on the fly'; the default: "
        "never behind context on the miniature world, ahead in 1 of 4 measured cells: README, \"Which method?\") "
        "or context (the text encoder's output, "
        "cheaper: the encoder runs once per distinct prompt instead of once per image). A profile must be measured "
        "with the reading the run trains with.", choices=G_READINGS)
    train_t5: bool = option(
        False, "SD3 and Flux: T5-XXL learns its own rows of the concept too. Off (the default), only the CLIP encoders "
        "learn and T5 keeps the init text's rows (encoded once per prompt, so T5 costs nothing after the first "
        "steps); on, every step back-propagates through T5-XXL, much the largest part of the step. On Flux the "
        "context is T5's alone, so with T5 off the concept reaches the model only through CLIP-L's pooled vector. "
        "Ignored by SD1/SD2/SDXL.", widget=False)  # not on the node yet: its widget lands with the SD3/Flux examples
    # Not on the node: DVAR's published textual-inversion setting
    dvar_window: int = option(DVAR_WINDOW, "DVAR's window, in evaluations (steps when score_every = 1).", widget=False)
    dvar_threshold: float = option(DVAR_THRESHOLD, "DVAR's threshold on Var(last window) / Var(all).", widget=False)

    @property
    def method(self) -> MethodParams:
        """The method parameters (``presets.MethodParams``) these options set."""
        return MethodParams(interval=(self.interval_start, self.interval_end), single_t=self.single_t,
                            window=self.window, bins=self.adaptive_bins, kappa=self.kappa,
                            class_word=self.class_word.strip())

    @property
    def captions(self) -> CaptionOptions:
        return CaptionOptions(shuffle=self.caption_shuffle, keep=self.caption_keep, dropout=self.caption_dropout)

    def validate(self) -> "TrainingOptions":
        for f in widget_fields(type(self)):  # a choice outside its list, whatever built the options
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        if self.warmup_steps < 0 or self.grad_accum < 1 or self.checkpoint_every < 0 or self.max_grad_norm < 0:
            raise ValueError("warmup_steps, checkpoint_every and max_grad_norm must be >= 0, grad_accum >= 1")
        if self.l2_weight < 0 or self.contrastive_weight < 0 or self.l2_init_weight < 0:
            raise ValueError("l2_weight, contrastive_weight and l2_init_weight must be >= 0")
        if self.interval_start > self.interval_end:
            raise ValueError(f"interval_start ({self.interval_start}) must not exceed interval_end ({self.interval_end})")
        check_reading(self.g_reading)
        check_score_settings(self.score_every, self.early_stop, self.dvar_window, self.dvar_threshold, self.keep)
        self.captions.validate()
        return self

    def template_list(self) -> tuple[str, ...]:
        """The prompt templates the run trains in (errors name the ``custom_templates`` input)."""
        if self.templates == "object":
            return OBJECT_TEMPLATES
        if self.templates == "style":
            return STYLE_TEMPLATES
        if self.templates == "custom":
            try:
                return check_templates(self.custom_templates.splitlines())
            except ValueError as e:
                raise ValueError(f"custom_templates: {e}") from None
        raise ValueError(f"templates must be one of {', '.join(TEMPLATE_SETS)}, got {self.templates!r}")

    def regularizers(self, num_concepts: int = 1) -> list:
        """The regularisers these options turn on (seeds/003); the contrast is Eq. 2 across concepts only
        when a run has several (a single concept gets the vocabulary form)."""
        regs = []
        if self.l2_weight > 0:
            regs.append(L2Norm(self.l2_weight))
        if self.contrastive_weight > 0:
            regs.append(contrastive(self.contrastive_weight, num_concepts))
        if self.l2_init_weight > 0:
            regs.append(L2ToInit(self.l2_init_weight))
        return regs

    def train_config(self, **run) -> TrainConfig:
        """The run's ``TrainConfig``: ``run`` (what every run sets: steps, batch, seed, lr, precision, ...),
        every option whose name is a ``TrainConfig`` field, and the templates and caption options."""
        mine = {f.name for f in fields(self)}
        shared = {f.name: getattr(self, f.name) for f in fields(TrainConfig) if f.name in mine and f.name not in run}
        return TrainConfig(**{**shared, "templates": self.template_list(), "captions": self.captions, **run})


def widget_fields(cls=TrainingOptions) -> list:
    """The options a UI shows, in order (``dataclasses.Field`` objects with ``option``'s metadata)."""
    return [f for f in fields(cls) if f.metadata.get("widget", False)]
