"""Tiny random models with real architectures, for tests and benchmarks.

- text: a transformers ``CLIPTextModel`` (and, for the SDXL-like case, a second
  ``CLIPTextModelWithProjection``) with a word-level CLIP tokenizer;
- denoiser: a small convolutional network with cross-attention to the context and an optional
  pooled-vector embedding, epsilon-prediction on a DDPM schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from inversion.host import SimpleTextSide
from inversion.hosts.hf import HFTextEncoder, PixelLatents, ScheduledDenoiser, make_clip_tokenizer
from inversion.schedule import DDPMSchedule

WORDS = (
    "a photo of the an in on with my cool nice small large big clean dirty dark bright good weird "
    "rendering cropped close-up rendition painting style picture one cat dog toy car red blue green "
    "yellow star circle square object thing background"
).split()


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TinyDenoiser(nn.Module):
    """conv -> (time, pooled) modulation -> cross-attention to the context -> conv."""

    def __init__(self, channels: int = 3, width: int = 32, ctx_dim: int = 32, pooled_dim: int = 0):
        super().__init__()
        self.width = width
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.temb = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.pemb = nn.Linear(pooled_dim, width) if pooled_dim else None
        self.norm = nn.GroupNorm(4, width)
        self.attn = nn.MultiheadAttention(width, 4, kdim=ctx_dim, vdim=ctx_dim, batch_first=True)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, t, context, pooled=None):
        h = self.inp(x)
        emb = self.temb(timestep_embedding(t, self.width).to(x.dtype))
        if self.pemb is not None and pooled is not None:
            emb = emb + self.pemb(pooled)
        h = h + emb[:, :, None, None]
        b, c, hh, ww = h.shape
        q = self.norm(h).flatten(2).transpose(1, 2)
        a, _ = self.attn(q, context, context, need_weights=False)
        h = h + a.transpose(1, 2).reshape(b, c, hh, ww)
        h = h + self.mid(torch.nn.functional.silu(h))
        return self.out(torch.nn.functional.silu(h))


@dataclass
class TinyWorld:
    text: SimpleTextSide
    denoiser: ScheduledDenoiser
    latents: PixelLatents
    net: TinyDenoiser
    tokenizer: object

    @property
    def encoder(self) -> HFTextEncoder:
        return self.text.encoders[0]


def _clip(tok, width: int, projection: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                         projection_dim=width, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(cfg).eval().requires_grad_(False)


def make_tiny(tok_dir: str, dual: bool = False, width: int = 32) -> TinyWorld:
    tok = make_clip_tokenizer(WORDS, tok_dir)
    enc_l = HFTextEncoder(_clip(tok, width, seed=1), tok, "clip_l")
    if dual:
        enc_g = HFTextEncoder(_clip(tok, 48, projection=True, seed=2), tok, "clip_g",
                              layer="penultimate", final_norm=False)
        text = SimpleTextSide([enc_l, enc_g], pooled_from="clip_g")
        ctx_dim, pooled_dim = width + 48, 48
    else:
        text = SimpleTextSide([enc_l])
        ctx_dim, pooled_dim = width, 0
    torch.manual_seed(3)
    net = TinyDenoiser(ctx_dim=ctx_dim, pooled_dim=pooled_dim).eval().requires_grad_(False)
    den = ScheduledDenoiser(net, DDPMSchedule.make(1000))
    return TinyWorld(text, den, PixelLatents(), net, tok)


def concept_images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    """A few images of one made-up concept: a bright square on a dark background, jittered."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.zeros(n, 3, size, size)
    imgs[:, 2] = 0.2
    for i in range(n):
        x, y = torch.randint(0, size // 2, (2,), generator=g).tolist()
        imgs[i, 0, y:y + size // 2, x:x + size // 2] = 0.9
        imgs[i, 1, y:y + size // 2, x:x + size // 2] = 0.6
    return imgs


def tiny_sd_components(tok_dir: str, words=("a grey tabby cat photo of the".split())) -> dict:
    """The parts of a tiny diffusers SD1-style pipeline (random weights): a 32-d CLIPTextModel with a word-level
    tokenizer, a two-level cross-attention UNet, a one-level VAE (latents at the image's size)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    tok = make_clip_tokenizer(list(words), tok_dir)
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(32,), latent_channels=4, norm_num_groups=8, sample_size=16)
    return {"text_encoder": te, "tokenizer": tok, "unet": unet, "vae": vae.eval().requires_grad_(False)}


def tiny_sd_pipeline_folder(folder: str) -> str:
    """A tiny diffusers ``StableDiffusionPipeline`` saved with ``save_pretrained`` into ``folder`` (SD's
    scaled-linear DDPM schedule, epsilon prediction); returns the folder."""
    import os

    from diffusers import DDPMScheduler, StableDiffusionPipeline

    parts = tiny_sd_components(os.path.join(folder, "_tokenizer"))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              clip_sample=False)
    pipe = StableDiffusionPipeline(**parts, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(os.path.join(folder, "pipe"))
    return os.path.join(folder, "pipe")



def tiny_sdxl_pipeline_folder(folder: str) -> str:
    """A tiny diffusers ``StableDiffusionXLPipeline`` (clip_l 32-d, clip_g 48-d with projection, a UNet with
    SDXL's text-and-size conditioning) saved into ``folder``; returns its path."""
    import os

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tok = make_clip_tokenizer("a grey tabby cat photo of the".split(), os.path.join(folder, "_tokenizer"))
    torch.manual_seed(0)

    def te(width, cls):
        return cls(CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                                  num_hidden_layers=2, num_attention_heads=4, projection_dim=width,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id))

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, cross_attention_dim=32 + 48, attention_head_dim=8,
                                norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=48 + 6 * 8)
    vae = AutoencoderKL(block_out_channels=(32,), latent_channels=4, norm_num_groups=8, sample_size=16)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te(32, CLIPTextModel), text_encoder_2=te(48, CLIPTextModelWithProjection),
                                     tokenizer=tok, tokenizer_2=tok, unet=unet,
                                     scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                                      beta_end=0.012))
    pipe.save_pretrained(os.path.join(folder, "pipe"))
    return os.path.join(folder, "pipe")
