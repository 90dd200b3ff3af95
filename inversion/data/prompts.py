"""Prompt templates, and turning prompts with placeholders into ``ids``/``slots`` for an encoder."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..host import TextEncoder

__all__ = [
    "OBJECT_TEMPLATES",
    "STYLE_TEMPLATES",
    "CaptionOptions",
    "PromptBatch",
    "build_prompt_batch",
    "check_templates",
    "CAPTION_MARKERS",
    "caption_for",
    "has_marker",
    "shuffle_caption",
]

# The template sets of the original textual inversion (Gal et al. 2022), as used by diffusers'
# and A1111's trainers, so results are comparable. "{}" is replaced by the placeholder.
OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

STYLE_TEMPLATES: tuple[str, ...] = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)


def _template_problem(template: str) -> str | None:
    """Why ``template.format(placeholder)`` would fail or misplace the concept (and the fix), or None."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError:
        return "has a lone '{' or '}': write a literal brace as '{{' or '}}', and the concept as '{}'"
    fields = [(name, conv, spec) for _, name, spec, conv in parts if name is not None]
    if not fields:
        return "has no '{}': put '{}' where the concept goes, e.g. 'a photo of a {}'"
    extra = [f"{{{n}{'!' + c if c else ''}{':' + sp if sp else ''}}}" for n, c, sp in fields if n or c or sp]
    if not extra:
        return None if len(fields) == 1 else f"has {len(fields)} '{{}}': keep exactly one, where the concept goes"
    # The suggestion: a named field becomes its plain word, a numbered or formatted one the bare '{}';
    # a lone named field was probably meant as the concept's place, so it becomes '{}'.
    fixed = "".join(text.replace("{", "{{").replace("}", "}}")
                    + ("" if name is None else name if name and not name.isdigit() and len(fields) > 1 else "{}")
                    for text, name, _, _ in parts)
    n_fixed = sum(1 for _, name, _, _ in string.Formatter().parse(fixed) if name is not None)
    fix = f"write {fixed!r}" if n_fixed == 1 else "keep exactly one plain '{}'"
    literal = next((f", or '{{{{{n}}}}}' for the literal text '{{{n}}}'" for n, _, _ in fields
                    if n and not n.isdigit()), "")
    return (f"has {', '.join(repr(e) for e in extra)}: the only field allowed is the plain '{{}}' where the "
            f"concept goes; {fix}{literal}")


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """Validate custom templates for ``str.format``: exactly one field, the empty ``{}``.

    ``{{`` and ``}}`` are literal braces; any other field (``{style}``, ``{0}``, ``{:>5}``) or a lone
    brace would raise or misplace the concept at the first training step, so it is refused here.
    """
    out = tuple(t.strip() for t in templates if t.strip())
    if not out:
        raise ValueError("no prompt templates given: pass at least one template containing '{}'")
    bad = [(t, why) for t in out if (why := _template_problem(t)) is not None]
    if bad:
        listed = "; ".join(f"template {t!r} {why}" for t, why in bad[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ValueError(f"each template needs exactly one '{{}}' where the concept goes: {listed}{more}")
    return out


@dataclass(frozen=True)
class CaptionOptions:
    """How per-image captions are used (kohya's options; ignored where images have no caption)."""

    shuffle: bool = False  # shuffle the comma-separated parts of a caption each time it is drawn
    keep: int = 1  # leading comma-separated parts that stay in place when shuffling (kohya's keep_tokens)
    dropout: float = 0.0  # chance that a draw uses a template instead of the image's caption

    def validate(self) -> "CaptionOptions":
        if self.keep < 0:
            raise ValueError(f"caption keep must be >= 0, got {self.keep}")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"caption dropout must be in [0, 1], got {self.dropout}")
        return self


@dataclass
class PromptBatch:
    """Token ids and slot indices of a batch of prompts for one encoder."""

    ids: torch.Tensor  # [B, L] long
    slots: torch.Tensor  # [B, L] long, -1 or a row of the learned-vector table


def _split_on_placeholders(text: str, placeholders: Mapping[str, tuple[int, int]]) -> list[str | tuple[int, int]]:
    if not placeholders:
        return [text]
    pattern = "(" + "|".join(re.escape(p) for p in sorted(placeholders, key=len, reverse=True)) + ")"
    parts: list[str | tuple[int, int]] = []
    for piece in re.split(pattern, text):
        if piece in placeholders:
            parts.append(placeholders[piece])
        elif piece:
            parts.append(piece)
    return parts


def build_prompt_batch(
    encoder: TextEncoder,
    prompts: Sequence[str],
    placeholders: Mapping[str, tuple[int, int]],
    device: torch.device | str | None = None,
) -> PromptBatch:
    """Tokenise ``prompts`` for ``encoder``, expanding each placeholder to its k slots.

    ``placeholders`` maps a placeholder string to ``(offset, k)``: its vectors are rows
    ``offset .. offset + k - 1`` of the learned-vector table handed to ``encoder.encode``. A prompt is
    [BOS] tokens EOS, padded with ``pad_id`` to ``max_length``; an encoder whose ``bos_id`` is None
    (T5) gets no BOS, as its tokenizer writes none.
    """
    L = encoder.max_length
    # T5 (SD3, Flux) has no start token (``bos_id`` None): its prompts begin with their first word.
    bos = encoder.bos_id
    filler = bos if bos is not None else encoder.pad_id  # ignored at slot positions; never the EOS id
    all_ids, all_slots = [], []
    for prompt in prompts:
        ids: list[int] = [] if bos is None else [bos]
        slots: list[int] = [] if bos is None else [-1]
        for part in _split_on_placeholders(prompt, placeholders):
            if isinstance(part, tuple):
                offset, k = part
                ids.extend([filler] * k)
                slots.extend(range(offset, offset + k))
            else:
                toks = encoder.tokenize(part)
                ids.extend(toks)
                slots.extend([-1] * len(toks))
        ids.append(encoder.eos_id)
        slots.append(-1)
        if len(ids) > L:
            raise ValueError(
                f"prompt {prompt!r} is {len(ids)} tokens for {encoder.key}, more than its "
                f"{L}; shorten the template or caption, or use fewer vectors per concept"
            )
        pad = L - len(ids)
        all_ids.append(ids + [encoder.pad_id] * pad)
        all_slots.append(slots + [-1] * pad)
    return PromptBatch(
        torch.tensor(all_ids, dtype=torch.long, device=device),
        torch.tensor(all_slots, dtype=torch.long, device=device),
    )


# Where a caption puts the concept: A1111's "[name]" (the embedding's name in its filewords
# templates) or the templates' own "{}". A caption without either gets the concept first.
CAPTION_MARKERS: tuple[str, ...] = ("[name]", "{}")


def has_marker(caption: str) -> bool:
    """Whether ``caption`` marks the concept's place with ``[name]`` or ``{}``."""
    return any(m in caption for m in CAPTION_MARKERS)


def caption_for(caption: str, placeholder: str) -> str:
    """``caption`` with every marker replaced by ``placeholder``; unmarked, ``"<placeholder>, caption"``
    (kohya's trigger word first, which ``CaptionOptions.keep`` = 1 then holds in place)."""
    if not has_marker(caption):
        return f"{placeholder}, {caption}" if caption.strip() else placeholder
    for m in CAPTION_MARKERS:
        caption = caption.replace(m, placeholder)
    return caption


def shuffle_caption(caption: str, keep: int, gen: torch.Generator) -> str:
    """kohya's shuffle_caption: the comma-separated parts after the first ``keep`` in an order drawn from ``gen``."""
    parts = [p.strip() for p in caption.split(",")]
    head, tail = parts[:keep], parts[keep:]
    if len(tail) < 2:
        return caption
    order = torch.randperm(len(tail), generator=gen).tolist()
    return ", ".join(head + [tail[i] for i in order])
