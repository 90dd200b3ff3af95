"""Class mode of the initialisation: zero-shot classification with an open_clip model from disk.

*An Image is Worth One Sentence* (seeds/001, Sec. 3) also initialises the learned tokens from the
concept image's class label (one vector per token of the label); object-class init converges
faster than "*" but slower than a caption (seeds/001, Fig. 3). Here the classifier is CLIP used
zero-shot (Radford et al. 2021): the label whose text embedding, averaged over prompt templates,
has the highest cosine similarity with the image embedding wins; with several images their
softmax probabilities are averaged.

Labels: the ImageNet-1k class names shipped in ``data/imagenet_classes.txt`` (the curated names
of OpenAI's CLIP zero-shot evaluation, line i = class i), or the user's own list.

Models load from local files only, never downloaded: a folder holding ``open_clip_config.json``
and its weights (the layout of an open_clip hub repository), or a single weights file whose
architecture is given, read from a ``<file stem>.json`` open_clip config beside it, or found as a
built-in open_clip model name at the start of the file name (``ViT-B-32-laion2b_s34b_b79k.safetensors``).
Preprocessing is done here with torch (``imageprep.clip_preprocess``), not open_clip's
torchvision transforms.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..data.imageprep import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess, crop_to_masks

__all__ = [
    "DEFAULT_TEMPLATES",
    "ClassResult",
    "OpenClip",
    "classify_images",
    "find_open_clip_models",
    "imagenet_classes",
    "import_open_clip",
    "label_features",
    "load_open_clip",
    "parse_labels",
]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_CONFIG_NAME = "open_clip_config.json"
# A few of CLIP's ImageNet templates: most of the 80-template ensemble's gain at 1/20 of the cost
# (1000 labels x 80 templates is minutes of text encoding on a CPU).
DEFAULT_TEMPLATES = ("a photo of a {}.", "a close-up photo of a {}.", "a photo of the {}.", "a rendering of a {}.")
_DATA = Path(__file__).resolve().parent.parent / "data"


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names (CLIP's curated wording), index = ImageNet class id."""
    with open(_DATA / "imagenet_classes.txt", encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def parse_labels(text: str) -> list[str]:
    """A label list typed by a user: one label per line, or comma-separated on a single line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if len(lines) == 1 and "," in lines[0]:
        lines = [p.strip() for p in lines[0].split(",") if p.strip()]
    seen: dict[str, None] = {}
    for ln in lines:
        seen.setdefault(ln, None)
    if not seen:
        raise ValueError("the label list is empty: give one label per line (or comma-separated), "
                         "or use the ImageNet-1k names")
    return list(seen)


def import_open_clip():
    """The ``open_clip`` module, or an ImportError that says how to install it."""
    try:
        import open_clip
    except ImportError as e:
        raise ImportError(
            "class mode and open_clip text towers need the open_clip_torch package (pip install "
            f"open_clip_torch); importing it failed: {e}"
        ) from e
    return open_clip


def find_open_clip_models(search_dirs: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """open_clip models under ``search_dirs``: name -> path (folders with open_clip_config.json,
    and weight files, at the top level or one folder down)."""
    found: dict[str, Path] = {}

    def visit(p: Path, name: str) -> None:
        if p.is_dir() and (p / _CONFIG_NAME).is_file():
            found.setdefault(name, p)
        elif p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES:
            found.setdefault(name, p)

    for d in search_dirs:
        root = Path(d)
        if not root.is_dir():
            continue
        for child in sorted(root.iterdir()):
            visit(child, child.name)
            if child.is_dir() and not (child / _CONFIG_NAME).is_file():
                for grand in sorted(child.iterdir()):
                    visit(grand, f"{child.name}/{grand.name}")
    return found


def _resolve(name: str, search_dirs: Sequence[str | os.PathLike]) -> Path:
    p = Path(name).expanduser()
    if p.is_absolute():
        if p.exists():
            return p
        raise ValueError(f"open_clip model {str(p)!r} does not exist")
    found = find_open_clip_models(search_dirs)
    if name in found:
        return found[name]
    where = ", ".join(str(Path(d)) for d in search_dirs) or "(no folders given)"
    if not found:
        raise ValueError(
            f"no open_clip model found; looked in: {where}. Put an open_clip hub folder "
            f"({_CONFIG_NAME} + open_clip_model.safetensors) or a weights file named after its "
            "architecture (e.g. ViT-B-32-laion2b_s34b_b79k.safetensors) there"
        )
    raise ValueError(f"open_clip model {name!r} not found in {where}; available: {', '.join(sorted(found))}")


def _architecture(open_clip, path: Path, architecture: str | None) -> str:
    known = open_clip.list_models()
    if architecture:
        if architecture not in known:
            raise ValueError(f"open_clip architecture {architecture!r} is unknown; known: {', '.join(known)}")
        return architecture
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        with open(sidecar, encoding="utf-8") as f:
            cfg = json.load(f)
        cfg = cfg.get("model_cfg", cfg)
        if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ValueError(f"{sidecar} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
        if path.stem not in known:
            # open_clip's registry reads configs from files; this adds the sidecar under its stem.
            tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"inversion-open-clip-{os.getpid()}"
            tmp.mkdir(parents=True, exist_ok=True)
            with open(tmp / f"{path.stem}.json", "w", encoding="utf-8") as f:
                json.dump(cfg, f)
            open_clip.add_model_config(tmp / f"{path.stem}.json")
        return path.stem
    stem = path.stem.lower()
    matches = [m for m in known if stem == m.lower() or stem.startswith(m.lower() + "-") or stem.startswith(m.lower() + "_")]
    if matches:
        return max(matches, key=len)
    raise ValueError(
        f"cannot tell the open_clip architecture of {path.name}: name the file after it (e.g. "
        f"ViT-B-32-laion2b_s34b_b79k.safetensors), put an open_clip config {path.stem}.json beside it, "
        "or pass the architecture"
    )


def _precision(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


@dataclass
class OpenClip:
    """An open_clip model, its tokenizer and its image preprocessing."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    image_size: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def logit_scale(self) -> float:
        s = getattr(self.model, "logit_scale", None)
        return float(s.exp()) if isinstance(s, torch.Tensor) else 100.0

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def image_features(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Unnormalised image embeddings [B, D] of images in [0, 1] (differentiable)."""
        pixels = clip_preprocess(images, self.image_size, self.mean, self.std).to(self.device, self._dtype())
        return self.model.encode_image(pixels).float()

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Unnormalised text embeddings [N, D] (the projected pooled output of the text tower)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens).float()

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """L2-normalised image embeddings [B, D]."""
        return torch.nn.functional.normalize(self.image_features(images), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings [N, D]."""
        out = [self.text_features(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        return torch.nn.functional.normalize(torch.cat(out, 0), dim=-1)


def load_open_clip(
    name: str,
    search_dirs: Sequence[str | os.PathLike] = (),
    architecture: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> OpenClip:
    """Load an open_clip model from a local folder or file (see the module docstring); never downloads."""
    open_clip = import_open_clip()
    path = _resolve(name, search_dirs)
    device = torch.device(device)
    common = dict(precision=_precision(dtype), device=device, pretrained_image=False, pretrained_text=False,
                  require_pretrained=True)
    if path.is_dir():
        if not (path / _CONFIG_NAME).is_file():
            raise ValueError(f"{path} has no {_CONFIG_NAME}; use an open_clip hub folder or a weights file")
        model_id = f"local-dir:{path}"
        with open(path / _CONFIG_NAME, encoding="utf-8") as f:
            text_cfg = json.load(f).get("model_cfg", {}).get("text_cfg", {})
    else:
        arch = _architecture(open_clip, path, architecture)
        model_id = arch
        text_cfg = open_clip.get_model_config(arch).get("text_cfg", {})
        common["pretrained"] = str(path)
    if text_cfg.get("hf_model_name"):
        raise ValueError(f"{path.name} uses a Hugging Face text tower ({text_cfg['hf_model_name']}) that open_clip "
                         "would download; use a model with open_clip's own text transformer (the CLIP ViT models)")
    model = open_clip.create_model(model_id, **common).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_id)
    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = pp.get("size", getattr(model.visual, "image_size", 224))
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(float(x) for x in pp.get("mean", OPENAI_CLIP_MEAN))
    std = tuple(float(x) for x in pp.get("std", OPENAI_CLIP_STD))
    return OpenClip(model, tokenizer, model_id if path.is_dir() else path.name, size, mean, std, device)


def label_features(clip: OpenClip, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """Zero-shot classifier weights [L, D]: each label's text embedding averaged over ``templates``
    ("{}" = the label) and renormalised (CLIP's prompt ensembling)."""
    if not labels:
        raise ValueError("no labels to classify against")
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"each template needs exactly one '{{}}' for the label; fix: {bad or '(none given)'}")
    feats = torch.stack([clip.encode_texts([t.format(label) for label in labels]) for t in templates], 0)
    return torch.nn.functional.normalize(feats.mean(0), dim=-1)


@dataclass
class ClassResult:
    """Zero-shot scores of a set of images."""

    labels: list[str]
    image_probs: torch.Tensor  # [B, L] softmax probabilities of each image

    @property
    def probs(self) -> torch.Tensor:
        """[L] the images' probabilities averaged: the consensus over several images."""
        return self.image_probs.mean(0)

    @property
    def per_image(self) -> list[int]:
        """The top label index of each image."""
        return [int(i) for i in self.image_probs.argmax(dim=-1)]

    @property
    def index(self) -> int:
        return int(self.probs.argmax())

    @property
    def text(self) -> str:
        return self.labels[self.index]

    def choose(self, image: int) -> str:
        """The top label of image ``image`` (-1: the consensus label)."""
        if image < 0:
            return self.text
        if image >= self.image_probs.shape[0]:
            raise ValueError(f"image index {image} is out of range: there are {self.image_probs.shape[0]} images "
                             "(use -1 for the consensus)")
        return self.labels[self.per_image[image]]

    def top(self, k: int = 5, image: int = -1) -> list[tuple[str, float]]:
        """The k best labels with their probabilities, over all images (-1) or for one image."""
        p = self.probs if image < 0 else self.image_probs[image]
        vals, idx = p.topk(min(k, len(self.labels)))
        return [(self.labels[int(i)], float(v)) for v, i in zip(vals, idx)]


@torch.no_grad()
def classify_images(
    clip: OpenClip,
    images: torch.Tensor | Sequence[torch.Tensor],
    labels: Sequence[str],
    masks: torch.Tensor | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    features: torch.Tensor | None = None,
    margin: float = 0.1,
    threshold: float = 0.5,
) -> ClassResult:
    """Zero-shot classify ``images`` ([B, 3, H, W] in [0, 1]) over ``labels``; masks crop the region.

    ``features``: precomputed ``label_features`` (they cost one text encoding per label and template;
    callers cache them). Probabilities are softmax(logit_scale * cos) per image, then averaged.
    """
    labels = list(labels)
    if features is None:
        features = label_features(clip, labels, templates)
    if features.shape[0] != len(labels):
        raise ValueError(f"features has {features.shape[0]} rows for {len(labels)} labels; recompute them")
    crops = crop_to_masks(images, masks, margin, threshold)
    img = torch.cat([clip.encode_images([c]) for c in crops], 0)  # crops differ in size: one at a time
    probs = (clip.logit_scale * img @ features.to(img.device, img.dtype).T).softmax(dim=-1)
    return ClassResult(labels, probs.cpu())
