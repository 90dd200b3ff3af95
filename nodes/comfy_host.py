"""The library's host protocols (``inversion.host``) over ComfyUI's MODEL, CLIP and VAE objects.

- ``ComfyTextEncoder``: one CLIP text encoder (``clip_l``, ``clip_h`` or ``clip_g``) inside a CLIP.
  Learned vectors go in through ComfyUI's own token lists (a tensor in place of a token id,
  ``SDClipModel.process_tokens``), so the encoder runs exactly as CLIPTextEncode runs it (layer
  choice, CLIPSetLastLayer, final norm, pooled output) and autograd reaches only the vectors.
- ``comfy_text_side``: SD1 (clip_l), SD2 (clip_h), SDXL (clip_l + clip_g concatenated, pooled
  from clip_g), the encoders in ComfyUI's concatenation order.
- ``ComfyDenoiser``: a MODEL. ComfyUI's k-diffusion convention is x_sigma = x0 + sigma * eps
  (``model_sampling.noise_scaling``) and ``apply_model`` returns x0-hat whatever the
  parameterisation, so eps-hat = (x_sigma - x0-hat) / sigma for eps-, v- and x0-models alike
  (the textual inversion loss ||eps-hat - eps||^2, seeds/000 Eq. 3; DDPM abar_t = 1 / (1 + sigma_t^2)).
  SDXL's ADM vector ``y`` is built by the model's own ``encode_adm`` from the pooled output.
- ``ComfyLatentEncoder``: a VAE; latents pass through ``process_latent_in`` as sampling does.
- ``training_host``: loads the models fully, and makes them trainable-through for the duration
  (see ``thaw`` and ``out_of_place_clip_layers``) while keeping them usable by the rest of the graph;
  under ComfyUI's dynamic VRAM it trains through core's fully loaded copy (``static_models``).
- ``training_precision``: a user's precision choice as the trainer's autocast dtype and loss scaling
  (fp16 UNets train with the trainer's dynamic loss scaling); ``with_compute_dtype``: a MODEL clone that
  computes in a chosen dtype; ``gradient_checkpointing``: recompute UNet blocks in backward (memory).

Traps handled (../shared/COMFYUI_NOTES.md sections 2-4): weights are inference tensors; CLIP layers
add residuals in place; parameters loaded outside inference mode require grad.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.utils.checkpoint

import comfy.clip_model
import comfy.model_management
import comfy.model_sampling
import comfy.model_base
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.text_encoders.flux
import comfy.text_encoders.sd3_clip

from ..inversion.embedding import ENCODER_KEYS  # ComfyUI's concatenation order (SDXL: l then g)
from ..inversion.host import Conditioning, EncoderOutput, SimpleTextSide
from .comfy_attention import sdpa_attention  # the UNet's attention while training (SDPA where torch has it)

__all__ = [
    "ENCODER_KEYS",
    "ComfyTextEncoder",
    "ComfyDenoiser",
    "ComfyLatentEncoder",
    "ComfyHost",
    "comfy_text_side",
    "encoder_keys",
    "thaw",
    "out_of_place_clip_layers",
    "static_models",
    "training_host",
    "training_precision",
    "with_compute_dtype",
    "gradient_checkpointing",
]

_SD3_CLIP = comfy.text_encoders.sd3_clip.SD3ClipModel
_FLUX_CLIP = comfy.text_encoders.flux.FluxClipModel
_SUPPORTED_CLIPS = (comfy.sd1_clip.SD1ClipModel, comfy.sdxl_clip.SDXLClipModel, _SD3_CLIP, _FLUX_CLIP)


def is_sd3_clip(clip) -> bool:
    """Whether ``clip`` holds SD3's text encoders (clip_l, clip_g and maybe T5)."""
    return isinstance(getattr(clip, "cond_stage_model", None), _SD3_CLIP)


