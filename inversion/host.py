"""What the trainer needs from a text-to-image model, as small protocols.

The library never imports a UI. A *host* adapts one model family to these protocols:
``inversion.hosts.hf`` does it for transformers/diffusers modules, the ComfyUI pack does it for
ComfyUI's MODEL/CLIP/VAE objects. Everything here is plain tensors.

Conventions
- A text encoder is addressed by its *key*: ``clip_l`` (CLIP ViT-L/14, 768-d), ``clip_h``
  (OpenCLIP ViT-H, 1024-d), ``clip_g`` (OpenCLIP ViT-bigG, 1280-d), ``t5xxl`` (T5-XXL's encoder,
  4096-d: SD3, Flux). These are the keys SDXL, SD3 and Flux embedding files use in ComfyUI, so one
  learned concept is a ``{key: [k, d]}`` mapping.
- An encoder may be *frozen* (``trainable = False``, e.g. T5 when only the CLIP encoders learn): its
  rows of the concept stay at their initial values, the trainer neither optimises nor regularises
  them, and the encoder may cache its outputs per prompt. An encoder without ``trainable`` learns.
- A prompt reaches an encoder as ``ids`` [B, L] plus ``slots`` [B, L]: ``slots[b, i] = j >= 0``
  means position i of prompt b is the learned vector j (of the rows handed to ``encode``), and the
  id at that position is ignored; ``-1`` means "use the token table row of ``ids[b, i]``".
- The denoiser works with integer timesteps t in [0, num_timesteps): the indices of its noise
  schedule, which may be DDPM's (abar_t) or one in sigma space (``schedule.FlowMatchingSchedule``,
  sigma_t in (0, 1]). Whatever its parameterisation (eps, v, x0), ``predict_eps`` returns the epsilon
  estimate. What the loss compares is the denoiser's ``objective`` (``Objective``): by default "eps",
  ||eps_hat - eps||^2 (Gal et al. 2022; seeds/000 Eq. 3), what every SD1/SD2/SDXL trainer of
  textual inversion uses whatever the model predicts; "v" compares v-predictions with
  v = sqrt(abar) eps - sqrt(1 - abar) x0; "flow" compares a rectified-flow velocity with
  eps - x0 (SD3, Flux: x_t = (1 - sigma) x0 + sigma eps). A denoiser without ``objective`` is "eps".
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch

__all__ = [
    "Conditioning",
    "EncoderOutput",
    "TextEncoder",
    "TextSide",
    "Denoiser",
    "Objective",
    "OBJECTIVES",
    "LatentEncoder",
    "step_context",
    "is_trainable",
]


@dataclass
class EncoderOutput:
    """One encoder's result for a batch of prompts."""

    hidden: torch.Tensor  # [B, L, d] the hidden states the denoiser attends to
    pooled: torch.Tensor | None = None  # [B, d'] pooled (maybe projected) output, if any


@dataclass
class Conditioning:
    """What the denoiser receives: the cross-attention context and any pooled vector."""

    context: torch.Tensor  # [B, L, D]: the "c" of seeds/000 Eq. 4
    pooled: torch.Tensor | None = None  # [B, P] e.g. SDXL's clip_g pooled output

    def index(self, idx: torch.Tensor) -> "Conditioning":
        """Rows ``idx`` of the batch (used to share one encoding among repeated prompts)."""
        return Conditioning(
            self.context.index_select(0, idx),
            None if self.pooled is None else self.pooled.index_select(0, idx),
        )


@runtime_checkable
class TextEncoder(Protocol):
    """One text encoder with its tokenizer."""

    key: str  # "clip_l" | "clip_h" | "clip_g" | any other stable name
    width: int  # d, the width of a token-embedding row
    max_length: int  # tokens per sequence including BOS/EOS (77 for CLIP), the length prompts are padded to
    bos_id: int | None  # None: the tokenizer writes no start token (T5)
    eos_id: int
    pad_id: int

    def token_table(self) -> torch.Tensor:
        """The token-embedding table [V, d] (read-only; never trained)."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS or padding."""
        ...

    def encode(self, ids: torch.Tensor, slots: torch.Tensor, vectors: torch.Tensor) -> EncoderOutput:
        """Encode ``ids`` [B, L] with ``vectors`` [K, d] placed where ``slots`` >= 0.

        Differentiable with respect to ``vectors`` only.
        """
        ...


