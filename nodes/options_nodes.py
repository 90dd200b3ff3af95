"""Training Options: what a run can set beyond what every run needs, as one ``INVERSION_OPTIONS`` socket.

The trainer node keeps what every run needs (model, images, init, name, method, steps, learning
rate, batch, seed, if_exists); method parameters, schedule, regularisers, augmentation, captions,
checkpoint cadence, precision and memory live here, so a graph shows only what it changes.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING

from comfy_api.latest import io

from ..inversion.options import TrainingOptions, widget_fields
from .types import OptionsType

__all__ = ["NODES", "TrainingOptionsNode", "option_inputs"]

_KINDS = {int: io.Int, float: io.Float, bool: io.Boolean, str: io.String}


def option_inputs(cls=TrainingOptions) -> list:
    """The node's inputs, one per option ``cls`` declares (``inversion.options.option``), in field order:
    the widget kind from the field's type (a str with choices is a combo), its default, tooltip and range."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in widget_fields(cls):
        m = f.metadata
        default = f.default if f.default is not MISSING else f.default_factory()
        extra = {k: m[k] for k in ("min", "max", "step", "round") if k in m}
        if "choices" in m:
            out.append(io.Combo.Input(f.name, options=list(m["choices"]), default=default, tooltip=m["tooltip"]))
            continue
        kind = _KINDS[hints[f.name]]
        if m.get("multiline"):
            extra["multiline"] = True
        out.append(kind.Input(f.name, default=default, tooltip=m["tooltip"], **extra))
    return out


class TrainingOptionsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InversionTrainingOptions",
            display_name="Training Options (Inversion)",
            category="inversion/train",
            description=(
                "Everything beyond what every run needs, for Train Textual Inversion and Gradient Norm Profiler: "
                "method parameters, learning-rate schedule and warm-up, gradient accumulation and clipping, "
                "regularisers, flip, templates, per-image caption handling, checkpoint cadence, precision, "
                "UNet gradient checkpointing, and a deterministic score of the vectors with snapshots, the best "
                "step and DVAR early stop. Unconnected, the trainer uses these defaults."
            ),
            inputs=option_inputs(),
            outputs=[OptionsType.Output("options", display_name="options",
                                        tooltip="Wire into Train Textual Inversion (and Gradient Norm Profiler).")],
        )

    @classmethod
    def execute(cls, **widgets) -> io.NodeOutput:
        """The options from the widgets by name; a widget a saved workflow predates keeps its default."""
        options = TrainingOptions(**widgets).validate()
        options.template_list()  # a bad custom template is an error here, at the node that holds it
        return io.NodeOutput(options)


NODES = [TrainingOptionsNode]
