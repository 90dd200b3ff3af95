"""A small text-conditional UNet for the miniature world (pure PyTorch).

The same shape as Stable Diffusion's UNet, scaled down: residual blocks with a timestep embedding,
cross-attention from image positions to the text encoder's hidden states, self-attention in the
middle, skip connections between the down and up paths. As in SD1.x/SD2.x, the text reaches the
image only through cross-attention to the context c that textual inversion differentiates
(seeds/000 Eq. 4); there is no pooled-text path (world v1 had one, GLIDE-style, which SD1/SD2 lack).
It predicts epsilon (Ho et al. 2020), so ``inversion.hosts.hf.ScheduledDenoiser`` wraps it as is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNetConfig", "WorldUNet", "timestep_embedding"]


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 3
    base: int = 16  # channels at full resolution, where little more than edges is drawn (CPU time ~ square)
    # Channel multiplier per resolution (32, 16, 8, 4 for 32x32 input). Measured per training step
    # (batch 24, 2 threads): 24 px (1,4,4) 0.14 s; 32 px (1,4,4) 0.18 s; 32 px (1,2,4,6) 0.12 s with
    # 1.4M parameters: a fourth level costs less than wide channels at 16 px and adds depth.
    mults: tuple[int, ...] = (1, 2, 4, 6)
    attn: tuple[bool, ...] = (False, True, True, True)  # cross-attention per resolution (not at full size, like SD's 8x8 ... 64x64 latents minus one)
    context_dim: int = 64  # width of the text encoder's hidden states
    heads: int = 4
    groups: int = 8  # GroupNorm groups
    time_dim: int = 128
    scale_shift: bool = True  # ADM's AdaGN: the (time + text) embedding scales and shifts each block's features

    def __post_init__(self) -> None:
        if len(self.mults) != len(self.attn):
            raise ValueError(f"UNetConfig: mults {self.mults} and attn {self.attn} need the same length")
        for m in self.mults:
            if (self.base * m) % self.groups or (self.base * m) % self.heads:
                raise ValueError(f"UNetConfig: channels {self.base * m} must divide by groups and heads")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        d = dict(d)
        for k in ("mults", "attn"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps [B] -> [B, dim] (Vaswani et al. 2017; DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int, groups: int, scale_shift: bool = False):
        super().__init__()
        self.scale_shift = scale_shift
        self.n1 = nn.GroupNorm(groups, cin)
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.t = nn.Linear(tdim, 2 * cout if scale_shift else cout)
        self.n2 = nn.GroupNorm(groups, cout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.c2.weight)  # each block starts as the identity: stabler from scratch
        nn.init.zeros_(self.c2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.silu(self.n1(x)))
        e = self.t(temb)[:, :, None, None]
        if self.scale_shift:  # Dhariwal & Nichol (2021): GroupNorm(h) * (1 + s) + b
            s, b = e.chunk(2, dim=1)
            h = self.n2(h) * (1 + s) + b
        else:
            h = self.n2(h + e)
        h = self.c2(F.silu(h))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention from image positions to ``context`` (itself when context is None)."""

    def __init__(self, ch: int, heads: int, groups: int, context_dim: int | None):
        super().__init__()
        self.heads = heads
        self.cross = context_dim is not None  # cross-attention to the text (else self-attention)
        self.norm = nn.GroupNorm(groups, ch)
        kv_dim = context_dim or ch
        self.q = nn.Linear(ch, ch, bias=False)
        self.k = nn.Linear(kv_dim, ch, bias=False)
        self.v = nn.Linear(kv_dim, ch, bias=False)
        self.out = nn.Linear(ch, ch)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        q_in = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        kv_in = q_in if context is None else context.to(x.dtype)

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, -1, self.heads, c // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(q_in)), split(self.k(kv_in)), split(self.v(kv_in)))
        a = self.out(a.transpose(1, 2).reshape(b, h * w, c))
        return x + a.transpose(1, 2).reshape(b, c, h, w)


class WorldUNet(nn.Module):
    """``forward(x_t, t, context, pooled=None) -> eps``; ``pooled`` is accepted and ignored."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = cfg = config
        chs = [cfg.base * m for m in cfg.mults]
        g, td = cfg.groups, cfg.time_dim
        self.time = nn.Sequential(nn.Linear(cfg.base, td), nn.SiLU(), nn.Linear(td, td))
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_res = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.downsample = nn.ModuleList()
        prev = chs[0]
        for i, ch in enumerate(chs):
            self.down_res.append(ResBlock(prev, ch, td, g, cfg.scale_shift))
            self.down_attn.append(Attention(ch, cfg.heads, g, cfg.context_dim) if cfg.attn[i] else nn.Identity())
            self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1) if i < len(chs) - 1 else nn.Identity())
            prev = ch
        self.mid1 = ResBlock(prev, prev, td, g, cfg.scale_shift)
        self.mid_self = Attention(prev, cfg.heads, g, None)
        self.mid_cross = Attention(prev, cfg.heads, g, cfg.context_dim)
        self.mid2 = ResBlock(prev, prev, td, g, cfg.scale_shift)
        self.up_res = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        for i in reversed(range(len(chs))):
            ch = chs[i]
            self.up_res.append(ResBlock(prev + ch, ch, td, g, cfg.scale_shift))
            self.up_attn.append(Attention(ch, cfg.heads, g, cfg.context_dim) if cfg.attn[i] else nn.Identity())
            prev = ch
        self.norm_out = nn.GroupNorm(g, prev)
        self.conv_out = nn.Conv2d(prev, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _attn(self, block: nn.Module, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return h if isinstance(block, nn.Identity) else block(h, context)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        context = context.to(x.dtype)
        temb = self.time(timestep_embedding(t.to(x.device), self.config.base).to(x.dtype))
        h = self.conv_in(x)
        skips = []
        for res, attn, down in zip(self.down_res, self.down_attn, self.downsample):
            h = self._attn(attn, res(h, temb), context)
            skips.append(h)
            h = down(h)
        h = self.mid1(h, temb)
        h = self.mid_self(h)
        h = self.mid_cross(h, context)
        h = self.mid2(h, temb)
        for i, (res, attn) in enumerate(zip(self.up_res, self.up_attn)):
            if i > 0:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = self._attn(attn, res(torch.cat([h, skips.pop()], dim=1), temb), context)
        return self.conv_out(F.silu(self.norm_out(h)))
