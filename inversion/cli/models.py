"""The command line's model: the miniature world, a diffusers folder, or a single-file SD1.x / SD2.x / SDXL
checkpoint, as the library's host protocols (``inversion.hosts.hf``).

- SD1.x: ``clip_l``, its last hidden state (after the final norm); SD2.x: ``clip_h`` (diffusers' SD2 text
  encoder already ends at the penultimate layer, normed); SDXL: ``clip_l`` and ``clip_g`` penultimate,
  without the final norm, pooled from ``clip_g``'s projection, and the UNet's added size conditioning
  for an uncropped image of the training size (what ComfyUI's adapter and KSampler use).
- the denoiser: the UNet with the pipeline scheduler's ``alphas_cumprod`` and prediction type
  (epsilon or v), the loss in epsilon as everywhere in this project.
- latents: the VAE's posterior mean times its scaling factor, encoded once per image.

Weights load in float32 on the CPU and float16 on a CUDA device (autocast fp16 with dynamic loss
scaling, as the nodes' "auto" precision gives an fp16 model); every module is frozen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..host import SimpleTextSide
from ..hosts.hf import HFTextEncoder, ScheduledDenoiser, VAELatents, unet_fn
from ..schedule import DDPMSchedule
from .config import WORLD

__all__ = ["Model", "load_model", "sdxl_unet_fn"]


@dataclass
class Model:
    """A loaded model as the trainer takes it, and what the command line needs to know of it."""

    text: SimpleTextSide
    denoiser: object
    latents: object
    family: str  # "world" | "SD1.x" | "SD2.x" | "SDXL"
    native_size: int  # the image size it was trained at: a concept's size = 0 means this
    device: torch.device
    autocast_dtype: str | None = None  # "fp16" on CUDA
    loss_scale: str = "none"
    option_defaults: dict = field(default_factory=dict)  # Training Options this model needs by default


def load_model(spec: str, device: torch.device, model_config: str = "") -> Model:
    """``spec``: ``"miniature-world"``, a diffusers folder (``model_index.json``), or a checkpoint file."""
    if spec == WORLD:
        return _world(device)
    path = Path(spec)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"model: {path} is a folder without model_index.json; give a diffusers pipeline folder "
                             f"(save_pretrained), a checkpoint file, or {WORLD!r}")
        return _diffusers(path, device, single_file=False)
    if path.is_file():
        return _diffusers(path, device, single_file=True, model_config=model_config)
    raise ValueError(f"model: {spec} is neither a file nor a folder; give a diffusers folder, a .safetensors/.ckpt "
                     f"checkpoint, or {WORLD!r}")


def _world(device: torch.device) -> Model:
    from ..world import load_world

    world = load_world(device=device)
    # The world's vocabulary is its own: its prompt templates, not the photo templates of SD's.
    return Model(world.text, world.denoiser, world.latents, "world", world.image_size, device,
                 option_defaults={"templates": "custom", "custom_templates": "\n".join(world.templates)})


def sdxl_unet_fn(unet: torch.nn.Module, latent_downscale: int = 8):
    """An SDXL ``UNet2DConditionModel`` as ``fn(x, t, context, pooled)``: the pooled text embedding and the
    size conditioning (original size = target size = the latent's size in pixels, no crop) as
    ``added_cond_kwargs``."""

    def fn(x, t, context, pooled):
        h, w = x.shape[-2] * latent_downscale, x.shape[-1] * latent_downscale
        ids = torch.tensor([h, w, 0, 0, h, w], device=x.device, dtype=x.dtype).expand(x.shape[0], -1)
        return unet(x, t, encoder_hidden_states=context.to(x.dtype),
                    added_cond_kwargs={"text_embeds": pooled.to(x.dtype), "time_ids": ids}).sample

    return fn


def _pipeline_class(path: Path, single_file: bool):
    import diffusers

    if not single_file:
        name = json.loads((path / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
        return diffusers.StableDiffusionXLPipeline if "XL" in name else diffusers.StableDiffusionPipeline
    from safetensors import safe_open

    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
        if any(k.startswith("conditioner.embedders.1.") for k in keys):
            return diffusers.StableDiffusionXLPipeline
    return diffusers.StableDiffusionPipeline


def _diffusers(path: Path, device: torch.device, single_file: bool, model_config: str = "") -> Model:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise ValueError("model: a diffusers model needs diffusers installed (pip install diffusers)") from None
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    cls = _pipeline_class(path, single_file)
    kw = {"torch_dtype": dtype} if dtype != torch.float32 else {}  # float32 is diffusers' default
    if single_file:
        if model_config:
            kw["config"] = model_config
        try:
            pipe = cls.from_single_file(str(path), **kw)
        except Exception as e:  # noqa: BLE001 - offline without a local config is the usual cause
            raise ValueError(f"model: diffusers could not load the checkpoint {path} ({type(e).__name__}: {e}); "
                             "offline, set model_config to a local diffusers folder of the same family "
                             "(its configs and tokenizers)") from None
    else:
        pipe = cls.from_pretrained(str(path), **kw)
    for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None), pipe.unet, pipe.vae):
        if m is not None:
            m.to(device).eval().requires_grad_(False)
    sched = pipe.scheduler
    schedule = DDPMSchedule(sched.alphas_cumprod.double().cpu())
    prediction = sched.config.get("prediction_type", "epsilon")
    latents = VAELatents(pipe.vae)
    if cls.__name__ == "StableDiffusionXLPipeline":
        text = SimpleTextSide([
            HFTextEncoder(pipe.text_encoder, pipe.tokenizer, "clip_l", layer="penultimate", final_norm=False),
            HFTextEncoder(pipe.text_encoder_2, pipe.tokenizer_2, "clip_g", layer="penultimate", final_norm=False),
        ], pooled_from="clip_g")
        denoiser = ScheduledDenoiser(sdxl_unet_fn(pipe.unet), schedule, prediction)
        family, native = "SDXL", 1024
    else:
        width = int(pipe.text_encoder.get_input_embeddings().weight.shape[1])
        key, family = ("clip_h", "SD2.x") if width == 1024 else ("clip_l", "SD1.x")
        text = SimpleTextSide([HFTextEncoder(pipe.text_encoder, pipe.tokenizer, key)])
        denoiser = ScheduledDenoiser(unet_fn(pipe.unet), schedule, prediction)
        native = int(pipe.unet.config.sample_size) * 8
    return Model(text, denoiser, latents, family, native, device, "fp16" if cuda else None,
                 "dynamic" if cuda else "none")