def encoder_keys(clip) -> list[str]:
    """The text encoders inside a ComfyUI CLIP object, e.g. ["clip_l", "clip_g"] for SDXL, ["clip_l",
    "clip_g", "t5xxl"] for SD3 (without "t5xxl" when the checkpoint has no T5), ["clip_l", "t5xxl"] for Flux."""
    csm = getattr(clip, "cond_stage_model", None)
    if not isinstance(csm, _SUPPORTED_CLIPS):
        raise TypeError(
            f"clip: textual inversion here supports the text encoders of SD1.x, SD2.x, SDXL, SD3/SD3.5 and Flux.1 "
            f"checkpoints, got {type(csm).__name__}; load such a checkpoint (or DualCLIPLoader type sdxl/flux, "
            "TripleCLIPLoader for SD3) and wire its CLIP output"
        )
    keys = [k for k in ENCODER_KEYS if isinstance(getattr(csm, k, None), comfy.sd1_clip.SDClipModel)
            and isinstance(getattr(clip.tokenizer, k, None), comfy.sd1_clip.SDTokenizer)]
    if not keys:
        raise TypeError(f"clip: found no clip_l/clip_h/clip_g/t5xxl text encoder in {type(csm).__name__}")
    if isinstance(csm, _SD3_CLIP) and not {"clip_l", "clip_g"} <= set(keys):
        raise TypeError(f"clip: this SD3 CLIP has only {', '.join(keys)}; training needs clip_l and clip_g (load "
                        "them with TripleCLIPLoader, or the checkpoint's own CLIP)")
    return keys


def _apply_clip_options(clip) -> torch.device:
    """What ``CLIP.encode_from_tokens`` does first: default layers, then CLIPSetLastLayer's choice, then
    (ComfyUI v0.4+) the device the encoder runs on, its patcher's load device; returns that device.

    Without the last, a v0.4+ encoder runs where its token table happens to sit (after a partial or
    dynamic load, the CPU). Older encoders ignore the option and run where their weights are."""
    device = clip.patcher.load_device
    clip.cond_stage_model.reset_clip_options()
    if clip.layer_idx is not None:
        clip.cond_stage_model.set_clip_options({"layer": clip.layer_idx})
    clip.cond_stage_model.set_clip_options({"execution_device": device})
    return device


def _device_context(device):
    """ComfyUI's ``cuda_device_context`` (v0.2x+: the current CUDA device follows ``device`` for kernels
    that read it), or nothing where this ComfyUI has none."""
    context = getattr(comfy.model_management, "cuda_device_context", None)
    return context(device) if context is not None else contextlib.nullcontext()


