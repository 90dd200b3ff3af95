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
import comfy.sd1_clip
import comfy.sdxl_clip

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

_SUPPORTED_CLIPS = (comfy.sd1_clip.SD1ClipModel, comfy.sdxl_clip.SDXLClipModel)


def encoder_keys(clip) -> list[str]:
    """The CLIP text encoders inside a ComfyUI CLIP object, e.g. ["clip_l", "clip_g"] for SDXL."""
    csm = getattr(clip, "cond_stage_model", None)
    if not isinstance(csm, _SUPPORTED_CLIPS):
        raise TypeError(
            f"clip: textual inversion here supports the CLIP text encoders of SD1.x, SD2.x and SDXL "
            f"checkpoints, got {type(csm).__name__}; load an SD1/SD2/SDXL checkpoint (or DualCLIPLoader "
            "type sdxl) and wire its CLIP output"
        )
    keys = [k for k in ENCODER_KEYS if isinstance(getattr(csm, k, None), comfy.sd1_clip.SDClipModel)
            and isinstance(getattr(clip.tokenizer, k, None), comfy.sd1_clip.SDTokenizer)]
    if not keys:
        raise TypeError(f"clip: found no clip_l/clip_h/clip_g text encoder in {type(csm).__name__}")
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
    """``inversion.host.TextEncoder`` for one text encoder (``key``) inside a ComfyUI CLIP."""

    def __init__(self, clip, key: str):
        if key not in encoder_keys(clip):
            raise ValueError(f"clip has no text encoder {key!r}; it has {encoder_keys(clip)}")
        self.clip = clip
        self.key = key
        self.module = getattr(clip.cond_stage_model, key)  # sd1_clip.SDClipModel
        self.tokenizer = getattr(clip.tokenizer, key)  # sd1_clip.SDTokenizer
        self.width = int(self.module.transformer.get_input_embeddings().weight.shape[1])
        self.max_length = int(self.tokenizer.max_length)
        self.bos_id = int(self.tokenizer.start_token)
        self.eos_id = int(self.tokenizer.end_token)
        self.pad_id = int(self.tokenizer.pad_token)

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
        device = _apply_clip_options(self.clip)
        rows = vectors.unbind(0)
        batch = [[rows[s] if s >= 0 else i for i, s in zip(id_row, slot_row)]
                 for id_row, slot_row in zip(ids.tolist(), slots.tolist())]
        with _device_context(device):
            out = self.module(batch)
        return EncoderOutput(out[0], out[1])


def comfy_text_side(clip) -> SimpleTextSide:
    """The CLIP's encoders as one ``TextSide``; SDXL's pooled output comes from clip_g."""
    keys = encoder_keys(clip)
    pooled = "clip_g" if isinstance(clip.cond_stage_model, comfy.sdxl_clip.SDXLClipModel) else None
    return SimpleTextSide([ComfyTextEncoder(clip, k) for k in keys], pooled_from=pooled)


class ComfyDenoiser:
    """``inversion.host.Denoiser`` over a ComfyUI MODEL (ModelPatcher) with a discrete schedule.

    ``add_noise``: x_t = x0 + sigma_t * eps (ComfyUI's convention, the input ``apply_model``
    expects); ``predict_eps``: (x_t - apply_model(x_t, sigma_t)) / sigma_t.
    """

    def __init__(self, model, *, latent_downscale: int = 8):
        self.patcher = model
        self.base = model.model  # comfy.model_base.BaseModel
        sampling = model.get_model_object("model_sampling")
        sigmas = getattr(sampling, "sigmas", None)
        if not isinstance(sampling, comfy.model_sampling.EPS) or sigmas is None or sigmas.ndim != 1:
            raise TypeError(
                f"model: textual inversion needs a discrete-timestep diffusion model (SD1.x, SD2.x, SDXL); "
                f"this MODEL uses {type(sampling).__name__}, which is not supported"
            )
        self.sampling = sampling
        self.sigmas = sigmas.detach().float().cpu()
        self.num_timesteps = int(self.sigmas.shape[0])
        self.prediction = type(sampling).__name__
        self.uses_adm = int(getattr(self.base, "adm_channels", 0) or 0) > 0
        self.latent_downscale = latent_downscale
        self.device = model.load_device

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigmas[t.detach().long().cpu()]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.sigma(t).to(x0.device, x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return x0 + s * noise

    def _adm(self, cond: Conditioning, x: torch.Tensor) -> torch.Tensor:
        if cond.pooled is None:
            raise ValueError("model: this model needs a pooled text embedding (SDXL's clip_g); wire the "
                             "CLIP that came with the model")
        h, w = x.shape[-2] * self.latent_downscale, x.shape[-1] * self.latent_downscale
        # Size conditioning as for an uncropped image of the training size (what KSampler uses
        # for a latent of this size with a plain CLIPTextEncode).
        return self.base.encode_adm(pooled_output=cond.pooled, width=w, height=h, device=x.device)

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x = x_t.to(self.device, torch.float32)
        sigma = self.sigma(t).to(self.device)
        context = cond.context
        extra = {}
        if self.uses_adm:
            extra["y"] = self._adm(cond, x)
        options = dict(self.patcher.model_options.get("transformer_options", {}))
        options.update(cond_or_uncond=[0], uuids=[None], sigmas=sigma)
        x0 = self.base.apply_model(x, sigma, c_crossattn=context, transformer_options=options, **extra)
        return (x - x0) / sigma.view(-1, *([1] * (x.ndim - 1)))


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


@contextlib.contextmanager
def out_of_place_clip_layers(module: torch.nn.Module) -> Iterator[int]:
    """Give every ``CLIPLayer`` instance in ``module`` an out-of-place forward; restored on exit."""
    params = list(inspect.signature(comfy.clip_model.CLIPLayer.forward).parameters)
    if params != _CLIP_LAYER_ARGS:
        raise RuntimeError(f"ComfyUI's CLIPLayer.forward{tuple(params)} changed; nodes/comfy_host.py "
                           "must be updated for this ComfyUI version")
    layers = [m for m in module.modules() if isinstance(m, comfy.clip_model.CLIPLayer)
              and "forward" not in m.__dict__]
    for m in layers:
        m.forward = types.MethodType(_clip_layer_forward, m)
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
def training_host(model, clip, vae=None) -> Iterator[ComfyHost]:
    """Load MODEL and CLIP fully (as ComfyUI's own trainer does) and make them differentiable.

    Inside the block autograd is on and inference mode off (a prompt runs under
    ``torch.inference_mode()``). Encode images before entering, or with ``host.latent_encoder``:
    the VAE is not kept loaded. On exit the CLIP layers get their own forward back; the thawed
    tensors stay (same values, so later sampling is unchanged).
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
        with out_of_place_clip_layers(clip.cond_stage_model), sdpa_attention(model):
            yield ComfyHost(comfy_text_side(clip), denoiser, latent_encoder, torch.device(model.load_device), dtype)


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
