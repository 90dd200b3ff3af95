"""The world model's configuration, construction, saving and loading.

Text side: a transformers ``CLIPTextModel`` (tiny config) over a word-level ``CLIPTokenizer``,
wrapped as ``inversion.hosts.hf.HFTextEncoder`` under the key ``clip_l``, exactly as a real SD1
checkpoint is. Image side: ``WorldUNet`` on SD's scaled-linear DDPM schedule (epsilon prediction),
in pixel space.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load_file, save_file

from ..hosts.hf import HFTextEncoder, make_clip_tokenizer
from ..schedule import DDPMSchedule
from .render import WORDS
from .unet import UNetConfig, WorldUNet

__all__ = ["ASSETS", "TextConfig", "WorldConfig", "build_tokenizer", "build_text_model", "build_unet",
           "save_weights", "load_weights", "load_tokenizer"]

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


@dataclass(frozen=True)
class TextConfig:
    hidden: int = 64  # d of the token table: small, but CLIP-shaped (pre-norm, causal, EOS pooling)
    layers: int = 3
    heads: int = 4
    intermediate: int = 256
    max_length: int = 32  # captions are <= 16 tokens; room for a multi-vector placeholder


@dataclass(frozen=True)
class WorldConfig:
    image_size: int = 32  # world v1 drew at 24 px; 32 px with a fourth UNet level costs less per step
    # Stable Diffusion's scaled-linear betas (0.00085 to 0.012): seeds/000's timestep claims are made
    # in SD's indices, so the world puts each index at SD's noise level (world v1's cosine schedule put
    # SD's t=400, log-SNR -0.30, at t~544).
    schedule: str = "scaled_linear"
    num_timesteps: int = 1000
    text: TextConfig = field(default_factory=TextConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)

    def schedule_obj(self) -> DDPMSchedule:
        if self.schedule == "linear":
            return DDPMSchedule.make(self.num_timesteps, "linear", 1e-4, 0.02)
        if self.schedule == "scaled_linear":
            return DDPMSchedule.make(self.num_timesteps, "scaled_linear", 0.00085, 0.012)
        return DDPMSchedule.make(self.num_timesteps, self.schedule)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["unet"] = self.unet.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WorldConfig":
        d = dict(d)
        d["text"] = TextConfig(**d.get("text", {}))
        d["unet"] = UNetConfig.from_dict(d.get("unet", {}))
        return cls(**d)


def build_tokenizer(folder: str, config: WorldConfig):
    """The world's CLIP tokenizer (every caption word one token), written to ``folder``."""
    return make_clip_tokenizer(WORDS, folder, max_length=config.text.max_length)


def load_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    if not os.path.isfile(os.path.join(folder, "vocab.json")):
        raise ValueError(f"no tokenizer in {folder!r}; run `python -m inversion.world.train` to build the world")
    return CLIPTokenizer.from_pretrained(folder)


def build_text_model(tokenizer, config: WorldConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    t = config.text
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=t.hidden, intermediate_size=t.intermediate,
                         num_hidden_layers=t.layers, num_attention_heads=t.heads,
                         max_position_embeddings=t.max_length, projection_dim=t.hidden,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(cfg)


def build_unet(config: WorldConfig) -> WorldUNet:
    if config.unet.context_dim != config.text.hidden:
        raise ValueError(f"unet.context_dim {config.unet.context_dim} must equal text.hidden {config.text.hidden}")
    return WorldUNet(config.unet)


def build_encoder(text_model, tokenizer) -> HFTextEncoder:
    return HFTextEncoder(text_model, tokenizer, "clip_l", layer="last")


def save_weights(path: str, modules: dict[str, torch.nn.Module], meta: dict[str, str] | None = None,
                 dtype: torch.dtype = torch.float16) -> None:
    """One safetensors file; tensor names are ``<module>.<parameter>``; stored in ``dtype``."""
    tensors = {}
    for prefix, m in modules.items():
        for k, v in m.state_dict().items():
            tensors[f"{prefix}.{k}"] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    save_file(tensors, path, metadata=meta or {})


def load_weights(path: str, modules: dict[str, torch.nn.Module]) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"no weights at {path!r}; run `python -m inversion.world.train` to build the world")
    tensors = load_file(path)
    for prefix, m in modules.items():
        own = m.state_dict()
        sd = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        missing = [k for k in own if k not in sd]
        if missing:
            raise ValueError(f"{path}: weights for {prefix} lack {missing[:3]}; rebuild the world assets")
        bad = [k for k in own if sd[k].shape != own[k].shape]
        if bad:
            raise ValueError(f"{path}: {prefix}.{bad[0]} is {tuple(sd[bad[0]].shape)}, the code expects "
                             f"{tuple(own[bad[0]].shape)}; the assets are from another version of the world, "
                             "rebuild them with `python -m inversion.world.train`")
        m.load_state_dict({k: sd[k].to(own[k].dtype) for k in own})


def save_config(path: str, config: WorldConfig, extra: dict | None = None) -> None:
    d = config.to_dict()
    if extra:
        d.update(extra)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(d, f, indent=1, sort_keys=True)


def load_config(path: str) -> tuple[WorldConfig, dict]:
    if not os.path.isfile(path):
        raise ValueError(f"no world config at {path!r}; run `python -m inversion.world.train` to build the world")
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    known = {k: d[k] for k in ("image_size", "schedule", "num_timesteps", "text", "unet") if k in d}
    return WorldConfig.from_dict(known), {k: v for k, v in d.items() if k not in known}
