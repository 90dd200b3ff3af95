"""The pack's socket types, declared once. Each carries a dataclass (a library one, except
Preview Options' settings, which name ComfyUI's samplers, and Add Concept's, which hold its images), never a loose dict.

| socket type               | Python object                             | made by                         |
|---------------------------|-------------------------------------------|---------------------------------|
| ``INVERSION_EMBEDDING``   | ``inversion.embedding.LearnedEmbedding``  | TrainTextualInversion, LoadEmbedding, EmbeddingSlerp |
| ``INVERSION_INIT``        | ``LearnedEmbedding`` (initial vectors, metadata init_text / class_word) | CaptionInit |
| ``INVERSION_GRAD_PROFILE``| ``inversion.methods.profiler.GradProfile``        | GradNormProfiler                |
| ``INVERSION_DATASET``     | ``inversion.data.dataset.ConceptImages`` (per-image tensors of any aspect, masks, captions) | LoadConceptImages |
| ``INVERSION_OPTIONS``     | ``inversion.options.TrainingOptions``     | TrainingOptions                 |
| ``INVERSION_PREVIEWS``    | ``nodes.comfy_preview.PreviewSettings`` (KSampler's settings: node-side, they name ComfyUI's samplers) | PreviewOptions |
| ``INVERSION_CONCEPTS``    | a tuple of ``nodes.concept_nodes.ConceptInput`` (name, init, images: node-side, they hold ComfyUI's IMAGE) | AddConcept |
| ``INVERSION_LORA``        | ``inversion.lora.LoraSpec``               | LoraOptions                     |

Types match by their string, so the names are namespaced: another pack's ``EMBEDDING`` socket
(a different object) cannot be wired into ours by accident.
"""

from __future__ import annotations

from comfy_api.latest import io

__all__ = ["EmbeddingType", "InitType", "GradProfileType", "DatasetType", "OptionsType", "PreviewsType",
           "ConceptsType", "LoraOptionsType"]

EmbeddingType = io.Custom("INVERSION_EMBEDDING")
InitType = io.Custom("INVERSION_INIT")
GradProfileType = io.Custom("INVERSION_GRAD_PROFILE")
DatasetType = io.Custom("INVERSION_DATASET")
OptionsType = io.Custom("INVERSION_OPTIONS")
PreviewsType = io.Custom("INVERSION_PREVIEWS")
ConceptsType = io.Custom("INVERSION_CONCEPTS")
LoraOptionsType = io.Custom("INVERSION_LORA")
