"""Add Concept: one more concept (initial vectors, name, images) for Train Textual Inversion's run.

Chained (each node's ``concepts`` into the next one's), they make a list that the trainer's
``concepts`` input trains together with its own concept in one run: one model load, every step's
UNet batch shared by all of them (``inversion.trainer.Trainer`` with several ``ConceptData``), one
embedding file per concept. Nothing is encoded here: the trainer encodes each concept's images with
its VAE, so this node needs no model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from comfy_api.latest import io

from ..inversion.embedding import LearnedEmbedding, validate_name
from .run_files import check_names
from .types import ConceptsType, DatasetType, InitType

__all__ = ["NODES", "AddConcept", "ConceptInput", "concept_list"]

CATEGORY = "inversion/train"


@dataclass(frozen=True)
class ConceptInput:
    """One concept as wired in the graph: its name, Caption Init's vectors and its images (an IMAGE batch
    with optional masks, or Load Concept Images' dataset)."""

    name: str
    init: LearnedEmbedding
    images: Any = None  # IMAGE [N, H, W, 3]
    masks: Any = None  # MASK
    dataset: Any = None  # inversion.data.dataset.ConceptImages


def concept_list(concepts: Any) -> list[ConceptInput]:
    """The ``concepts`` input as a list (empty when unconnected); anything else is a wiring error."""
    if concepts is None:
        return []
    if not isinstance(concepts, tuple) or not all(isinstance(c, ConceptInput) for c in concepts):
        raise TypeError("concepts: connect the 'concepts' output of an Add Concept node")
    return list(concepts)


def check_concept_wiring(init: Any, images: Any = None, dataset: Any = None) -> None:
    """What a concept needs wired: Caption Init's vectors, and Load Concept Images' images or dataset
    (the trainer's own concept and each Add Concept share these errors)."""
    from ..inversion.data.dataset import ConceptImages

    if not isinstance(init, LearnedEmbedding):
        raise TypeError("init: connect the 'init' output of a Caption Init node")
    if dataset is None and images is None:
        raise ValueError("images / dataset: connect Load Concept Images' dataset output (captions, aspect buckets) "
                         "or its images output")
    if dataset is not None and not isinstance(dataset, ConceptImages):
        raise TypeError("dataset: connect the 'dataset' output of a Load Concept Images node")


def make_concept(name: str, init: Any, images: Any = None, masks: Any = None, dataset: Any = None) -> ConceptInput:
    """A checked ``ConceptInput``: a valid name, Caption Init's vectors, and images or a dataset."""
    check_concept_wiring(init, images, dataset)
    try:
        name = validate_name(name.strip())
    except ValueError as e:
        raise ValueError(f"name: {e}") from None
    return ConceptInput(name, init, images, masks, dataset)


class AddConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InversionAddConcept",
            display_name="Add Concept (Inversion)",
            category=CATEGORY,
            description=(
                "One more concept for Train Textual Inversion: chain several (concepts into concepts) and connect "
                "the last to the trainer's concepts input. The trainer then learns its own concept and each added "
                "one in one run (one model load, shared UNet batches: batch_size images of each concept per "
                "step) and writes models/embeddings/<name>.safetensors for each. With several concepts, Training "
                "Options' contrastive_weight is seeds/003 Eq. 2 across them (the other concepts' vectors are "
                "the negatives)."
            ),
            inputs=[
                InitType.Input("init", tooltip="This concept's initial vectors (Caption Init)."),
                io.String.Input("name", default="my-second-concept",
                                tooltip="This concept's name: the file models/embeddings/<name>.safetensors and the "
                                "word after 'embedding:' in prompts. Must differ from every other concept's name in "
                                "the run."),
                io.Image.Input("images", optional=True, tooltip="This concept's images as one IMAGE batch (Load "
                               "Concept Images' images output). Not needed when dataset is connected."),
                io.Mask.Input("masks", optional=True, tooltip="Loss masks for the images (Load Concept Images): "
                              "1 = the concept."),
                DatasetType.Input("dataset", optional=True,
                                  tooltip="Load Concept Images' dataset output: the images with their per-image "
                                  "captions and aspect buckets. Wins over images/masks."),
                ConceptsType.Input("concepts", optional=True,
                                   tooltip="The concepts added so far (another Add Concept node's output): this "
                                   "one is appended after them."),
            ],
            outputs=[
                ConceptsType.Output("concepts_out", display_name="concepts",
                                    tooltip="Every concept so far, this one last: into the next Add Concept node or "
                                    "Train Textual Inversion's concepts input."),
            ],
        )

    @classmethod
    def execute(cls, init, name, images=None, masks=None, dataset=None, concepts=None) -> io.NodeOutput:
        upstream = concept_list(concepts)
        mine = make_concept(name, init, images, masks, dataset)
        check_names([c.name for c in upstream] + [mine.name])
        return io.NodeOutput(tuple(upstream) + (mine,))


NODES = [AddConcept]
