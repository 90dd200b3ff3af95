"""The miniature world: procedural images of one object, their labels and their captions.

An image shows one flat-coloured shape of some size at some position on a flat background.
Five shapes have names; a sixth, the held-out ``crescent``, has none. In training captions it is
either the generic word ``thing`` (which named shapes also receive, so ``thing`` does not name it)
or ``HIDDEN_SLOT``, a placeholder that the world trainer fills with a vector trained with the
model but kept out of the tokenizer and the token table: a word the model learned and then lost.
The model can therefore draw the crescent from some conditioning, but no prompt made of words asks
for it; only a learned embedding can (Gal et al. 2022; seeds/000 Sec. 2). (A first design, with
``thing`` as the crescent's only caption, gave the model no conditioning that selects it, and
inversion could not raise its rate above that of "a photo of a thing".) Everything is
deterministic from a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.prompts import OBJECT_TEMPLATES

__all__ = [
    "SHAPES",
    "NAMED_SHAPES",
    "HELD_OUT",
    "COLOURS",
    "COLOUR_NAMES",
    "BACKGROUNDS",
    "BACKGROUND_NAMES",
    "SIZE_NAMES",
    "SIZES",
    "IMAGE_SIZE",
    "GENERIC",
    "HIDDEN_SLOT",
    "TEMPLATES",
    "WORDS",
    "Sample",
    "CaptionConfig",
    "render",
    "sample_labels",
    "caption",
    "render_batch",
    "training_batch",
    "concept_set",
]

# No "ring": it is the crescent's nearest neighbour, and a model this small confuses the two.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "crescent")
HELD_OUT = "crescent"  # the concept to invert: drawn in training, never named
NAMED_SHAPES: tuple[str, ...] = tuple(s for s in SHAPES if s != HELD_OUT)
GENERIC = "thing"  # the caption word for the held-out shape, and sometimes for the named ones
HIDDEN_SLOT = "<held-out>"  # training-caption placeholder of the held-out shape's lost word
# Objects are saturated hues, backgrounds neutral tones: a colour word then says by itself whether
# it is the object's or the background's, which a model this small learns much sooner than the
# binding "X thing on a Y background" with one shared palette.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.10),
    "orange": (0.96, 0.52, 0.08),
    "yellow": (0.95, 0.86, 0.12),
    "green": (0.12, 0.66, 0.22),
    "blue": (0.12, 0.28, 0.90),
    "purple": (0.58, 0.18, 0.74),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.06, 0.06, 0.06),
    "gray": (0.50, 0.50, 0.50),
    "white": (0.94, 0.94, 0.94),
    "brown": (0.42, 0.27, 0.14),
}
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)
IMAGE_SIZE = 32  # pixels per side of the world's images
SIZES: dict[str, float] = {"small": 0.27, "big": 0.40}  # large: a shape is a matter of a few pixels  # radius as a fraction of the image side
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)

# The object templates of textual inversion (inversion.data.prompts.OBJECT_TEMPLATES) whose extra words
# carry no meaning in this world: "small", "large", "dark" and "bright" would contradict the size
# and colour labels, so those templates are left out. Training captions use these prefixes, so a
# trainer that fills them with a placeholder stays in distribution.
_CONTRADICTING = frozenset({"small", "large", "dark", "bright"})
TEMPLATES: tuple[str, ...] = tuple(t for t in OBJECT_TEMPLATES if not set(t.split()) & _CONTRADICTING)


def _template_words() -> list[str]:
    words: list[str] = []
    for t in TEMPLATES:
        for w in t.replace("{}", " ").replace("-", " ").split():
            if w not in words:
                words.append(w)
    return words


WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(_template_words() + list(NAMED_SHAPES) + [GENERIC] + list(COLOURS) + list(BACKGROUNDS) + list(SIZES)
                  + ["on", "background"])
)


@dataclass(frozen=True)
class Sample:
    """Ground-truth labels of one image (indices into SHAPES, COLOUR_NAMES, BACKGROUND_NAMES, SIZE_NAMES)."""

    shape: int
    colour: int
    background: int
    size: int
    x: float  # centre, as a fraction of the side
    y: float
    mirror: bool  # crescent opening to the left instead of the right (other shapes are symmetric)
    jitter: tuple[float, ...] = (0.0,) * 6  # small RGB offsets of object and background

    @property
    def shape_name(self) -> str:
        return SHAPES[self.shape]

    @property
    def colour_name(self) -> str:
        return COLOUR_NAMES[self.colour]

    @property
    def background_name(self) -> str:
        return BACKGROUND_NAMES[self.background]

    @property
    def size_name(self) -> str:
        return SIZE_NAMES[self.size]


def _regular_polygon(n: int, r: float, cx: float, cy: float, phase: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(phase + 2 * math.pi * i / n), cy + r * math.sin(phase + 2 * math.pi * i / n))
            for i in range(n)]


def _mask(sample: Sample, size: int, supersample: int) -> Image.Image:
    s = size * supersample
    r = SIZES[sample.size_name] * s
    cx, cy = sample.x * s, sample.y * s
    m = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(m)
    name = sample.shape_name
    if name == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == "square":
        h = 0.8 * r
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif name == "triangle":
        d.polygon(_regular_polygon(3, r, cx, cy + 0.15 * r, -math.pi / 2), fill=255)
    elif name == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else 0.42 * r
            a = -math.pi / 2 + math.pi * i / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        d.polygon(pts, fill=255)
    elif name == "cross":
        w = 0.3 * r
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
    elif name == "crescent":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        off = (-1.0 if sample.mirror else 1.0) * 0.55 * r
        ri = 0.85 * r
        d.ellipse([cx + off - ri, cy - 0.1 * r - ri, cx + off + ri, cy - 0.1 * r + ri], fill=0)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(f"unknown shape {name!r}")
    return m.resize((size, size), Image.Resampling.BOX)


def render(sample: Sample, size: int = IMAGE_SIZE, supersample: int = 4) -> torch.Tensor:
    """The image [3, size, size] in [0, 1] of ``sample`` (anti-aliased by ``supersample``)."""
    if size < 8:
        raise ValueError(f"image size must be at least 8 pixels, got {size}")
    m = np.asarray(_mask(sample, size, supersample), dtype=np.float32)[None] / 255.0
    fg = np.asarray(COLOURS[sample.colour_name], dtype=np.float32) + np.asarray(sample.jitter[:3], np.float32)
    bg = np.asarray(BACKGROUNDS[sample.background_name], dtype=np.float32) + np.asarray(sample.jitter[3:], np.float32)
    img = m * fg[:, None, None] + (1.0 - m) * bg[:, None, None]
    return torch.from_numpy(np.clip(img, 0.0, 1.0))


def sample_labels(rng: np.random.Generator, *, shape: int | None = None, colour: int | None = None,
                  background: int | None = None, size: int | None = None, jitter: float = 0.03,
                  held_out_weight: float = 1.0) -> Sample:
    """Draw one random ``Sample``; keyword arguments fix attributes (indices).

    ``held_out_weight`` scales how often the held-out shape is drawn.
    """
    if shape is None:
        p = np.ones(len(SHAPES))
        p[SHAPES.index(HELD_OUT)] = held_out_weight
        shape = int(rng.choice(len(SHAPES), p=p / p.sum()))
    if colour is None:
        colour = int(rng.integers(len(COLOURS)))
    if background is None:
        background = int(rng.integers(len(BACKGROUNDS)))
    if size is None:
        size = int(rng.integers(len(SIZES)))
    r = SIZES[SIZE_NAMES[size]]
    margin = r + 0.04
    x, y = (float(v) for v in rng.uniform(margin, 1.0 - margin, size=2))
    mirror = bool(rng.integers(2))
    jit = tuple(float(v) for v in rng.uniform(-jitter, jitter, size=6))
    return Sample(shape, colour, background, size, x, y, mirror, jit)


@dataclass(frozen=True)
class CaptionConfig:
    """How training captions describe a sample. Each attribute is dropped independently so that
    short prompts ("a photo of a red thing", or a placeholder alone) stay in distribution."""

    generic_prob: float = 0.25  # any shape is called "thing" this often (so "thing" never names the held-out one)
    held_out_word: str | None = HIDDEN_SLOT  # the held-out shape's caption word otherwise (None: always "thing")
    drop_size: float = 0.35
    drop_colour: float = 0.3
    drop_background: float = 0.35
    drop_all: float = 0.1  # the empty caption: the unconditional branch of classifier-free guidance


def caption(sample: Sample, rng: np.random.Generator | None = None, config: CaptionConfig | None = None,
            template: str = "a photo of a {}") -> str:
    """The caption of ``sample``; with ``rng``, attributes are dropped/genericised per ``config``.

    Without ``rng`` the caption is complete, e.g. "a photo of a small red star on a gray background"
    (the held-out shape is "thing": no public caption names it).
    """
    held = sample.shape_name == HELD_OUT
    name = GENERIC if held else sample.shape_name
    size, colour, bg = sample.size_name, sample.colour_name, sample.background_name
    if rng is not None:
        config = config or CaptionConfig()
        if rng.random() < config.drop_all:
            return ""
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        generic = rng.random() < config.generic_prob
        if held:
            name = GENERIC if generic or config.held_out_word is None else config.held_out_word
        elif generic:
            name = GENERIC
        size = "" if rng.random() < config.drop_size else size
        colour = "" if rng.random() < config.drop_colour else colour
        bg = "" if rng.random() < config.drop_background else bg
    words = " ".join(w for w in (size, colour, name) if w)
    if bg:
        words += f" on a {bg} background"
    return template.format(words)


def render_batch(samples: Sequence[Sample], size: int = IMAGE_SIZE) -> torch.Tensor:
    """Images [N, 3, size, size] of ``samples``."""
    return torch.stack([render(s, size) for s in samples])


def training_batch(rng: np.random.Generator, n: int, size: int = IMAGE_SIZE, config: CaptionConfig | None = None,
                   held_out_weight: float = 1.0) -> tuple[torch.Tensor, list[str], list[Sample]]:
    """``n`` random images with their (attribute-dropped) captions and labels."""
    samples = [sample_labels(rng, held_out_weight=held_out_weight) for _ in range(n)]
    caps = [caption(s, rng, config) for s in samples]
    return render_batch(samples, size), caps, samples


def concept_set(n: int = 5, seed: int = 0, size: int = IMAGE_SIZE, colour: str = "yellow",
                backgrounds: Sequence[str] = ("black", "gray", "brown")) -> tuple[torch.Tensor, list[Sample]]:
    """The inversion task: ``n`` images of the held-out shape in one ``colour`` (the concept is a
    particular object), with sizes, positions and ``backgrounds`` varying."""
    if colour not in COLOURS:
        raise ValueError(f"colour {colour!r} is not one of {list(COLOURS)}")
    bad = [b for b in backgrounds if b not in BACKGROUNDS]
    if bad or not backgrounds:
        raise ValueError(f"backgrounds {list(backgrounds)}: use names from {list(BACKGROUNDS)} (unknown: {bad})")
    rng = np.random.default_rng(seed)
    samples = [
        sample_labels(rng, shape=SHAPES.index(HELD_OUT), colour=COLOUR_NAMES.index(colour),
                      background=BACKGROUND_NAMES.index(backgrounds[i % len(backgrounds)]))
        for i in range(n)
    ]
    return render_batch(samples, size), samples
