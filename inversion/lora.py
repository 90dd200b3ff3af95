"""A LoRA on the denoiser, trained beside the learned vectors (pivotal tuning), built on peft.

LoRA (Hu et al., *LoRA: Low-Rank Adaptation of Large Language Models*, 2021, Eq. 3): a frozen linear
layer W becomes h = W x + (alpha / r) B A x, with A in R^{r x in} (Kaiming-uniform) and B in R^{out x r}
(zeros), so the model is unchanged at step 0 and only A and B train. Pivotal tuning (Roich et al., 2021;
diffusers' advanced DreamBooth-LoRA scripts) trains new token vectors and such a LoRA together; the
vectors may train alone for the first part of the run (``LoraSpec.start``, diffusers'
``--train_text_encoder_ti_frac`` read the other way round).

This module is the library's side (a ``torch.nn.Module`` denoiser: diffusers' UNet, the miniature
world's): the layers come from ``peft`` (what diffusers uses), not a LoRA written here. ComfyUI's models
get theirs from ComfyUI's own adapter code in the node layer. ``LoraGroup`` is a ``groups.ParamGroup``:
the trainer steps it, checkpoints it (``grp.lora.*``), resumes it exactly and rolls it back with the
vectors. ``kohya_state_dict`` writes the file layout ComfyUI's LoraLoader and A1111/Forge read
(``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

__all__ = ["LoraSpec", "LoraLayers", "LoraGroup", "lora_targets", "kohya_key"]

ADAPTER = "inversion"  # peft's adapter name for the layers this module adds
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' attention projections


@dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how: ``rank`` r and ``alpha`` (scale alpha / r), AdamW at ``lr`` with
    ``weight_decay``, from step ``start`` x steps on (the vectors alone before it), on every linear layer
    whose module path ends with one of ``targets`` and contains one of ``blocks`` (empty: anywhere)."""

    rank: int = 4
    alpha: float = 4.0
    lr: float = 1e-4
    weight_decay: float = 1e-4
    start: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    blocks: tuple[str, ...] = ()
    max_grad_norm: float = 0.0

    def validate(self) -> "LoraSpec":
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"LoRA learning rate must be a positive number, got {self.lr}")
        if not 0.0 <= self.start < 1.0:
            raise ValueError(f"LoRA start must be a fraction of the run in [0, 1), got {self.start}")
        if not self.targets:
            raise ValueError("LoRA targets must name at least one layer (e.g. to_q, to_k, to_v, to_out.0)")
        return self


def lora_targets(model: nn.Module, spec: LoraSpec) -> list[str]:
    """The module paths of ``model`` the LoRA adapts: ``nn.Linear`` layers whose path ends with a target
    (``to_q`` matches ``...attn1.to_q``) and contains one of ``spec.blocks``. None is an error that lists
    what the model's linear layers are called."""
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [n for n in linear
              if any(n == t or n.endswith("." + t) for t in spec.targets)
              and (not spec.blocks or any(b in n for b in spec.blocks))]
    if not chosen:
        tails = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(f"no linear layer matches LoRA targets {list(spec.targets)}"
                         + (f" within blocks {list(spec.blocks)}" if spec.blocks else "")
                         + f"; this model's linear layers end in {tails[:20]}")
    return chosen


def kohya_key(path: str, prefix: str = "lora_unet") -> str:
    """kohya's name for the module at ``path``: ``lora_unet_down_blocks_0_attentions_0_..._to_q``."""
    return f"{prefix}_{path.replace('.', '_')}"


