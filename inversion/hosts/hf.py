"""A host over transformers / diffusers modules (and any plain PyTorch denoiser).

- ``HFTextEncoder``: a transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` and its
  tokenizer. Learned vectors are spliced into the output of the token-embedding module by a
  forward hook, so no token is added to the tokenizer and the table is never resized or trained.
- ``ScheduledDenoiser``: any ``fn(x_t, t, context, pooled) -> output`` network (a diffusers
  ``UNet2DConditionModel`` via ``unet_fn``, or the world model) with a DDPM schedule and its
  prediction type (epsilon, v_prediction or sample), always returning epsilon.
- ``PixelLatents`` / ``VAELatents``: images to training latents.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable, Iterable

import torch

from ..host import EncoderOutput
from ..schedule import DDPMSchedule, FlowMatchingSchedule

__all__ = [
    "HFTextEncoder",
    "ScheduledDenoiser",
    "FlowDenoiser",
    "PixelLatents",
    "VAELatents",
    "make_clip_tokenizer",
    "unet_fn",
]


class HFTextEncoder:
    """A transformers CLIP text model as an ``inversion.host.TextEncoder``.

    ``layer``: "last" (SD1: last hidden state after the final LayerNorm) or "penultimate"
    (SDXL/SD2 style: hidden_states[-2], with ``final_norm`` deciding whether the final
    LayerNorm is applied, as SD2 does and SDXL does not).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, key: str = "clip_l", *, layer: str = "last",
                 final_norm: bool = True, max_length: int | None = None):
        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', got {layer!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.key = key
        self.layer = layer
        self.final_norm = final_norm
        self._table = model.get_input_embeddings()
        self.width = int(self._table.weight.shape[1])
        cfg = model.config
        self.max_length = int(max_length or min(getattr(tokenizer, "model_max_length", 77) or 77,
                                                cfg.max_position_embeddings))
        self.bos_id = int(tokenizer.bos_token_id)
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)
        self._inject: tuple[torch.Tensor, torch.Tensor] | None = None
        self._table.register_forward_hook(self._splice)

    def _splice(self, module, args, out):
        if self._inject is None:
            return out
        slots, vectors = self._inject
        mask = (slots >= 0).unsqueeze(-1)
        rows = vectors.to(out.dtype).index_select(0, slots.clamp(min=0).flatten()).view_as(out)
        return torch.where(mask, rows, out)

    def token_table(self) -> torch.Tensor:
        return self._table.weight

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, ids: torch.Tensor, slots: torch.Tensor, vectors: torch.Tensor) -> EncoderOutput:
        self._inject = (slots, vectors)
        try:
            out = self.model(input_ids=ids, output_hidden_states=self.layer != "last")
        finally:
            self._inject = None
        if self.layer == "last":
            hidden = out.last_hidden_state
        else:
            hidden = out.hidden_states[-2]
            if self.final_norm:
                hidden = self.model.final_layer_norm(hidden)
        pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            pooled = out.pooler_output
        return EncoderOutput(hidden, pooled)


class ScheduledDenoiser:
    """A network with a DDPM schedule as an ``inversion.host.Denoiser``.

    ``fn(x_t, t, context, pooled)`` returns the network output in ``prediction_type``
    ("epsilon", "v_prediction" or "sample"); ``predict_eps`` converts it to epsilon. ``objective``:
    what the loss compares, "eps" (textual inversion's, the default) or "v" (``predict`` / ``target``
    in v space, as a v-model was trained).
    """

    def __init__(self, fn: Callable, schedule: DDPMSchedule, prediction_type: str = "epsilon",
                 objective: str = "eps"):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
        if objective not in ("eps", "v"):
            raise ValueError(f"objective must be eps or v for a DDPM schedule, got {objective!r}")
        self.fn = fn
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.objective = objective
        self.num_timesteps = schedule.num_timesteps

    def predict(self, x_t, t, cond):
        """The prediction in the objective's space (``host.Objective``)."""
        eps = self.predict_eps(x_t, t, cond)
        return eps if self.objective == "eps" else self.schedule.v_from_eps(x_t, eps, t)

    def target(self, x0, noise, t):
        return noise if self.objective == "eps" else self.schedule.v_target(x0, noise, t)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.add_noise(x0, noise, t)

    def predict_eps(self, x_t, t, cond):
        out = self.fn(x_t, t, cond.context, cond.pooled)
        if self.prediction_type == "epsilon":
            return out
        if self.prediction_type == "v_prediction":
            return self.schedule.eps_from_v(x_t, out.to(x_t.dtype), t)
        return self.schedule.eps_from_x0(x_t, out.to(x_t.dtype), t)


