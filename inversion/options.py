"""``TrainingOptions``: everything a run can set beyond what every run needs, in one frozen dataclass.

The node layer's Training Options node builds one and the trainer node turns it, with the run's
own settings (steps, batch, learning rate, seed), into a ``TrainConfig`` and the method's
``MethodParams``. Defaults are the trainer's; a reason stands beside each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .g_reading import DEFAULT as DEFAULT_G_READING, check_reading
from .presets import MethodParams
from .prompts import OBJECT_TEMPLATES, STYLE_TEMPLATES, CaptionOptions, check_templates
from .score import DVAR_THRESHOLD, DVAR_WINDOW, check_score_settings

__all__ = ["TrainingOptions", "PRECISIONS", "LR_SCHEDULES", "TEMPLATE_SETS"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "linear", "cosine")
TEMPLATE_SETS = ("object", "style", "custom")


@dataclass(frozen=True)
class TrainingOptions:
    """Method parameters, schedule, regularisers, augmentation, captions, cadence, precision, memory."""

    method: MethodParams = field(default_factory=MethodParams)  # interval, single t, window, bins, kappa, class word
    l2_weight: float = 0.0  # seeds/003's L2 on the vectors' norm; 0 = off
    contrastive_weight: float = 0.0  # nearest-neighbour contrast (seeds/003 Eq. 2, or its one-concept form); 0 = off
    lr_schedule: str = "constant"  # TI's published runs use a constant rate
    warmup_steps: int = 0  # optimiser steps of linear warm-up
    grad_accum: int = 1  # micro-batches per optimiser step (a larger batch without the memory)
    max_grad_norm: float = 0.0  # clip the vectors' gradient norm; 0 = off
    flip: bool = True  # mirrored images too (off for text or asymmetric concepts)
    templates: str = "object"  # object | style | custom
    custom_templates: str = "a photo of {}"  # one per line when templates = custom
    captions: CaptionOptions = field(default_factory=CaptionOptions)  # per-image captions: shuffle, dropout
    checkpoint_every: int = 100  # save embedding + state every N steps; 0 = only at the end
    precision: str = "auto"  # auto (the model's own: fp16 gets dynamic loss scaling) | fp32 | bf16 | fp16
    gradient_checkpointing: bool = False  # recompute UNet activations in backward: less memory, ~30 % slower
    l2_init_weight: float = 0.0  # seeds/003 Sec. 3.4's L2 pull toward the initial vectors; 0 = off
    g_reading: str = DEFAULT_G_READING  # Eq. 4's g w.r.t. the learned rows ("tokens") or c ("context")
    score_every: int = 0  # deterministic score (score.py) every N steps; 0 = off: each costs ScoreConfig.draws forwards per concept
    early_stop: bool = False  # DVAR's rule on the scores; off until runs show it safe (issue 14)
    dvar_window: int = DVAR_WINDOW  # evaluations (DVAR's TI setting; steps when score_every = 1)
    dvar_threshold: float = DVAR_THRESHOLD  # DVAR's TI setting
    keep: str = "last"  # the finished file holds the last step's vectors, or the best-scored step's ("best")

    def validate(self) -> "TrainingOptions":
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.templates not in TEMPLATE_SETS:
            raise ValueError(f"templates must be one of {', '.join(TEMPLATE_SETS)}, got {self.templates!r}")
        if self.warmup_steps < 0 or self.grad_accum < 1 or self.checkpoint_every < 0 or self.max_grad_norm < 0:
            raise ValueError("warmup_steps, checkpoint_every and max_grad_norm must be >= 0, grad_accum >= 1")
        if self.l2_weight < 0 or self.contrastive_weight < 0 or self.l2_init_weight < 0:
            raise ValueError("l2_weight, contrastive_weight and l2_init_weight must be >= 0")
        a, b = self.method.interval
        if a > b:
            raise ValueError(f"interval_start ({a}) must not exceed interval_end ({b})")
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