class LoraLayers:
    """A LoRA's layers as a parameter group (``groups.ParamGroup``), whoever made them.

    ``layers`` maps each adapted module's path to its (down [r, in], up [out, r]) leaf parameters
    (A and B of Eq. 3), which the denoiser's forward already uses; the scale is alpha / r. This class
    steps them with AdamW from step ``start x steps`` on, keeps exact-resume state, snapshots them for
    the roll-back, reports how far they moved the model and writes kohya's layout. ``LoraGroup`` makes
    them with peft on a ``torch.nn.Module``; the nodes make them with ComfyUI's weight adapters."""

    name = "lora"

    def __init__(self, spec: LoraSpec, steps: int, layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                 lr: Callable[[int], float] | None = None):
        self.spec = spec.validate()
        self.layers = dict(layers)
        self.paths = list(self.layers)
        self.max_grad_norm = float(spec.max_grad_norm)
        self.start_step = int(round(spec.start * steps))
        self.lr = lr or (lambda step: spec.lr)
        self.params: dict[str, torch.Tensor] = {}
        for path, (down, up) in self.layers.items():
            self.params[f"{path}.lora_down"] = down.requires_grad_(True)
            self.params[f"{path}.lora_up"] = up.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=spec.lr, weight_decay=spec.weight_decay)

    # -- ParamGroup
    def parameters(self) -> dict[str, torch.Tensor]:
        return self.params

    def step(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        lr = float(self.lr(step))
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        return lr

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.params.items()}

    def restore(self, snap: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(snap[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """AdamW's moments and step count per parameter (``<name>.exp_avg`` / ``.exp_avg_sq`` / ``.step``)."""
        out = {}
        for name, p in self.params.items():
            st = self.optimizer.state.get(p)
            if st:
                out.update({f"{name}.{k}": torch.as_tensor(v).detach().clone() for k, v in st.items()})
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for name, p in self.params.items():
            keys = [k for k in ("step", "exp_avg", "exp_avg_sq") if f"{name}.{k}" in state]
            if keys:
                self.optimizer.state[p] = {k: state[f"{name}.{k}"].clone().to(p.device) for k in keys}

    def report(self) -> dict[str, Any]:
        """||(alpha / r) B A||_F over every adapted layer: how far the LoRA has moved the model."""
        scale = self.spec.alpha / self.spec.rank
        with torch.no_grad():
            total = sum(float((scale * (up.float() @ down.float())).pow(2).sum()) for down, up in self.layers.values())
        return {"delta_norm": math.sqrt(total)}

    def load_kohya(self, tensors: Mapping[str, torch.Tensor], prefix: str = "lora_unet") -> None:
        """Continue from a kohya-layout file of this LoRA (``kohya_state_dict``): every layer's down and up.
        A file of another rank, alpha or set of layers is refused with what differs."""
        want = {kohya_key(p, prefix) for p in self.paths}
        have = {k[:-len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight")}
        if want != have:
            raise ValueError(f"the LoRA file adapts {len(have)} layers, this run {len(want)}"
                             f" ({len(want - have)} missing, {len(have - want)} extra): train it with the same "
                             "blocks and layers, or with if_exists = overwrite")
        with torch.no_grad():
            for path, (down, up) in self.layers.items():
                key = kohya_key(path, prefix)
                d, u = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
                alpha = float(tensors.get(f"{key}.alpha", torch.tensor(float(d.shape[0]))))
                if d.shape != down.shape or u.shape != up.shape or alpha != float(self.spec.alpha):
                    raise ValueError(f"the LoRA file's {key} has rank {d.shape[0]} and alpha {alpha:g}; this run "
                                     f"trains rank {self.spec.rank} and alpha {self.spec.alpha:g}")
                down.copy_(d.to(down.dtype))
                up.copy_(u.to(up.dtype))

    def kohya_state_dict(self, prefix: str = "lora_unet", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The LoRA in kohya's layout (ComfyUI's LoraLoader, A1111/Forge): per adapted layer
        ``<kohya_key>.lora_down.weight`` (A), ``.lora_up.weight`` (B) and ``.alpha``."""
        out = {}
        for path, (down, up) in self.layers.items():
            key = kohya_key(path, prefix)
            for part, w in (("lora_down", down), ("lora_up", up)):
                w = w.detach().cpu()
                out[f"{key}.{part}.weight"] = w.to(dtype) if dtype is not None else w.clone()
            out[f"{key}.alpha"] = torch.tensor(float(self.spec.alpha))
        return out


class LoraGroup(LoraLayers):
    """The LoRA layers peft adds to ``model`` (``lora_targets``), as a parameter group.

    Every other parameter of ``model`` is frozen (gradients exist only for what trains). ``steps`` is the
    run's length, for ``spec.start``; ``lr`` overrides the constant rate (a schedule over optimiser steps);
    ``seed`` fixes A's initialisation. ``remove()`` puts the original layers back, so a shared model is
    left as it was found."""

    def __init__(self, model: nn.Module, spec: LoraSpec, steps: int, *, seed: int = 0,
                 lr: Callable[[int], float] | None = None):
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise ImportError("a LoRA on a diffusers (or the miniature world's) model uses peft, which is not "
                              "installed: pip install peft") from None

        spec = spec.validate()
        self.model = model
        paths = lora_targets(model, spec)
        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=paths, lora_dropout=0.0,
                            init_lora_weights=True, bias="none")
        self._was_trainable = {id(p): p.requires_grad for p in model.parameters()}  # peft freezes the rest
        with torch.random.fork_rng(devices=[]):  # A's Kaiming init from the run's seed, the caller's RNG untouched
            torch.manual_seed(seed)
            inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        for p in model.parameters():
            p.requires_grad_(False)
        layers = {}
        for path in paths:
            layer = model.get_submodule(path)
            layers[path] = (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)
        super().__init__(spec, steps, layers, lr=lr)

    def remove(self) -> None:
        """Replace every peft layer with the layer it wraps and give every parameter back the
        ``requires_grad`` it had: ``model`` is as it was before this group."""
        for path in self.paths:
            parent_path, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            setattr(parent, child, getattr(parent, child).get_base_layer())
        for p in self.model.parameters():
            p.requires_grad_(self._was_trainable.get(id(p), p.requires_grad))
        self.params, self.layers = {}, {}
