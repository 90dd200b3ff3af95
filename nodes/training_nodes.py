"""GradNormProfiler and TrainTextualInversion: thin nodes over ``inversion.profiler`` / ``inversion.trainer``.

Both encode the concept images with the VAE first (the VAE is not kept loaded while training),
then train inside ``training_host`` (full load, gradients inside ComfyUI's inference-mode prompt).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..inversion import charts
from ..inversion.embedding import LearnedEmbedding, validate_name
from ..inversion.optim import AdamW, RiemannianSGD
from ..inversion.presets import PRESETS, MethodParams, build_method
from ..inversion.profiler import profile_gradients
from ..inversion.prompts import OBJECT_TEMPLATES, STYLE_TEMPLATES, check_templates
from ..inversion.regularizers import L2Norm, NearestNeighborContrastive
from ..inversion.trainer import ConceptData, TrainConfig, Trainer, prepare_concept
from .comfy_embed import check_embedding_fits, embedding_family
from .comfy_host import ComfyLatentEncoder, training_host
from .comfy_run import UI_KEY, TrainReporter, check_cancel, history_payload, send_event
from .run_files import IF_EXISTS, RunFiles, migrate_side_files
from .types import EmbeddingType, GradProfileType, InitType

__all__ = ["NODES", "GradNormProfiler", "TrainTextualInversion", "concept_data", "templates_for"]

log = logging.getLogger(__name__)

CATEGORY = "inversion/train"
TEMPLATE_SETS = ["object", "style", "custom"]
DEFAULT_METHOD = "adaptive"  # seeds/000's adaptive sampling: the fastest converging without a profile run
_P = MethodParams()  # the one place method defaults are written; the schema and execute read them


def node_id(cls) -> str | None:
    """The running node's id (None when ``execute`` is called outside ComfyUI's executor)."""
    return None if cls.hidden is None else cls.hidden.unique_id


def templates_for(kind: str, custom: str) -> tuple[str, ...]:
    if kind == "object":
        return OBJECT_TEMPLATES
    if kind == "style":
        return STYLE_TEMPLATES
    if kind == "custom":
        try:
            return check_templates(custom.splitlines())
        except ValueError as e:
            raise ValueError(f"custom_templates: {e}") from None
    raise ValueError(f"templates must be one of {', '.join(TEMPLATE_SETS)}, got {kind!r}")


def _template_inputs() -> list:
    return [
        io.Combo.Input("templates", options=TEMPLATE_SETS, default="object",
                       tooltip="Prompts the concept is trained in: object ('a photo of a {}', ...), style "
                       "('a painting in the style of {}', ...) or your own below."),
        io.String.Input("custom_templates", default="a photo of {}", multiline=True,
                        tooltip="templates = custom: one prompt per line, '{}' where the concept goes."),
    ]


def concept_data(model, clip, vae, images, init, name: str, masks=None, flip: bool = True) -> ConceptData:
    """The concept (initial vectors named ``name``) and its latents, encoded once with the VAE."""
    if not isinstance(init, LearnedEmbedding):
        raise TypeError("init: connect the 'init' output of a Caption Init node")
    check_embedding_fits(clip, init, "init")
    name = validate_name(name)
    emb = LearnedEmbedding(name, {k: v.detach().float().cpu() for k, v in init.vectors.items()}, f"<{name}>",
                           dict(init.metadata))
    pixels = images.movedim(-1, 1)[:, :3].float().cpu()
    if pixels.shape[-1] < 64 or pixels.shape[-2] < 64 or pixels.shape[-1] % 8 or pixels.shape[-2] % 8:
        raise ValueError(f"images: {pixels.shape[-1]}x{pixels.shape[-2]} pixels; use Load Concept Images to fit "
                         "them to a size of at least 64 that is a multiple of 8")
    m = None
    if masks is not None:
        m = masks.float().cpu()
        m = m[None] if m.ndim == 2 else m
        if m.shape[0] == 1 and pixels.shape[0] > 1:
            m = m.expand(pixels.shape[0], -1, -1)
        if bool((m >= 0.999).all()):
            m = None  # an all-ones mask (Load Concept Images without masks) is no mask
        elif tuple(m.shape[-2:]) != tuple(pixels.shape[-2:]):
            m = torch.nn.functional.interpolate(m[:, None], size=pixels.shape[-2:], mode="bilinear")[:, 0]
    with torch.inference_mode(False):
        return prepare_concept(ComfyLatentEncoder(vae, model), pixels, emb, masks=m, flip=flip)


class GradNormProfiler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InversionGradNormProfiler",
            display_name="Gradient Norm Profiler (Inversion)",
            category=CATEGORY,
            description=(
                "Measures g(t) = E||grad_c ||eps_hat - eps|| || over timesteps on your images (Conditional "
                "Gradient-based TI, Eq. 4): where the prompt can steer the model. Feed the profile to the trainer "
                "for the high_grad methods or to seed adaptive sampling. Costs about bins x samples / batch "
                "training steps."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model you will train on."),
                io.Clip.Input("clip", tooltip="Its CLIP."),
                io.Vae.Input("vae", tooltip="Its VAE (encodes the images once)."),
                io.Image.Input("images", tooltip="The concept images (Load Concept Images)."),
                InitType.Input("init", tooltip="Initial vectors (Caption Init): g(t) is measured with them."),
                io.Int.Input("bins", default=20, min=1, max=1000, tooltip="Timestep bins over [0, T)."),
                io.Int.Input("samples_per_bin", default=4, min=1, max=256,
                             tooltip="Draws per bin (image, prompt, noise, t); more = smoother, slower."),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="Draws per forward/backward pass."),
                io.Int.Input("window", default=_P.window, min=1, max=1000,
                             tooltip="Width of the high-grad interval to suggest, in timesteps (paper: 100)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the draws."),
                *_template_inputs(),
                io.Mask.Input("masks", optional=True, tooltip="Loss masks (Load Concept Images)."),
            ],
            outputs=[
                GradProfileType.Output("profile", display_name="profile", tooltip="The measured g(t)."),
                io.Image.Output("chart", display_name="chart", tooltip="g(t) with its spread and the window."),
                io.Int.Output("interval_start", display_name="interval_start", tooltip="Start of the high-grad window."),
                io.Int.Output("interval_end", display_name="interval_end", tooltip="End of the high-grad window."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, images, init, bins, samples_per_bin, batch_size, window, seed,
                templates, custom_templates, masks=None) -> io.NodeOutput:
        node = node_id(cls)
        concept = concept_data(model, clip, vae, images, init, "profile", masks)
        total = -(-bins * samples_per_bin // batch_size)
        bar = comfy.utils.ProgressBar(total, node_id=node)

        def progress(p) -> None:
            bar.update_absolute(p.step, p.total)
            check_cancel()

        with training_host(model, clip) as host:
            profile = profile_gradients(host.text_side, host.denoiser, [concept], bins=bins,
                                        samples_per_bin=samples_per_bin, batch_size=batch_size, seed=seed,
                                        templates=templates_for(templates, custom_templates), callback=progress)
        lo, hi = profile.best_window(min(window, profile.num_timesteps))
        payload = {"kind": "profile", "bin_edges": profile.edges.tolist(), "mean": profile.mean.tolist(),
                   "std": profile.std.tolist(), "num_timesteps": profile.num_timesteps, "window": [lo, hi],
                   "window_width": window, "step": total, "total": total}
        send_event(node, payload)
        chart = charts.profile_chart(profile, window=(lo, hi))[None]
        return io.NodeOutput(profile, chart, lo, hi, ui={UI_KEY: [payload]})


def _regularizers(l2_weight: float, contrastive_weight: float) -> list:
    regs = []
    if l2_weight > 0:
        regs.append(L2Norm(l2_weight))
    if contrastive_weight > 0:
        regs.append(NearestNeighborContrastive(contrastive_weight))
    return regs


class TrainTextualInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InversionTrainTextualInversion",
            display_name="Train Textual Inversion (Inversion)",
            category=CATEGORY,
            description=(
                "Learns token embeddings for the concept in the images and saves models/embeddings/<name>.safetensors "
                "(use it as embedding:<name> in any prompt, or wire the output into Apply Learned Embedding). "
                "Methods: " + "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items())
            ),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SD1.x, SD2.x or SDXL) to learn the concept for."),
                io.Clip.Input("clip", tooltip="Its CLIP: the embedding is learned for every text encoder in it."),
                io.Vae.Input("vae", tooltip="Its VAE (encodes the images once, before training)."),
                io.Image.Input("images", tooltip="The concept images (Load Concept Images)."),
                InitType.Input("init", tooltip="Initial vectors (Caption Init): k = the init text's tokens."),
                io.String.Input("name", default="my-concept",
                                tooltip="Name of the concept: the file models/embeddings/<name>.safetensors and the "
                                "word after 'embedding:' in prompts."),
                io.Combo.Input("method", options=list(PRESETS), default=DEFAULT_METHOD,
                               tooltip="Timestep strategy + optimiser. adaptive and high_grad are seeds/000's, "
                               "directional is DTI (seeds/002); high_grad* need a profile."),
                io.Int.Input("steps", default=500, min=1, max=100000, tooltip="Optimisation steps (total, when resuming)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per step."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=10.0, step=0.0001, round=False,
                               tooltip=f"0 = the method's default ({AdamW.default_lr:g} for AdamW, "
                               f"{RiemannianSGD.default_lr:g} rad for DTI's Riemannian SGD)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of every random draw; a resumed run continues the same draws."),
                *_template_inputs(),
                io.Combo.Input("if_exists", options=list(IF_EXISTS), default="error",
                               tooltip="When <name>.safetensors exists: error (never touch it), overwrite (train "
                               "anew; the file is replaced only when the new run completes, a cancelled run "
                               "leaves it as it was), resume (continue from it and its state in "
                               "models/inversion_runs/<name>)."),
                io.Int.Input("checkpoint_every", default=100, min=0, max=100000,
                             tooltip="Save the embedding and the run state every N steps (0 = only at the end). "
                             "While an existing file is being overwritten, checkpoints go to "
                             "models/inversion_runs/<name> until the run completes."),
                GradProfileType.Input("profile", optional=True,
                                      tooltip="Gradient profile (Gradient Norm Profiler): required by high_grad "
                                      "methods, seeds the adaptive ones."),
                io.Mask.Input("masks", optional=True, tooltip="Loss masks (Load Concept Images): 1 = the concept."),
                io.Boolean.Input("flip", default=True, optional=True,
                                 tooltip="Also train on mirrored images (off for text or asymmetric concepts)."),
                io.Int.Input("interval_start", default=_P.interval[0], min=0, max=999, optional=True,
                             tooltip="interval method: first timestep (paper baselines 0, 350, 900)."),
                io.Int.Input("interval_end", default=_P.interval[1], min=0, max=999, optional=True,
                             tooltip="interval method: last timestep (paper baselines 100, 450, 999)."),
                io.Int.Input("single_t", default=_P.single_t, min=0, max=999, optional=True,
                             tooltip="single_step method: the timestep (paper: 400)."),
                io.Int.Input("window", default=_P.window, min=1, max=1000, optional=True,
                             tooltip="high_grad methods: width of the interval around the highest g(t)."),
                io.Int.Input("adaptive_bins", default=_P.bins, min=1, max=1000, optional=True,
                             tooltip="adaptive methods: timestep bins of the running g(t) estimate."),
                io.Float.Input("kappa", default=_P.kappa, min=0.0, max=1.0, step=1e-5, round=False, optional=True,
                               tooltip="directional methods: strength of the vMF prior toward the class word."),
                io.String.Input("class_word", default="", optional=True,
                                tooltip="directional methods: prior direction, e.g. 'dog'. Empty = the init's "
                                "class word (Caption Init), else the initial vectors."),
                io.Float.Input("l2_weight", default=0.0, min=0.0, max=10.0, step=1e-5, round=False, optional=True,
                               tooltip="L2 penalty on the vectors' norm (seeds/003); 0 = off."),
                io.Float.Input("contrastive_weight", default=0.0, min=0.0, max=10.0, step=1e-4, round=False,
                               optional=True,
                               tooltip="Nearest-neighbour contrastive regulariser (seeds/003 Eq. 2); 0 = off."),
            ],
            outputs=[
                EmbeddingType.Output("embedding", display_name="embedding",
                                     tooltip="The learned embedding (also saved to the file)."),
                io.Image.Output("chart", display_name="chart", tooltip="Loss, sampled timesteps and vector norms."),
                io.String.Output("path", display_name="path", tooltip="The embedding file written."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, name="", if_exists="error", **_):
        if if_exists != "resume":
            return ""
        try:
            return RunFiles.of(name.strip()).fingerprint()
        except ValueError:
            return ""

    @classmethod
    def execute(cls, model, clip, vae, images, init, name, method, steps, batch_size, learning_rate, seed,
                templates, custom_templates, if_exists, checkpoint_every, profile=None, masks=None, flip=True,
                interval_start=_P.interval[0], interval_end=_P.interval[1], single_t=_P.single_t, window=_P.window,
                adaptive_bins=_P.bins, kappa=_P.kappa,
                class_word="", l2_weight=0.0, contrastive_weight=0.0) -> io.NodeOutput:
        node = node_id(cls)
        if interval_start > interval_end:
            raise ValueError(f"interval_start ({interval_start}) must not exceed interval_end ({interval_end})")
        files, resume = RunFiles.open(name.strip(), if_exists, node)
        concept = concept_data(model, clip, vae, images, init, name.strip(), masks, flip)
        config = TrainConfig(steps=steps, batch_size=batch_size, seed=seed, flip=flip,
                             templates=templates_for(templates, custom_templates), checkpoint_every=checkpoint_every)
        params = MethodParams(interval=(interval_start, interval_end), single_t=single_t, window=window,
                              bins=adaptive_bins, kappa=kappa,
                              class_word=class_word.strip() or init.metadata.get("class_word", ""))
        metadata = {"method": method, "model_family": embedding_family(init.keys),
                    "resolution": f"{images.shape[2]}x{images.shape[1]}", "batch_size": batch_size,
                    "images": images.shape[0], "trainer": "ComfyUI-Inversion"}
        with training_host(model, clip) as host:
            m = build_method(method, host.text_side, host.denoiser.num_timesteps, params, profile=profile,
                             init_vectors=concept.embedding.vectors)
            config = replace(config, lr=learning_rate or None)  # 0 = the method's own rate
            trainer = Trainer(host.text_side, host.denoiser, [concept], config, timesteps=m.sampler,
                              optimizer=m.optimizer, regularizers=_regularizers(l2_weight, contrastive_weight),
                              resume=resume, checkpoint=files.checkpoint,
                              metadata={k: str(v) for k, v in metadata.items()})
            reporter = TrainReporter(node, steps, method, host.denoiser.num_timesteps, trainer.step)
            result, written = files.run(trainer, reporter)
        payload = history_payload(result.history, method=method, num_timesteps=host.denoiser.num_timesteps,
                                  total=steps, last_info=reporter.last)
        chart = charts.loss_chart(payload)[None]
        return io.NodeOutput(result.embedding, chart, str(written), ui={UI_KEY: [payload]})


NODES = [GradNormProfiler, TrainTextualInversion]

try:  # older versions kept <name>.state.safetensors in models/embeddings, where every UI lists it
    migrate_side_files()
except Exception as _e:  # noqa: BLE001 - never keep ComfyUI from starting over a file move
    log.warning("could not move old training-state files out of models/embeddings: %s", _e)
