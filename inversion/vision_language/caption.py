"""Caption mode of the initialisation: describe the concept image with a local captioning model.

*An Image is Worth One Sentence* (seeds/001, Sec. 3 "Supreme Initialization") captions the
concept image -- optionally only the clicked region -- and initialises one learned vector per
token of the caption (``inversion.methods.init.from_text``); with caption init the loss converges much
faster than with a single "*" token (seeds/001, Fig. 3).

Models are transformers ``from_pretrained`` folders on disk (``config.json`` + weights + processor
files), never downloaded: BLIP, BLIP-2, GIT and Florence-2 (the transformers-native
``florence2`` format; remote-code checkpoints are not run). The architecture comes from
``config.json``'s ``model_type``. The caller says which folders to search (the ComfyUI node passes
``models/captioners``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..data.imageprep import crop_to_masks, to_pil

__all__ = [
    "SUPPORTED_CAPTIONERS",
    "CaptionResult",
    "CaptionSettings",
    "Captioner",
    "caption_images",
    "class_word_from_caption",
    "clean_caption",
    "consensus_index",
    "find_captioners",
    "load_captioner",
    "read_model_type",
]

log = logging.getLogger(__name__)

# config.json model_type -> name shown to users.
SUPPORTED_CAPTIONERS = {"blip": "BLIP", "blip-2": "BLIP-2", "git": "GIT", "florence2": "Florence-2"}
# Florence-2 does nothing without a task token; the others caption unconditionally.
_DEFAULT_PROMPT = {"florence2": "<CAPTION>"}


@dataclass(frozen=True)
class CaptionSettings:
    """How captions are generated and the region cropped."""

    max_new_tokens: int = 30  # seeds/001's captions are 2-12 words (Table A.1); 30 tokens is ample
    num_beams: int = 3  # beam search: the literal, stable description an init text wants
    prompt: str | None = None  # None = the model's default (Florence-2 "<CAPTION>", others none)
    margin: float = 0.1  # region crop: the mask's box grown by 10 % per side keeps the object's outline
    threshold: float = 0.5  # mask pixels above this count as the region

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0 (a fraction of the mask's box), got {self.margin}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"mask threshold must be in [0, 1), got {self.threshold}")


def read_model_type(folder: str | os.PathLike) -> str:
    """``model_type`` of the transformers folder ``folder`` (from its config.json)."""
    cfg = Path(folder) / "config.json"
    try:
        with open(cfg, encoding="utf-8") as f:
            return str(json.load(f).get("model_type", ""))
    except (OSError, ValueError) as e:
        raise ValueError(f"{cfg} is missing or not valid JSON ({e}); a captioner folder needs its config.json") from e


def _candidate_folders(search_dirs: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """name -> folder for every folder with a config.json: the search dir itself, its children,
    and grandchildren (the ``org/model`` layout of a hub download)."""
    found: dict[str, Path] = {}
    for d in search_dirs:
        root = Path(d)
        if not root.is_dir():
            continue
        if (root / "config.json").is_file():
            found.setdefault(root.name, root)
        for child in sorted(p for p in root.iterdir() if p.is_dir()):
            if (child / "config.json").is_file():
                found.setdefault(child.name, child)
                continue
            for grand in sorted(p for p in child.iterdir() if p.is_dir()):
                if (grand / "config.json").is_file():
                    found.setdefault(f"{child.name}/{grand.name}", grand)
    return found


def find_captioners(search_dirs: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """Captioning model folders of a supported architecture under ``search_dirs``: name -> folder."""
    out = {}
    for name, folder in _candidate_folders(search_dirs).items():
        try:
            if read_model_type(folder) in SUPPORTED_CAPTIONERS:
                out[name] = folder
        except ValueError:
            continue
    return out


def _resolve_folder(name: str, search_dirs: Sequence[str | os.PathLike]) -> Path:
    path = Path(name).expanduser()
    if path.is_absolute():
        if (path / "config.json").is_file():
            return path
        raise ValueError(f"captioner folder {str(path)!r} has no config.json; point to a transformers "
                         "from_pretrained folder (config.json, weights, processor files)")
    found = find_captioners(search_dirs)
    if name in found:
        return found[name]
    where = ", ".join(str(Path(d)) for d in search_dirs) or "(no folders given)"
    if not found:
        raise ValueError(
            f"no image-captioning model found; looked in: {where}. Put a transformers folder "
            f"({', '.join(SUPPORTED_CAPTIONERS.values())}; e.g. Salesforce/blip-image-captioning-large "
            "with its config.json, weights and processor files) in one of them, as <folder>/<model name>/"
        )
    raise ValueError(f"captioner {name!r} not found in {where}; available: {', '.join(sorted(found))}")


def _load_processor(folder: Path):
    from transformers import AutoProcessor

    try:  # transformers >= 5: the PIL image backend needs no torchvision
        return AutoProcessor.from_pretrained(str(folder), local_files_only=True, backend="pil")
    except TypeError:
        return AutoProcessor.from_pretrained(str(folder), local_files_only=True)


@dataclass
class Captioner:
    """A loaded captioning model and its processor."""

    model: torch.nn.Module
    processor: object
    architecture: str  # config.json model_type, one of SUPPORTED_CAPTIONERS
    folder: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    def default_prompt(self) -> str:
        return _DEFAULT_PROMPT.get(self.architecture, "")

    @torch.no_grad()
    def generate(self, pil_images: list, settings: CaptionSettings) -> list[str]:
        """Raw captions of PIL images (one per image)."""
        prompt = self.default_prompt() if settings.prompt is None else settings.prompt
        kwargs = {"images": pil_images, "return_tensors": "pt"}
        if prompt:
            kwargs["text"] = [prompt] * len(pil_images)
        inputs = self.processor(**kwargs)
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        ids = self.model.generate(**inputs, max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams,
                                  do_sample=False)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        if prompt and not prompt.startswith("<"):  # a text prefix (BLIP/GIT) is the user's, not the caption
            texts = [t[len(prompt):] if t.lower().startswith(prompt.lower()) else t for t in texts]
        return texts


def load_captioner(
    name: str,
    search_dirs: Sequence[str | os.PathLike] = (),
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Captioner:
    """Load the captioner ``name`` (a name from ``find_captioners`` or an absolute folder), offline."""
    from transformers import AutoModelForImageTextToText

    folder = _resolve_folder(name, search_dirs)
    arch = read_model_type(folder)
    if arch not in SUPPORTED_CAPTIONERS:
        raise ValueError(f"{folder} is a {arch!r} model; captioning supports "
                         f"{', '.join(f'{v} ({k})' for k, v in SUPPORTED_CAPTIONERS.items())}")
    device = torch.device(device)
    model = AutoModelForImageTextToText.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
    model = model.to(device).eval().requires_grad_(False)
    processor = _load_processor(folder)
    return Captioner(model, processor, arch, str(folder), device, dtype)


_WS = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """One line, lower case, no trailing period: a caption ready to be an init text."""
    text = _WS.sub(" ", text).strip().strip(" .").lower()
    return text


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9][a-z0-9'\-]*", text.lower())


def consensus_index(captions: Sequence[str]) -> int:
    """Index of the most central caption: highest summed word-set (Jaccard) similarity to the others.

    Identical captions have similarity 1, so the most common caption wins when there is one;
    otherwise the caption sharing the most words with the rest. Ties go to the earliest.
    """
    if not captions:
        raise ValueError("no captions to choose from")
    sets = [set(_words(c)) for c in captions]
    counts = Counter(clean_caption(c) for c in captions)

    def score(i: int) -> tuple[float, int]:
        s = sum(len(sets[i] & sets[j]) / max(1, len(sets[i] | sets[j])) for j in range(len(sets)) if j != i)
        return s, counts[clean_caption(captions[i])]

    best = 0
    for i in range(1, len(captions)):
        if score(i) > score(best):
            best = i
    return best


@dataclass
class CaptionResult:
    """Captions of several images and the one chosen as the init text."""

    captions: list[str]
    index: int  # the consensus (or the user's choice)

    @property
    def text(self) -> str:
        return self.captions[self.index]

    def choose(self, index: int) -> "CaptionResult":
        """The same captions with caption ``index`` chosen (-1 keeps the consensus)."""
        if index < 0:
            return self
        if index >= len(self.captions):
            raise ValueError(f"caption index {index} is out of range: there are {len(self.captions)} captions "
                             f"(0..{len(self.captions) - 1}); use -1 for the consensus")
        return CaptionResult(self.captions, index)


def caption_images(
    captioner: Captioner,
    images: torch.Tensor | Sequence[torch.Tensor],
    masks: torch.Tensor | None = None,
    settings: CaptionSettings = CaptionSettings(),
    batch_size: int = 4,
) -> CaptionResult:
    """Caption each image (cropped to its mask's region when a mask is given) and pick the consensus.

    ``images``: [B, 3, H, W] in [0, 1] (or a list of [3, H, W]); ``masks``: [B, H, W], [1, H, W] or
    [H, W]. Returns every cleaned caption and the index of the most central one.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    crops = crop_to_masks(images, masks, settings.margin, settings.threshold)
    captions: list[str] = []
    for i in range(0, len(crops), batch_size):
        pils = [to_pil(c) for c in crops[i:i + batch_size]]
        captions.extend(clean_caption(t) for t in captioner.generate(pils, settings))
    usable = [i for i, c in enumerate(captions) if c]
    if not usable:
        raise ValueError(f"the captioner {captioner.folder} returned only empty captions; "
                         "try another model or more max_new_tokens")
    return CaptionResult(captions, usable[consensus_index([captions[i] for i in usable])])


# Words that end the leading noun phrase of a caption ("a red toy car | with a boy in it").
_PHRASE_END = frozenset(
    "with on in at by for from near under over behind beside next and or but that which who whose while "
    "is are was were has have had to into onto against during above below inside outside through across "
    "along among between around there sitting standing lying laying holding wearing looking being made "
    "covered filled hanging floating flying walking running playing eating using".split()
)
# Words after which "of" introduces the real subject ("a pair of sunglasses", "a photo of a cat").
_FRAMING = frozenset(
    "photo photograph picture image close up close-up closeup view painting drawing illustration rendering "
    "sketch shot render pair couple group set bunch lot lots pile stack kind type sort piece slice side "
    "front top back bottom number collection".split()
)
# Verbs that follow a framing subject ("the image shows a cat").
_FRAMING_VERBS = frozenset("shows show depicts depict features feature contains contain displays".split())
_DETERMINERS = frozenset("a an the this these those some two three four one my his her its their".split())


def class_word_from_caption(caption: str) -> str:
    """Guess the class word of a caption: the last word of its leading noun phrase.

    "a red plush toy with eyes and legs" -> "toy"; "a pair of sunglasses with a gold frame" ->
    "sunglasses"; "the image shows a cat on a couch" -> "cat". A heuristic (no parser): the node
    lets the user override it. Falls back to the caption's last word.
    """
    words = _words(caption)
    phrase: list[str] = []
    for w in words:
        content = [p for p in phrase if p not in _DETERMINERS]
        if w == "of" and (not content or content[-1] in _FRAMING):
            phrase = []
            continue
        if w in _FRAMING_VERBS and all(p in _FRAMING or p in _DETERMINERS for p in phrase):
            phrase = []
            continue
        if w in _PHRASE_END or w == "of":
            if content:
                break
            phrase = []
            continue
        phrase.append(w)
    content = [p for p in phrase if p not in _DETERMINERS]
    if content:
        return content[-1]
    rest = [w for w in words if w not in _DETERMINERS]
    return rest[-1] if rest else ""