def unet_fn(unet: torch.nn.Module) -> Callable:
    """Adapt a diffusers ``UNet2DConditionModel`` (no added conditioning) to ``fn(x, t, ctx, pooled)``."""

    def fn(x, t, context, pooled):
        return unet(x, t, encoder_hidden_states=context.to(x.dtype)).sample

    return fn


class PixelLatents:
    """Pixel-space "latents": images in [0, 1] mapped to [-1, 1] (latent-free models)."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2.0 - 1.0


class VAELatents:
    """A diffusers ``AutoencoderKL``: the posterior mean, times the model's scaling factor."""

    def __init__(self, vae: torch.nn.Module, scaling_factor: float | None = None):
        self.vae = vae
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else vae.config.scaling_factor)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        dist = self.vae.encode((images * 2.0 - 1.0).to(p.device, p.dtype)).latent_dist
        return dist.mean * self.scaling_factor


def make_clip_tokenizer(words: Iterable[str], folder: str | os.PathLike | None = None, max_length: int = 77):
    """Build a real transformers ``CLIPTokenizer`` whose vocabulary holds ``words`` whole.

    The vocabulary has every printable ASCII character (alone and word-final), each word as one
    token, and the BPE merges that assemble each word left to right, so any text still tokenises
    (unknown words fall back to characters) and the tokenizer behaves like CLIP's. Written to
    ``folder`` (a temporary one if None) and loaded back with ``from_pretrained``.
    """
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab: dict[str, int] = {}

    def add(tok: str) -> None:
        if tok not in vocab:
            vocab[tok] = len(vocab)

    for c in chars:
        add(c)
    for c in chars:
        add(c + "</w>")
    merges: list[str] = []
    seen: set[str] = set()
    for word in sorted({w.lower() for w in words if w.strip()}):
        if any(ord(c) < 33 or ord(c) > 126 for c in word):
            raise ValueError(f"make_clip_tokenizer: word {word!r} must be printable ASCII without spaces")
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        cur = symbols[0]
        for nxt in symbols[1:]:
            merged = cur + nxt
            rule = f"{cur} {nxt}"
            if rule not in seen:
                seen.add(rule)
                merges.append(rule)
            add(merged)
            cur = merged
        add(cur)
    add("<|startoftext|>")
    add("<|endoftext|>")
    folder = folder or tempfile.mkdtemp(prefix="clip-tok-")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    try:  # transformers >= 5 (tokenizers-backed)
        tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                            model_max_length=max_length)
    except TypeError:  # transformers 4.x (slow tokenizer built from files)
        tok = CLIPTokenizer(vocab_file=os.path.join(folder, "vocab.json"),
                            merges_file=os.path.join(folder, "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)


class FlowDenoiser:
    """A velocity network on a rectified-flow schedule (``schedule.FlowMatchingSchedule``) as an
    ``inversion.host.Denoiser`` with the "flow" objective: ``fn(x_t, t, context, pooled)`` returns
    v_hat, compared with eps - x0; ``predict_eps`` gives x_t + (1 - sigma) v_hat for what needs eps."""

    objective = "flow"

    def __init__(self, fn: Callable, schedule: FlowMatchingSchedule):
        self.fn = fn
        self.schedule = schedule
        self.num_timesteps = schedule.num_timesteps

    def add_noise(self, x0, noise, t):
        return self.schedule.add_noise(x0, noise, t)

    def predict(self, x_t, t, cond):
        return self.fn(x_t, t, cond.context, cond.pooled)

    def target(self, x0, noise, t):
        return self.schedule.velocity_target(x0, noise, t)

    def predict_eps(self, x_t, t, cond):
        return self.schedule.eps_from_velocity(x_t, self.predict(x_t, t, cond).to(x_t.dtype), t)