@runtime_checkable
class TextSide(Protocol):
    """All text encoders of a model and how their outputs become the conditioning.

    SD1 has one encoder (clip_l), SD2 one (clip_h), SDXL two (clip_l and clip_g) whose hidden
    states are concatenated on the feature axis and whose pooled output comes from clip_g.
    """

    encoders: Sequence[TextEncoder]

    def combine(self, outputs: Sequence[EncoderOutput]) -> Conditioning:
        ...


@runtime_checkable
class Denoiser(Protocol):
    """The frozen diffusion model."""

    num_timesteps: int  # T, e.g. 1000

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t for clean latents ``x0`` [B, ...], noise and integer timesteps ``t`` [B]."""
        ...

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The model's epsilon estimate at ``t`` given the conditioning."""
        ...

    # Optional: ``step_context()``, a context manager the trainer enters around each micro-batch's forward
    # and backward pass (e.g. a model that mutates tensors autograd saved needs
    # ``torch.autograd.graph.allow_mutation_on_saved_tensors``, which must span both).


OBJECTIVES = ("eps", "v", "flow")  # what the loss compares (see the module docstring)


@runtime_checkable
class Objective(Protocol):
    """A denoiser whose loss is not (or not only) the epsilon MSE: it names its ``objective`` and gives
    the prediction and the target in that objective's space."""

    objective: str  # one of OBJECTIVES

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The model's prediction at ``t`` in the objective's space (eps, v or velocity)."""
        ...

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What ``predict`` should return for ``x_t = add_noise(x0, noise, t)``."""
        ...


@runtime_checkable
class LatentEncoder(Protocol):
    """Images to the latents the denoiser trains on. Called once per image and augmentation."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` [B, 3, H, W] in [0, 1] -> latents [B, C, h, w], scaled as the denoiser expects."""
        ...


class SimpleTextSide:
    """A TextSide for the usual cases: one encoder, or several concatenated (SDXL).

    ``pooled_from`` names the encoder whose pooled output is passed on (SDXL: "clip_g"), or None.
    """

    def __init__(self, encoders: Sequence[TextEncoder], pooled_from: str | None = None):
        if not encoders:
            raise ValueError("a text side needs at least one text encoder")
        keys = [e.key for e in encoders]
        if len(set(keys)) != len(keys):
            raise ValueError(f"text encoder keys must be distinct, got {keys}")
        if pooled_from is not None and pooled_from not in keys:
            raise ValueError(f"pooled_from={pooled_from!r} is not one of the encoders {keys}")
        self.encoders = list(encoders)
        self.pooled_from = pooled_from

    def combine(self, outputs: Sequence[EncoderOutput]) -> Conditioning:
        context = outputs[0].hidden if len(outputs) == 1 else torch.cat([o.hidden for o in outputs], dim=-1)
        pooled = None
        if self.pooled_from is not None:
            pooled = outputs[[e.key for e in self.encoders].index(self.pooled_from)].pooled
        return Conditioning(context, pooled)


def step_context(denoiser) -> "contextlib.AbstractContextManager":
    """``denoiser.step_context()`` where the denoiser has one (``Denoiser``), else a context that does nothing:
    what a forward and backward pass of the denoiser runs inside."""
    ctx = getattr(denoiser, "step_context", None)
    return ctx() if ctx is not None else contextlib.nullcontext()


def is_trainable(encoder) -> bool:
    """Whether ``encoder`` learns its rows of the concept: all do, except those that say ``trainable = False``."""
    return getattr(encoder, "trainable", True) is not False
