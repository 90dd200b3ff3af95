"""``LearnedEmbedding``: one named concept, k vectors per text encoder, and its metadata."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch

__all__ = ["ENCODER_KEYS", "LearnedEmbedding", "validate_name"]

# The text encoders an embedding can carry vectors for, in canonical order: SD1's CLIP ViT-L,
# SD2's OpenCLIP ViT-H, SDXL's OpenCLIP ViT-bigG, and the T5-XXL of SD3 and Flux (4096-d, ComfyUI's
# key ``t5xxl``). It is ComfyUI's concatenation order (SDXL and SD3: l then g; SD3 appends T5's
# tokens after the CLIP ones) and the order a file without a stored key order is read back in.
ENCODER_KEYS = ("clip_l", "clip_h", "clip_g", "t5xxl")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def validate_name(name: str) -> str:
    """Check a concept name usable as a file stem and as ``embedding:<name>`` in a prompt."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith("."):
        raise ValueError(
            f"embedding name {name!r} is not usable: use 1-128 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit and without spaces (it becomes the file name and the "
            "word after 'embedding:' in prompts)"
        )
    if name.lower().endswith(".state"):
        raise ValueError(
            f"embedding name {name!r} ends in '.state', the suffix of training-state files "
            "(<name>.state.safetensors): choose a name without it"
        )
    return name


@dataclass
class LearnedEmbedding:
    """A learned concept.

    ``vectors`` maps a text-encoder key (``clip_l``, ``clip_h``, ``clip_g``) to a float tensor
    [k, d]; every encoder carries the same number k of vectors, one per placeholder position.
    ``placeholder`` is the word that stands for the concept in training prompts; ``metadata`` holds
    plain strings (method, steps, seed, model family, init text, library version, ...), stored in
    the safetensors header when saved.
    """

    name: str
    vectors: dict[str, torch.Tensor]
    placeholder: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_name(self.name)
        if not self.vectors:
            raise ValueError(f"embedding {self.name!r} has no vectors")
        counts = set()
        for key, v in self.vectors.items():
            if not isinstance(v, torch.Tensor) or v.ndim != 2 or not v.is_floating_point():
                raise ValueError(
                    f"embedding {self.name!r}: vectors[{key!r}] must be a float tensor [k, d], "
                    f"got {getattr(v, 'shape', type(v))}"
                )
            counts.add(v.shape[0])
        if len(counts) != 1:
            raise ValueError(
                f"embedding {self.name!r}: every encoder needs the same number of vectors, got "
                + ", ".join(f"{k}={v.shape[0]}" for k, v in self.vectors.items())
            )
        if 0 in counts:
            raise ValueError(f"embedding {self.name!r} has k = 0 vectors; use at least one")
        if not self.placeholder:
            self.placeholder = f"<{self.name}>"
        self.metadata = {str(k): str(v) for k, v in self.metadata.items()}

    @property
    def num_vectors(self) -> int:
        """k, the number of token positions the concept occupies."""
        return next(iter(self.vectors.values())).shape[0]

    @property
    def keys(self) -> list[str]:
        return list(self.vectors)

    def widths(self) -> dict[str, int]:
        return {k: v.shape[1] for k, v in self.vectors.items()}

    def detached(self) -> "LearnedEmbedding":
        """A copy whose tensors are detached, contiguous float32 CPU clones."""
        return replace(
            self,
            vectors={k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in self.vectors.items()},
            metadata=dict(self.metadata),
        )

    def with_metadata(self, **items: object) -> "LearnedEmbedding":
        meta = dict(self.metadata)
        meta.update({k: str(v) for k, v in items.items() if v is not None})
        return replace(self, metadata=meta)

    def norms(self) -> dict[str, torch.Tensor]:
        """Euclidean norm of each vector, per encoder ([k])."""
        return {k: v.detach().float().norm(dim=-1) for k, v in self.vectors.items()}

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.vectors.items())
        return f"LearnedEmbedding(name={self.name!r}, placeholder={self.placeholder!r}, {shapes})"