class ComfyTextEncoder:
    """``inversion.host.TextEncoder`` for one text encoder (``key``) inside a ComfyUI CLIP.

    T5 (``t5xxl``) has no start token and pads to its tokenizer's minimum length (77 in SD3, 256 in Flux)
    rather than to a maximum: prompts are built to that length, as CLIPTextEncode builds them. With
    ``trainable=False`` the encoder is frozen: its rows never change, so each distinct prompt is encoded
    once, without a graph, and its output kept for the run (what makes a T5-XXL beside the CLIPs cost
    nothing after the first steps)."""

    def __init__(self, clip, key: str, trainable: bool = True):
        if key not in encoder_keys(clip):
            raise ValueError(f"clip has no text encoder {key!r}; it has {encoder_keys(clip)}")
        self.clip = clip
        self.key = key
        self.trainable = bool(trainable)
        self.module = getattr(clip.cond_stage_model, key)  # sd1_clip.SDClipModel
        self.tokenizer = getattr(clip.tokenizer, key)  # sd1_clip.SDTokenizer
        self.width = int(self.module.transformer.get_input_embeddings().weight.shape[1])
        padded = getattr(self.tokenizer, "pad_to_max_length", True) or not self.tokenizer.min_length
        self.max_length = int(self.tokenizer.max_length if padded else self.tokenizer.min_length)
        start = self.tokenizer.start_token
        self.bos_id = None if start is None else int(start)
        self.eos_id = int(self.tokenizer.end_token)
        self.pad_id = int(self.tokenizer.pad_token)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def token_table(self) -> torch.Tensor:
        return self.module.transformer.get_input_embeddings().weight

    def tokenize(self, text: str) -> list[int]:
        ids = self.tokenizer.tokenizer(text)["input_ids"]  # as SDTokenizer.tokenize_with_weights does per word
        end = -1 if self.tokenizer.tokenizer_adds_end_token else len(ids)
        return [int(i) for i in ids[self.tokenizer.tokens_start:end]]

    def encode(self, ids: torch.Tensor, slots: torch.Tensor, vectors: torch.Tensor) -> EncoderOutput:
        if vectors.ndim != 2 or vectors.shape[1] != self.width:
            # ComfyUI would log and silently drop a vector of the wrong width.
            raise ValueError(f"{self.key}: learned vectors must be [k, {self.width}], got {tuple(vectors.shape)}")
        if not self.trainable:
            return self._frozen(ids, slots, vectors)
        return self._run(ids, slots, vectors)

    def _run(self, ids: torch.Tensor, slots: torch.Tensor, vectors: torch.Tensor) -> EncoderOutput:
        device = _apply_clip_options(self.clip)
        rows = vectors.unbind(0)
        batch = [[rows[s] if s >= 0 else i for i, s in zip(id_row, slot_row)]
                 for id_row, slot_row in zip(ids.tolist(), slots.tolist())]
        with _device_context(device):
            out = self.module(batch)
        return EncoderOutput(out[0], out[1])

    def _frozen(self, ids: torch.Tensor, slots: torch.Tensor, vectors: torch.Tensor) -> EncoderOutput:
        """Each row's output once per (ids, slots): the rows are constants for the run."""
        keys = [(tuple(i), tuple(s)) for i, s in zip(ids.tolist(), slots.tolist())]
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if todo:
            idx = [keys.index(k) for k in todo]
            with torch.no_grad():
                out = self._run(ids[idx], slots[idx], vectors.detach())
            for n, k in enumerate(todo):
                self._cache[k] = (out.hidden[n], None if out.pooled is None else out.pooled[n])
        hidden = torch.stack([self._cache[k][0] for k in keys])
        pooled = None if self._cache[keys[0]][1] is None else torch.stack([self._cache[k][1] for k in keys])
        return EncoderOutput(hidden, pooled)


class SD3TextSide(SimpleTextSide):
    """SD3's conditioning from its encoders' outputs, as ``SD3ClipModel.encode_token_weights`` builds it: clip_l
    and clip_g hidden states side by side, zero-padded to T5's 4096 features, then T5's tokens after them
    on the sequence axis (when the CLIP has a T5); pooled = [clip_l pooled, clip_g pooled]."""

    def combine(self, outputs):
        by = {e.key: o for e, o in zip(self.encoders, outputs)}
        l, g = by["clip_l"], by["clip_g"]
        cut = min(l.hidden.shape[1], g.hidden.shape[1])
        lg = torch.cat([l.hidden[:, :cut], g.hidden[:, :cut]], dim=-1)
        context = torch.nn.functional.pad(lg, (0, 4096 - lg.shape[-1]))
        if "t5xxl" in by:
            context = torch.cat([context, by["t5xxl"].hidden], dim=-2)
        return Conditioning(context, torch.cat([l.pooled, g.pooled], dim=-1))


class FluxTextSide(SimpleTextSide):
    """Flux's conditioning, as ``FluxClipModel.encode_token_weights`` builds it: the context is T5's hidden
    states alone, clip_l gives only the pooled vector (the model's ``y``)."""

    def combine(self, outputs):
        by = {e.key: o for e, o in zip(self.encoders, outputs)}
        return Conditioning(by["t5xxl"].hidden, by["clip_l"].pooled)


def comfy_text_side(clip, train_t5: bool = False) -> SimpleTextSide:
    """The CLIP's encoders as one ``TextSide``; SDXL's pooled output comes from clip_g, SD3's and Flux's are
    built as ComfyUI builds them. T5 learns its own rows only with ``train_t5`` (back-propagating through
    T5-XXL costs more than the rest of the step); otherwise it is frozen at the concept's initial rows."""
    keys = encoder_keys(clip)
    encoders = [ComfyTextEncoder(clip, k, trainable=train_t5 or k != "t5xxl") for k in keys]
    csm = clip.cond_stage_model
    if isinstance(csm, _SD3_CLIP):
        return SD3TextSide(encoders)
    if isinstance(csm, _FLUX_CLIP):
        return FluxTextSide(encoders)
    pooled = "clip_g" if isinstance(csm, comfy.sdxl_clip.SDXLClipModel) else None
    return SimpleTextSide(encoders, pooled_from=pooled)


