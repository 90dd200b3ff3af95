"""The pack's socket types, declared once. Each carries a library object, never a loose dict.

| socket type               | Python object                             | made by                         |
|---------------------------|-------------------------------------------|---------------------------------|
| ``INVERSION_EMBEDDING``   | ``inversion.embedding.LearnedEmbedding``  | TrainTextualInversion, LoadEmbedding, EmbeddingSlerp |
| ``INVERSION_INIT``        | ``LearnedEmbedding`` (initial vectors, metadata init_text / class_word) | CaptionInit |
| ``INVERSION_GRAD_PROFILE``| ``inversion.profiler.GradProfile``        | GradNormProfiler                |

Types match by their string, so the names are namespaced: another pack's ``EMBEDDING`` socket
(a different object) cannot be wired into ours by accident.
"""

from __future__ import annotations

from comfy_api.latest import io

__all__ = ["EmbeddingType", "InitType", "GradProfileType"]

EmbeddingType = io.Custom("INVERSION_EMBEDDING")
InitType = io.Custom("INVERSION_INIT")
GradProfileType = io.Custom("INVERSION_GRAD_PROFILE")
