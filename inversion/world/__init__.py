"""A miniature text-to-image world, small enough to train and invert on a CPU.

``load_world()`` returns the shipped model (trained by ``python -m inversion.world.train``):
a CLIP tokenizer and ``CLIPTextModel`` (as ``HFTextEncoder``, key ``clip_l``), a cross-attention
UNet on Stable Diffusion's 1000-step scaled-linear schedule with epsilon prediction (as
``ScheduledDenoiser``), pixel "latents", a DDIM sampler, the judge that reads attributes off images
(and may answer "none"), and the renderer of the world's images. This is world v2 (issue 12): SD's
schedule, uniform epsilon-MSE training, text only through cross-attention. The held-out
shape ``HELD_OUT`` is drawn by the model but named by no word (its word was trained with the
model and then removed, see ``inversion.world.render``): inverting it is the test task.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..embedding import LearnedEmbedding
from ..host import SimpleTextSide
from ..hosts.hf import HFTextEncoder, PixelLatents, ScheduledDenoiser
from . import render
from .judge import ATTRIBUTES, Judge
from .model import (ASSETS, WorldConfig, build_encoder, build_text_model, build_unet, load_config, load_tokenizer,
                    load_weights)
from .render import GENERIC, HELD_OUT, SHAPES, TEMPLATES, WORDS, concept_set
from .sample import Sampler, encode_prompts
from .unet import WorldUNet

__all__ = ["World", "load_world", "HELD_OUT", "GENERIC", "SHAPES", "TEMPLATES", "WORDS", "concept_set"]


@dataclass
class World:
    """Everything the demo, the benchmarks and the tests need, frozen and in eval mode."""

    config: WorldConfig
    tokenizer: object
    encoder: HFTextEncoder
    text: SimpleTextSide
    denoiser: ScheduledDenoiser
    latents: PixelLatents
    unet: WorldUNet
    judge: Judge
    sampler: Sampler
    renderer: object = render  # the ``inversion.world.render`` module
    info: dict = field(default_factory=dict)  # training summary from world.json
    held_out_word: torch.Tensor | None = None  # [1, d] the lost word (for evaluation only), if shipped

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def templates(self) -> tuple[str, ...]:
        return TEMPLATES

    def word_ids(self) -> list[int]:
        """Token ids of the world's words (the rows of the token table that training used)."""
        ids = []
        for w in WORDS:
            toks = self.encoder.tokenize(w)
            if len(toks) == 1:
                ids.append(toks[0])
        return sorted(set(ids))

    def vocab_norms(self) -> torch.Tensor:
        """Norms of the trained token-table rows (the world's words): the in-distribution range."""
        table = self.encoder.token_table().detach().float()
        return table[self.word_ids()].norm(dim=-1)

    def generate(self, prompts: Sequence[str], embeddings=None, seed: int = 0, **kw) -> torch.Tensor:
        return self.sampler.generate(prompts, embeddings, seed=seed, **kw)

    def judge_images(self, images: torch.Tensor) -> dict[str, list[str]]:
        """Attribute names the judge reads off ``images`` [N, 3, H, W] in [0, 1]."""
        pred = self.judge.predict(images)
        return {k: [ATTRIBUTES[k][i] for i in v.tolist()] for k, v in pred.items()}

    @staticmethod
    def concept_share(shapes: Sequence[str]) -> float:
        """Share of judged shape names (``judge_images(...)["shape"]``) that are the held-out shape."""
        return sum(s == HELD_OUT for s in shapes) / len(shapes)

    def lost_word(self, placeholder: str = "<lost>") -> LearnedEmbedding | None:
        """The held-out shape's removed word as an embedding under ``placeholder`` (for evaluation
        only: a reference to compare inversions with), or None if the assets do not ship it."""
        if self.held_out_word is None:
            return None
        return LearnedEmbedding("lost", {"clip_l": self.held_out_word.float()}, placeholder)

    def conditioning(self, prompts: Sequence[str], embeddings=None):
        return encode_prompts(self.text, prompts, embeddings)


def load_world(folder: str | os.PathLike | None = None, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, judge_folder: str | os.PathLike | None = None) -> World:
    """Load the world model, judge and tokenizer from ``folder`` (default: the shipped assets); the
    judge from ``judge_folder`` when given (the worlds kept during training have none of their own)."""
    folder = os.fspath(folder or ASSETS)
    config, info = load_config(os.path.join(folder, "world.json"))
    tokenizer = load_tokenizer(folder)
    text_model = build_text_model(tokenizer, config)
    unet = build_unet(config)
    load_weights(os.path.join(folder, "world.safetensors"), {"text": text_model, "unet": unet})
    judge = Judge()
    load_weights(os.path.join(os.fspath(judge_folder or folder), "judge.safetensors"), {"judge": judge})
    for m in (text_model, unet, judge):
        m.to(device, dtype).eval().requires_grad_(False)
    encoder = build_encoder(text_model, tokenizer)
    text = SimpleTextSide([encoder])
    denoiser = ScheduledDenoiser(unet, config.schedule_obj(), "epsilon")
    sampler = Sampler(text, denoiser, config.image_size)
    lost = None
    lost_path = os.path.join(folder, "held_out_word.safetensors")
    if os.path.isfile(lost_path):
        from safetensors.torch import load_file

        lost = load_file(lost_path)["vector"].to(device, dtype)
    return World(config, tokenizer, encoder, text, denoiser, PixelLatents(), unet, judge, sampler, render, info,
                 lost)
