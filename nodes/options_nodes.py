"""Training Options: what a run can set beyond what every run needs, as one ``INVERSION_OPTIONS`` socket.

The trainer node keeps what every run needs (model, images, init, name, method, steps, learning
rate, batch, seed, if_exists); method parameters, schedule, regularisers, augmentation, captions,
checkpoint cadence, precision and memory live here, so a graph shows only what it changes.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..inversion.options import LR_SCHEDULES, PRECISIONS, TEMPLATE_SETS, TrainingOptions
from ..inversion.g_reading import G_READINGS
from ..inversion.presets import MethodParams
from ..inversion.prompts import CaptionOptions
from ..inversion.score import KEEP, ScoreConfig
from .types import OptionsType

__all__ = ["NODES", "TrainingOptionsNode"]

_D = TrainingOptions()  # the defaults, written once (inversion/options.py, inversion/presets.py)
_M = _D.method
_C = _D.captions
_S = ScoreConfig()


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
            inputs=[
                io.Int.Input("interval_start", default=_M.interval[0], min=0, max=999,
                             tooltip="interval method: first timestep (paper baselines 0, 350, 900)."),
                io.Int.Input("interval_end", default=_M.interval[1], min=0, max=999,
                             tooltip="interval method: last timestep (paper baselines 100, 450, 999)."),
                io.Int.Input("single_t", default=_M.single_t, min=0, max=999,
                             tooltip="single_step method: the timestep (paper: 400)."),
                io.Int.Input("window", default=_M.window, min=1, max=1000,
                             tooltip="high_grad methods: width of the interval around the highest g(t)."),
                io.Int.Input("adaptive_bins", default=_M.bins, min=1, max=1000,
                             tooltip="adaptive methods: timestep bins of the running g(t) estimate."),
                io.Float.Input("kappa", default=_M.kappa, min=0.0, max=1.0, step=1e-5, round=False,
                               tooltip="directional methods: strength of the vMF prior toward each vector's "
                               "prior direction."),
                io.String.Input("class_word", default=_M.class_word,
                                tooltip="directional methods: the class word, e.g. 'dog', whose direction the vMF "
                                "prior pulls toward. Every other vector is pulled toward its own initial token. "
                                "It applies to the init's vectors whose tokens are the class word's (the 'toy' of "
                                "'a red toy'); if the init text does not contain it, to the last vector (the head "
                                "noun), or the only one; if the vectors are not the init text's tokens (a word "
                                "repeated, random), to all of them. Empty = the init's class word (Caption Init), "
                                "else no class word: each vector keeps its own initial direction."),
                io.Float.Input("l2_weight", default=_D.l2_weight, min=0.0, max=10.0, step=1e-5, round=False,
                               tooltip="L2 penalty on the vectors' norm (seeds/003); 0 = off."),
                io.Float.Input("contrastive_weight", default=_D.contrastive_weight, min=0.0, max=10.0, step=1e-4,
                               round=False, tooltip="Nearest-neighbour contrast (seeds/003 Eq. 2). A run of one concept: the "
                               "vocabulary contrast, an adaptation of Eq. 2: pulls each vector toward its 5 nearest "
                               "real tokens against the rest of the vocabulary (cosine, tau 0.07). A run of several "
                               "concepts (Add Concept nodes on the trainer's concepts input): Eq. 2 itself, the 5 "
                               "nearest tokens against the other concepts' vectors (dot products, tau 0.07); 0 = off."),
                io.Combo.Input("lr_schedule", options=list(LR_SCHEDULES), default=_D.lr_schedule,
                               tooltip="Learning rate after warm-up: constant, or decaying linearly / on a cosine "
                               "to 0 at the last step."),
                io.Int.Input("warmup_steps", default=_D.warmup_steps, min=0, max=100000,
                             tooltip="Steps of linear warm-up from 0 to the learning rate."),
                io.Int.Input("grad_accum", default=_D.grad_accum, min=1, max=64,
                             tooltip="Micro-batches per step: an effective batch of batch_size x grad_accum "
                             "without its memory (each step costs grad_accum forward/backward passes)."),
                io.Float.Input("max_grad_norm", default=_D.max_grad_norm, min=0.0, max=100.0, step=0.01,
                               tooltip="Clip the vectors' gradient norm to this; 0 = off."),
                io.Boolean.Input("flip", default=_D.flip,
                                 tooltip="Also train on mirrored images (off for text or asymmetric concepts)."),
                io.Combo.Input("templates", options=list(TEMPLATE_SETS), default=_D.templates,
                               tooltip="Prompts the concept is trained in: object ('a photo of a {}', ...), style "
                               "('a painting in the style of {}', ...) or your own below. Images with a caption "
                               "file use their caption instead."),
                io.String.Input("custom_templates", default=_D.custom_templates, multiline=True,
                                tooltip="templates = custom: one prompt per line, '{}' where the concept goes "
                                "('{{' and '}}' for literal braces)."),
                io.Boolean.Input("caption_shuffle", default=_C.shuffle,
                                 tooltip="Per-image captions (image.txt): shuffle their comma-separated parts "
                                 "each time, after the first caption_keep parts."),
                io.Int.Input("caption_keep", default=_C.keep, min=0, max=64,
                             tooltip="Leading comma-separated caption parts that stay in place when shuffling."),
                io.Float.Input("caption_dropout", default=_C.dropout, min=0.0, max=1.0, step=0.01,
                               tooltip="Chance that a step uses a template instead of an image's caption."),
                io.Int.Input("checkpoint_every", default=_D.checkpoint_every, min=0, max=100000,
                             tooltip="Save the embedding and the run state every N steps (0 = only at the end). "
                             "While an existing file is being overwritten, checkpoints go to "
                             "models/inversion_runs/<name> until the run completes."),
                io.Combo.Input("precision", options=list(PRECISIONS), default=_D.precision,
                               tooltip="auto: the model's own compute dtype (fp16 models train with dynamic loss "
                               "scaling, which skips a step whose gradient overflows). fp32 / bf16 / fp16: "
                               "autocast to that dtype on a GPU."),
                io.Boolean.Input("gradient_checkpointing", default=_D.gradient_checkpointing,
                                 tooltip="Recompute the UNet's activations in the backward pass: much less memory "
                                 "(SDXL on 8-12 GB cards), slower steps."),
                io.Float.Input("l2_init_weight", default=_D.l2_init_weight, min=0.0, max=10.0, step=1e-4,
                               round=False, tooltip="L2 pull of each vector back toward its initial vector, "
                               "w * sum ||v - v0||^2 (seeds/003's tuning-phase regulariser, with the init as the "
                               "encoder's prediction): keeps the concept near the init's words; 0 = off."),
                io.Int.Input("score_every", default=_D.score_every, min=0, max=100000,
                             tooltip="Score the vectors every N steps (0 = off): the training loss (masked as "
                             f"training masks it) on a fixed set of {_S.draws} draws per concept (images, noise, "
                             "timesteps; the same whatever the batch size), so the curve is smooth and comparable "
                             f"across steps and runs. Each score costs {_S.draws} forward passes per concept (about "
                             "one training step more at batch 1); the embedding of each scored step is kept in "
                             "models/inversion_runs/<name>/snapshots. Needed by early_stop and keep = best."),
                io.Boolean.Input("early_stop", default=_D.early_stop,
                                 tooltip="Stop when the score has flattened (DVAR, Voronov et al. 2023): the variance "
                                 f"of the last {_D.dvar_window} scores below {_D.dvar_threshold:g} of all scores'. "
                                 f"Needs score_every (1 = the paper's cadence; with N > 1 it waits for "
                                 f"{_D.dvar_window} scores, N x {_D.dvar_window} steps). Off by default until runs "
                                 "show it safe; a stopped run completes normally and writes its embedding."),
                io.Combo.Input("keep", options=list(KEEP), default=_D.keep,
                               tooltip="Which vectors <name>.safetensors holds when the run completes: last (the "
                               "last step's) or best (the scored step with the lowest score; needs score_every; "
                               "its metadata names the step). The run's state keeps the last step, so resume "
                               "continues the run."),
                io.Combo.Input("g_reading", options=list(G_READINGS), default=_D.g_reading,
                               tooltip="What seeds/000 Eq. 4's gradient norm g(t) is taken with respect to, for the "
                               "adaptive sampler and the profiler: tokens (the learned vectors themselves, 'collected on "
                               "the fly'; the default: adaptive with it was ahead of plain TI on the miniature world, "
                               "+0.07 accuracy, 95 % CI +0.02 to +0.12) or context (the text encoder's output, "
                               "cheaper: the encoder runs once per distinct prompt instead of once per image). "
                               "A profile must be measured with the reading the run trains with."),
            ],
            outputs=[OptionsType.Output("options", display_name="options",
                                        tooltip="Wire into Train Textual Inversion (and Gradient Norm Profiler).")],
        )

    @classmethod
    def execute(cls, interval_start, interval_end, single_t, window, adaptive_bins, kappa, class_word, l2_weight,
                contrastive_weight, lr_schedule, warmup_steps, grad_accum, max_grad_norm, flip, templates,
                custom_templates, caption_shuffle, caption_keep, caption_dropout, checkpoint_every, precision,
                gradient_checkpointing, l2_init_weight=_D.l2_init_weight, score_every=_D.score_every,
                early_stop=_D.early_stop, keep=_D.keep, g_reading=_D.g_reading) -> io.NodeOutput:
        options = TrainingOptions(
            method=MethodParams(interval=(interval_start, interval_end), single_t=single_t, window=window,
                                bins=adaptive_bins, kappa=kappa, class_word=class_word.strip()),
            l2_weight=l2_weight, contrastive_weight=contrastive_weight, lr_schedule=lr_schedule,
            warmup_steps=warmup_steps, grad_accum=grad_accum, max_grad_norm=max_grad_norm, flip=flip,
            templates=templates, custom_templates=custom_templates,
            captions=CaptionOptions(shuffle=caption_shuffle, keep=caption_keep, dropout=caption_dropout),
            checkpoint_every=checkpoint_every, precision=precision, gradient_checkpointing=gradient_checkpointing,
            l2_init_weight=l2_init_weight, score_every=score_every, early_stop=early_stop, keep=keep,
            g_reading=g_reading,
        ).validate()
        options.template_list()  # a bad custom template is an error here, at the node that holds it
        return io.NodeOutput(options)


NODES = [TrainingOptionsNode]