FLUX_GUIDANCE = 3.5  # the guidance a Flux run trains under: FluxGuidance's default and ComfyUI's own


class ComfyDenoiser:
    """``inversion.host.Denoiser`` over a ComfyUI MODEL (ModelPatcher) with a table of sigmas.

    Diffusion models (SD1.x, SD2.x, SDXL; eps, v or x0): ``add_noise`` x_t = x0 + sigma_t * eps (ComfyUI's
    convention, the input ``apply_model`` expects); ``predict_eps`` (x_t - apply_model(x_t, sigma_t)) / sigma_t.

    Rectified-flow models (SD3, Flux: ``model_sampling`` of type CONST): x_t = (1 - sigma_t) x0 + sigma_t eps
    (``noise_scaling``), ``objective`` "flow": the prediction is the velocity (x_t - x0_hat) / sigma_t and
    the target eps - x0, the loss SD3 and Flux were trained with (Esser et al. 2024, Eq. 2 with the
    rectified-flow weighting). The sigmas are the model's own table (``model_sampling.sigmas``: SD3's 1000
    with its shift, Flux's 10000 with the shift of a ModelSamplingFlux node when one is wired before the
    trainer, else the checkpoint's 1.15), so t indexes what sampling uses. Flux-dev's guidance input gets
    ``FLUX_GUIDANCE`` (3.5), what a prompt is sampled with by default: the concept is learned under the
    conditioning it will be used under.
    """

    def __init__(self, model, *, latent_downscale: int = 8, guidance: float = FLUX_GUIDANCE):
        self.patcher = model
        self.base = model.model  # comfy.model_base.BaseModel
        sampling = model.get_model_object("model_sampling")
        sigmas = getattr(sampling, "sigmas", None)
        flow = isinstance(sampling, comfy.model_sampling.CONST)
        if not (flow or isinstance(sampling, comfy.model_sampling.EPS)) or sigmas is None or sigmas.ndim != 1:
            raise TypeError(
                f"model: textual inversion needs an SD1.x, SD2.x, SDXL, SD3 or Flux model (a table of timesteps); "
                f"this MODEL uses {type(sampling).__name__}, which is not supported"
            )
        self.sampling = sampling
        self.sigmas = sigmas.detach().float().cpu()
        self.num_timesteps = int(self.sigmas.shape[0])
        self.prediction = type(sampling).__name__
        self.objective = "flow" if flow else "eps"
        self.family = ("flux" if isinstance(self.base, comfy.model_base.Flux) else
                       "sd3" if isinstance(self.base, comfy.model_base.SD3) else "unet")
        self.uses_adm = int(getattr(self.base, "adm_channels", 0) or 0) > 0 and self.family == "unet"
        params = getattr(getattr(self.base, "diffusion_model", None), "params", None)
        self.guidance = float(guidance) if self.family == "flux" and getattr(params, "guidance_embed", False) else None
        self.latent_downscale = latent_downscale
        self.device = model.load_device

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigmas[t.detach().long().cpu()]

    def step_context(self):
        """Flux's blocks add their residuals in place (``img +=``, ``x +=``) onto tensors a LayerNorm saved for
        backward. Under ``torch.autograd.graph.allow_mutation_on_saved_tensors`` (around each forward and
        backward pass: the trainer enters it) such a tensor is cloned when it is mutated, so backward sees the
        forward pass's values, without rewriting ComfyUI's blocks. It costs a copy per mutated saved tensor,
        so only Flux gets it; sampling and the VAE (inference mode) run outside it."""
        if self.family == "flux":
            return torch.autograd.graph.allow_mutation_on_saved_tensors()
        return contextlib.nullcontext()

    def _sigma_like(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.sigma(t).to(x.device, x.dtype).view(-1, *([1] * (x.ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self._sigma_like(t, x0)
        if self.objective == "flow":
            return self.sampling.noise_scaling(s.flatten(), noise, x0)
        return x0 + s * noise

    def _adm(self, cond: Conditioning, x: torch.Tensor) -> torch.Tensor:
        if cond.pooled is None:
            raise ValueError("model: this model needs a pooled text embedding (SDXL's clip_g); wire the "
                             "CLIP that came with the model")
        h, w = x.shape[-2] * self.latent_downscale, x.shape[-1] * self.latent_downscale
        # Size conditioning as for an uncropped image of the training size (what KSampler uses
        # for a latent of this size with a plain CLIPTextEncode).
        return self.base.encode_adm(pooled_output=cond.pooled, width=w, height=h, device=x.device)

    def _extra(self, cond: Conditioning, x: torch.Tensor) -> dict:
        if self.uses_adm:
            return {"y": self._adm(cond, x)}
        if self.family == "unet":
            return {}
        if cond.pooled is None:
            raise ValueError(f"model: {self.family.upper()} needs the pooled text embedding of its CLIP; wire the "
                             "CLIP that came with the model")
        extra = {"y": cond.pooled.to(x.device, x.dtype)}  # SD3's and Flux's encode_adm: the pooled output itself
        if self.guidance is not None:
            extra["guidance"] = torch.full((x.shape[0],), self.guidance, device=x.device, dtype=x.dtype)
        return extra

    def denoised(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, x0_hat): ``apply_model``'s estimate of the clean latents at ``t`` (every parameterisation)."""
        x = x_t.to(self.device, torch.float32)
        sigma = self.sigma(t).to(self.device)
        options = dict(self.patcher.model_options.get("transformer_options", {}))
        options.update(cond_or_uncond=[0], uuids=[None], sigmas=sigma)
        x0 = self.base.apply_model(x, sigma, c_crossattn=cond.context, transformer_options=options,
                                   **self._extra(cond, x))
        return x, x0

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x, x0 = self.denoised(x_t, t, cond)
        s = self._sigma_like(t, x)
        if self.objective == "flow":  # x_t = (1 - s) x0 + s eps
            return (x - (1 - s) * x0) / s
        return (x - x0) / s

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The objective's prediction: the velocity (x_t - x0_hat) / sigma for a flow model, else eps-hat."""
        if self.objective != "flow":
            return self.predict_eps(x_t, t, cond)
        x, x0 = self.denoised(x_t, t, cond)
        return (x - x0) / self._sigma_like(t, x)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps - x0 for a flow model (with v0.2x+'s noise scale s, x_t = sigma s eps + (1 - sigma) x0, it is
        s eps - x0: (x_t - x0) / sigma), else eps."""
        if self.objective != "flow":
            return noise
        return getattr(self.sampling, "noise_scale", 1.0) * noise - x0


class ComfyLatentEncoder:
    """``inversion.host.LatentEncoder``: VAE posterior mode, then ``process_latent_in``."""

    def __init__(self, vae, model):
        if vae is None or getattr(vae, "first_stage_model", None) is None:
            raise ValueError("vae: no VAE given or the checkpoint has none; wire a VAE (e.g. from VAELoader)")
        self.vae = vae
        self.base = model.model
        self.device = model.load_device

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (3, 4):
            raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        with torch.inference_mode():
            latents = self.base.process_latent_in(self.vae.encode(images[:, :3].movedim(1, -1)))
        with torch.inference_mode(False):
            return latents.to(self.device, torch.float32).clone()  # a normal tensor, usable by autograd


# ---------------------------------------------------------------- making ComfyUI models trainable-through

def _needs_replacing(t: torch.Tensor) -> bool:
    if t.is_inference():
        return True
    try:
        t._version  # a Parameter whose .data was swapped for an inference tensor has no version counter
    except RuntimeError:
        return True
    return False


def thaw(module: torch.nn.Module) -> int:
    """Make ``module`` usable by autograd: frozen, and free of inference tensors.

    Every Parameter/buffer created under ``torch.inference_mode`` (all of them, when a loader node
    built the model) is replaced by a normal copy with the same values: ``p.data = clone`` is not
    enough (the Parameter keeps no version counter), identity weight wrappers work but cost 3-4x
    per step. Parameters are frozen, or backward would build weight gradients (2.4x slower).
    Returns the number of tensors replaced. Must run outside inference mode.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("thaw() must run under torch.inference_mode(False)")
    replaced = 0
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is None:
                continue
            if _needs_replacing(p):
                m._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                replaced += 1
            elif p.requires_grad:
                p.requires_grad_(False)
        for name, b in list(m._buffers.items()):
            if b is not None and _needs_replacing(b):
                m._buffers[name] = b.clone()
                replaced += 1
    return replaced


_CLIP_LAYER_ARGS = ["self", "x", "mask", "optimized_attention"]


def _clip_layer_forward(self, x, mask=None, optimized_attention=None):
    """``comfy.clip_model.CLIPLayer.forward`` with out-of-place residual adds (its ``x +=`` would
    overwrite the input that layer_norm1 saved for backward)."""
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


def _t5_attention_forward(self, x, mask=None, past_bias=None, optimized_attention=None):
    """``comfy.text_encoders.t5.T5LayerSelfAttention.forward`` with an out-of-place residual add."""
    output, past_bias = self.SelfAttention(self.layer_norm(x), mask=mask, past_bias=past_bias,
                                           optimized_attention=optimized_attention)
    return x + output, past_bias


def _t5_ff_forward(self, x):
    """``comfy.text_encoders.t5.T5LayerFF.forward`` with an out-of-place residual add."""
    return x + self.DenseReluDense(self.layer_norm(x))


def _out_of_place_forwards() -> list[tuple[type, list[str], object]]:
    """(class, its forward's arguments as this file was written for, the out-of-place forward): the text
    encoder layers whose ``x +=`` would overwrite a tensor autograd saved (CLIP's and T5's residual adds)."""
    import comfy.text_encoders.t5 as t5

    return [(comfy.clip_model.CLIPLayer, _CLIP_LAYER_ARGS, _clip_layer_forward),
            (t5.T5LayerSelfAttention, ["self", "x", "mask", "past_bias", "optimized_attention"], _t5_attention_forward),
            (t5.T5LayerFF, ["self", "x"], _t5_ff_forward)]


@contextlib.contextmanager
def out_of_place_clip_layers(module: torch.nn.Module) -> Iterator[int]:
    """Give every CLIP and T5 layer in ``module`` an out-of-place forward; restored on exit."""
    kinds = _out_of_place_forwards()
    for cls, args, _ in kinds:
        params = list(inspect.signature(cls.forward).parameters)
        if params != args:
            raise RuntimeError(f"ComfyUI's {cls.__name__}.forward{tuple(params)} changed; nodes/comfy_host.py "
                               "must be updated for this ComfyUI version")
    layers = []
    for m in module.modules():
        for cls, _, forward in kinds:
            if isinstance(m, cls) and "forward" not in m.__dict__:
                m.forward = types.MethodType(forward, m)
                layers.append(m)
    try:
        yield len(layers)
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)


def _is_dynamic(patcher) -> bool:
    """Whether ``patcher`` streams its weights per operation (ComfyUI v0.16+ dynamic VRAM,
    ``ModelPatcherDynamic``); patchers of older ComfyUIs have no ``is_dynamic`` and never do."""
    is_dynamic = getattr(patcher, "is_dynamic", None)
    return bool(is_dynamic()) if callable(is_dynamic) else False


def _static_patcher(patcher, what: str):
    """Core's non-dynamic delegate of a dynamic ``patcher`` (``get_non_dynamic_delegate``: the model
    loaded again from its file by a plain ModelPatcher, once, then cached on ``patcher``), made
    outside inference mode so its weights are ordinary tensors; ``patcher`` itself otherwise."""
    if not _is_dynamic(patcher):
        return patcher
    try:
        with torch.inference_mode(False):
            return patcher.get_non_dynamic_delegate()
    except (AttributeError, RuntimeError) as e:
        raise ValueError(
            f"{what}: ComfyUI streams this model's weights to the GPU (dynamic VRAM), and training needs a fully "
            f"loaded copy, which its loader cannot make ({e}). Load it with a core loader (Load Checkpoint, Load "
            "Diffusion Model, Load CLIP), or start ComfyUI with --disable-dynamic-vram") from None


def static_models(model, clip):
    """The MODEL and CLIP a training run trains through: the same objects, except under dynamic VRAM.

    ComfyUI's dynamic VRAM (v0.16+, the default on NVIDIA cards) streams each weight to the GPU for
    the operation that needs it, so ``load_models_gpu(..., force_full_load=True)`` no longer loads a
    model, and a text encoder runs where its table happens to be. Core trains through a fully loaded
    copy of its own (the LoRA trainer's ``clone(force_deepcopy=True)``; the sampler's
    ``get_non_dynamic_delegate`` when hooks need one); the run does the same with core's delegate,
    so its gradients are those of an ordinary load. It costs what core's copy costs: the model is
    read from its file once more (then kept with the original) and held in RAM twice. On the CPU, and
    with ``--disable-dynamic-vram``, nothing is copied."""
    model = _static_patcher(model, "model")
    patcher = _static_patcher(clip.patcher, "clip")
    if patcher is not clip.patcher:
        clip = clip.clone()
        clip.patcher = patcher
        clip.cond_stage_model = patcher.model  # CLIP.clone() keeps the dynamic encoder's module
    return model, clip


@dataclass
class ComfyHost:
    """Everything the trainer needs, over one MODEL/CLIP(/VAE) triple."""

    text_side: SimpleTextSide
    denoiser: ComfyDenoiser
    latent_encoder: ComfyLatentEncoder | None
    device: torch.device
    dtype: torch.dtype  # the UNet's compute dtype (fp16/bf16 on GPUs, fp32 on the CPU)


def _compute_dtype(model) -> torch.dtype:
    return model.model.manual_cast_dtype or model.model.get_dtype()


@contextlib.contextmanager
def _in_training() -> Iterator[None]:
    """ComfyUI's own training flag (``model_management.in_training``, v0.2x+) for the duration: where it is set,
    models take their differentiable paths (Flux's RoPE in plain torch instead of comfy_kitchen's kernel, which
    has no backward), as core's LoRA trainer sets it. Older ComfyUIs have no flag and one path."""
    mm = comfy.model_management
    if not hasattr(mm, "in_training"):
        yield
        return
    before, mm.in_training = mm.in_training, True
    try:
        yield
    finally:
        mm.in_training = before


@contextlib.contextmanager
def training_host(model, clip, vae=None, train_t5: bool = False) -> Iterator[ComfyHost]:
    """Load MODEL and CLIP fully (as ComfyUI's own trainer does) and make them differentiable.

    Inside the block autograd is on and inference mode off (a prompt runs under
    ``torch.inference_mode()``). Encode images before entering, or with ``host.latent_encoder``:
    the VAE is not kept loaded. On exit the CLIP and T5 layers get their own forward back; the thawed
    tensors stay (same values, so later sampling is unchanged). ``train_t5``: T5 (SD3, Flux) learns its
    own rows too; by default it is frozen at the concept's initial rows (``comfy_text_side``).
    """
    encoder_keys(clip)
    model, clip = static_models(model, clip)  # already the static ones when the caller made them
    with torch.inference_mode(False), torch.enable_grad():
        comfy.model_management.load_models_gpu([model, clip.patcher], force_full_load=True)
        thaw(model.model)
        thaw(clip.cond_stage_model)
        denoiser = ComfyDenoiser(model)
        dtype = _compute_dtype(model)  # fp16 gradients are protected by the trainer's loss scaling
        latent_encoder = ComfyLatentEncoder(vae, model) if vae is not None else None
        with out_of_place_clip_layers(clip.cond_stage_model), sdpa_attention(model), _in_training():
            yield ComfyHost(comfy_text_side(clip, train_t5), denoiser, latent_encoder, torch.device(model.load_device),
                            dtype)


# ---------------------------------------------------------------- precision and memory

_PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def training_precision(host: ComfyHost, precision: str) -> tuple[str | None, str]:
    """The trainer's ``(autocast_dtype, loss_scale)`` for a user's ``precision`` choice.

    - ``"auto"``: the UNet's own compute dtype (``host.dtype``, what ComfyUI chose when it loaded the
      model): fp16 -> ("fp16", "dynamic"), bf16 -> ("bf16", "none"), fp32 -> (None, "none").
    - ``"fp16"`` -> ("fp16", "dynamic"); ``"bf16"`` -> ("bf16", "none"): autocast on a GPU. On the CPU
      the trainer never autocasts, so there the UNet runs in ``host.dtype`` whatever the choice.
    - ``"fp32"`` -> no autocast. It cannot upcast weights from here: the UNet computes in
      ``host.dtype``. ComfyUI stores the weights in one dtype and, where the device cannot compute in
      it, casts them per layer to its ``manual_cast_dtype`` (always fp32 on the CPU, so ``--fp16-unet``
      there still computes in fp32); on a GPU that runs fp16 natively, fp16 weights compute in fp16
      even with "fp32" chosen here (load the model with ``--fp32-unet`` or a loader's fp32 weight
      dtype, or use ``with_compute_dtype``, for true fp32). So "fp32" with an fp16 ``host.dtype``
      keeps dynamic loss scaling: (None, "dynamic").

    The rule behind every row: the loss is scaled dynamically exactly when the UNet's backward runs in
    fp16 (its 5-bit exponent underflows small gradients and overflows large ones); bf16 has fp32's
    exponent range and needs no scaling.
    """
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "auto":
        precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(host.dtype, "fp32")
    if precision == "fp16":
        return "fp16", "dynamic"
    if precision == "bf16":
        return "bf16", "none"
    return None, ("dynamic" if host.dtype == torch.float16 else "none")


def with_compute_dtype(model, precision: str):
    """A clone of MODEL whose UNet computes in ``precision`` ("fp32" / "bf16" / "fp16") on any device,
    weights cast per layer (ComfyUI's manual cast, as its LoRA trainer sets the training dtype);
    "auto" returns ``model`` itself. Load the clone (``training_host``) instead of the original."""
    if precision == "auto":
        return model
    if precision not in _PRECISION_DTYPES:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    m = model.clone()
    m.set_model_compute_dtype(_PRECISION_DTYPES[precision])
    return m


def _checkpointed(original):
    """``original`` (a bound forward) recomputed in backward instead of keeping its activations."""

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        opts = kwargs.get("transformer_options")
        if isinstance(opts, dict):
            # The UNet rewrites this dict as it goes (block, block_index, ...): the recomputation in
            # backward must see the values of the forward pass, so the block gets its own copy.
            kwargs = dict(kwargs, transformer_options=dict(opts))
        return torch.utils.checkpoint.checkpoint(original, *args, use_reentrant=False, **kwargs)

    return forward


@contextlib.contextmanager
def gradient_checkpointing(model) -> Iterator[int]:
    """UNet gradient checkpointing for the duration: each ResBlock and transformer block of the UNet
    (``model``: a MODEL, its BaseModel or the UNet) keeps only its inputs in the forward pass and is
    recomputed in backward (``torch.utils.checkpoint``, non-reentrant), the idea of ComfyUI's own
    LoRA trainer (``gradient_checkpointing``), at the granularity diffusers uses. Less activation
    memory (SDXL on 8-12 GB cards) for one more UNet forward per step; gradients are unchanged.
    The blocks get their own forward back on exit, so sampling elsewhere is untouched. Yields the
    number of blocks wrapped."""
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    base = getattr(model, "model", model)  # a ModelPatcher's BaseModel
    unet = getattr(base, "diffusion_model", base)
    blocks = [m for m in unet.modules() if isinstance(m, (ResBlock, BasicTransformerBlock))]
    saved = []
    for m in blocks:
        saved.append(m.__dict__.get("forward"))
        m.forward = _checkpointed(m.forward)
    try:
        yield len(blocks)
    finally:
        for m, own in zip(blocks, saved):
            if own is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = own
