"""Groups of trainable parameters: what the trainer steps, checkpoints, rolls back and reports.

The learned vectors are one group (``VectorGroup``); a run may train more beside them (a LoRA on the
denoiser, for pivotal tuning), each with its own parameters, optimiser, learning rate and schedule.
The trainer sees a group only through ``ParamGroup``:

- ``parameters()``: its trainable leaf tensors by name (the trainer clears, checks, unscales and clips
  their ``.grad``);
- ``step(step)``: one optimiser step at optimiser step ``step`` (0-based) from those gradients; the
  learning rate it used (a group may sit a step out, e.g. a LoRA that starts after the first fraction
  of the run, and returns 0.0);
- ``snapshot()`` / ``restore(snap)``: copies of the parameters, for the roll-back of a diverged step;
- ``state_dict()`` / ``load_state_dict()``: optimiser and schedule state, so a resumed run continues
  exactly (a checkpoint keeps a group's parameters and state under ``grp.<name>.``);
- ``report()``: what a progress report shows of it (``StepInfo`` fields for the vectors; under
  ``StepInfo.groups[name]`` for the others).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import torch

from .methods.optim import VectorOptimizer

__all__ = ["ParamGroup", "VectorGroup", "check_groups"]


@runtime_checkable
class ParamGroup(Protocol):
    name: str  # unique in a run; "vectors" is the learned vectors'
    max_grad_norm: float  # clip this group's gradient norm to it before the step; 0 = off

    def parameters(self) -> Mapping[str, torch.Tensor]:
        ...

    def step(self, step: int) -> float:
        ...

    def snapshot(self) -> dict[str, torch.Tensor]:
        ...

    def restore(self, snap: Mapping[str, torch.Tensor]) -> None:
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        ...

    def report(self) -> dict[str, Any]:
        ...


class VectorGroup:
    """The learned vectors: one [K_total, d] leaf per text encoder, stepped by a ``VectorOptimizer``
    (AdamW, DTI's Riemannian SGD, ...) at ``lr(step)``."""

    name = "vectors"

    def __init__(self, params: dict[str, torch.Tensor], optimizer: VectorOptimizer, lr: Callable[[int], float],
                 max_grad_norm: float = 0.0):
        self.params = params
        self.optimizer = optimizer
        self.lr = lr
        self.max_grad_norm = float(max_grad_norm)

    def parameters(self) -> dict[str, torch.Tensor]:
        return self.params

    def step(self, step: int) -> float:
        lr = self.lr(step)
        self.optimizer.step(self.params, lr)
        return lr

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.params.items()}

    def restore(self, snap: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(snap[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.optimizer.load_state_dict(state)

    def report(self) -> dict[str, Any]:
        return self.optimizer.report()


def check_groups(groups) -> None:
    """Names distinct, every parameter a leaf that requires grad, none shared between groups."""
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"parameter groups need distinct names, got {names}")
    seen: dict[int, str] = {}
    for g in groups:
        if not isinstance(g, ParamGroup):
            raise TypeError(f"parameter group {g!r} does not implement ParamGroup (inversion.groups)")
        for k, p in g.parameters().items():
            if not (p.is_leaf and p.requires_grad):
                raise ValueError(f"parameter group {g.name!r}: {k} must be a leaf tensor that requires grad")
            if id(p) in seen:
                raise ValueError(f"parameter {k} is in groups {seen[id(p)]!r} and {g.name!r}; give each one group")
            seen[id(p)] = g.name
