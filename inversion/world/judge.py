"""The judge: a small CNN that reads an image's ground-truth attributes (shape, colour, background,
size). It scores generated images: concept accuracy = the share judged to show the held-out
shape; prompt faithfulness = the share showing a requested attribute.

Trained on fresh renders with noise, blur and contrast augmentation so that it also reads the
imperfect images a small diffusion model draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .render import BACKGROUND_NAMES, COLOUR_NAMES, IMAGE_SIZE, SHAPES, SIZE_NAMES, Sample, render_batch, sample_labels

__all__ = ["ATTRIBUTES", "Judge", "JudgeTrainConfig", "train_judge", "labels_tensor", "judge_accuracy", "augment"]

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOUR_NAMES,
    "background": BACKGROUND_NAMES,
    "size": SIZE_NAMES,
}


def labels_tensor(samples: list[Sample]) -> dict[str, torch.Tensor]:
    return {
        "shape": torch.tensor([s.shape for s in samples]),
        "colour": torch.tensor([s.colour for s in samples]),
        "background": torch.tensor([s.background for s in samples]),
        "size": torch.tensor([s.size for s in samples]),
    }


class Judge(nn.Module):
    """``forward(images [B, 3, H, W] in [0, 1]) -> {attribute: logits}``; ``predict`` -> indices."""

    def __init__(self, width: int = 24):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        w = width
        self.features = nn.Sequential(block(3, w, 1), block(w, w, 1), block(w, 2 * w, 2), block(2 * w, 2 * w, 1),
                                      block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 1))
        self.heads = nn.ModuleDict({k: nn.Linear(8 * w, len(v)) for k, v in ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images * 2 - 1)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return {k: head(pooled) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        outs: dict[str, list[torch.Tensor]] = {k: [] for k in ATTRIBUTES}
        for lo in range(0, images.shape[0], batch_size):
            logits = self(images[lo:lo + batch_size].float())
            for k in ATTRIBUTES:
                outs[k].append(logits[k].argmax(-1))
        return {k: torch.cat(v) for k, v in outs.items()}


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise (sigma up to 0.08), a random 3x3 blur on half the batch, and a small contrast change."""
    b = images.shape[0]
    x = images
    blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), blur.expand(3, 1, 3, 3).contiguous(), groups=3)
    pick = (torch.rand(b, 1, 1, 1, generator=gen) < 0.5).float()
    x = pick * blurred + (1 - pick) * x
    scale = 1 + 0.15 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    x = (x - 0.5) * scale + 0.5
    x = x + torch.randn(x.shape, generator=gen) * 0.08 * torch.rand(b, 1, 1, 1, generator=gen)
    return x.clamp(0, 1)


@dataclass(frozen=True)
class JudgeTrainConfig:
    steps: int = 600  # ~3 min on 2 busy CPU cores; accuracy on fresh renders is 1.00 by then
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 1


def train_judge(config: JudgeTrainConfig = JudgeTrainConfig(), image_size: int = IMAGE_SIZE, log=print) -> Judge:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.1)
    judge.train()
    for step in range(config.steps):
        samples = [sample_labels(rng) for _ in range(config.batch_size)]
        images = augment(render_batch(samples, image_size), gen)
        labels = labels_tensor(samples)
        logits = judge(images)
        loss = sum(F.cross_entropy(logits[k], labels[k]) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step % 100 == 0 or step == config.steps - 1):
            log(f"judge step {step:5d} loss {loss.item():.4f}")
    return judge.eval()


def judge_accuracy(judge: Judge, n: int = 512, seed: int = 12345, image_size: int = IMAGE_SIZE,
                   augmented: bool = False) -> dict[str, float]:
    """Per-attribute accuracy on ``n`` fresh renders (a seed the training never used)."""
    rng = np.random.default_rng(seed)
    samples = [sample_labels(rng) for _ in range(n)]
    images = render_batch(samples, image_size)
    if augmented:
        images = augment(images, torch.Generator().manual_seed(seed))
    pred = judge.predict(images)
    labels = labels_tensor(samples)
    return {k: float((pred[k] == labels[k]).float().mean()) for k in ATTRIBUTES}
