"""Dynamic loss scaling for fp16 training of the learned parameters (the rule of ``torch.amp.GradScaler``)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

__all__ = ["DynamicLossScale"]


class DynamicLossScale:
    """Dynamic loss scaling for fp16, the rule of ``torch.amp.GradScaler``, on the learned vectors' step.

    The diffusion loss is multiplied by ``scale`` before backward, so every gradient inside the fp16
    UNet's backward is ``scale`` times larger (small ones no longer underflow to zero), and the
    vectors' gradients are divided by it afterwards. A step whose loss or gradient is not finite (an
    fp16 overflow) is skipped and the scale halved; after ``growth_interval`` good steps in a row the
    scale doubles, probing for the largest one that does not overflow. ``max_skips`` skipped steps in
    a row stop the run: then fp16 itself is too narrow for the model, not the scale.

    Start 2**16 and interval 2000 are GradScaler's defaults, which diffusers' textual inversion uses
    (through accelerate) for ``--mixed_precision fp16``: a run of 500-5000 steps grows the scale at
    most twice, and each probe costs at most one skipped step in 2000.
    """

    PREFIX = "loss_scale."  # its keys in ``TrainState.optimizer`` (a checkpoint's ``opt.*`` entries)
    # Measured headroom (random full SD1.5, fp16 UNet, 64 px, t = 50/400/900): overflow at 2**24, none at
    # 2**20; a larger image has smaller per-element gradients (the loss is a mean), so more headroom.
    INIT_SCALE = 2.0 ** 16
    GROWTH_INTERVAL = 2000

    def __init__(self, scale: float | None = None, growth_interval: int | None = None, max_skips: int = 20):
        self.scale = float(self.INIT_SCALE if scale is None else scale)
        self.growth_interval = int(self.GROWTH_INTERVAL if growth_interval is None else growth_interval)
        self.max_skips = int(max_skips)
        self.good = 0  # good steps in a row since the scale last changed
        self.skips = 0  # skipped steps in a row

    def update(self, finite: bool) -> None:
        """After a step: halve on an overflow, double after ``growth_interval`` good steps in a row."""
        if not finite:
            self.scale *= 0.5
            self.good = 0
            self.skips += 1
            return
        self.skips = 0
        self.good += 1
        if self.good >= self.growth_interval:
            self.scale *= 2.0
            self.good = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {self.PREFIX + "scale": torch.tensor(self.scale, dtype=torch.float64),
                self.PREFIX + "good": torch.tensor(self.good), self.PREFIX + "skips": torch.tensor(self.skips)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.scale = float(state[self.PREFIX + "scale"])
        self.good = int(state[self.PREFIX + "good"])
        self.skips = int(state[self.PREFIX + "skips"])
