"""GradNormProfiler and TrainTextualInversion: thin nodes over ``inversion.methods.profiler`` / ``inversion.trainer``.

Both encode the concept images with the VAE first (the VAE is not kept loaded while training),
then train inside ``training_host`` (full load, gradients inside ComfyUI's inference-mode prompt).

With Add Concept nodes on its ``concepts`` input the trainer learns its own concept and each added
one in one ``Trainer``: each micro-batch holds ``batch_size`` draws of every concept (so N concepts
make a UNet batch of ``batch_size`` x N, and every concept gets the steps and the batch it would get
alone), one embedding file per concept (``RunFiles``), and the contrast is Eq. 2 across them.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace

import torch

from comfy_api.latest import io

from ..inversion import charts
from ..inversion.embedding import LearnedEmbedding, validate_name
from ..inversion.methods.g_reading import check_profile_reading
from ..inversion.methods.optim import AdamW, RiemannianSGD
from ..inversion.options import TrainingOptions
from ..inversion.methods.presets import DEFAULT_METHOD, PRESETS, MethodParams, build_method, prior_directions
from ..inversion.methods.profiler import profile_gradients
from ..inversion.trainer import ConceptData, Trainer, prepare_concept
from .comfy_embed import check_embedding_fits, embedding_family
from .comfy_host import (ComfyLatentEncoder, gradient_checkpointing, static_models, training_host,
                         training_precision, with_compute_dtype)
from .comfy_preview import TrainingPreviews, previews_off
from .comfy_run import UI_KEY, TrainReporter, history_payload, progress_callback, send_event
from .concept_nodes import ConceptInput, check_concept_wiring, concept_list
from .run_files import IF_EXISTS, migrate_side_files, open_run, run_files
from .comfy_lora import lora_clone
from .lora_nodes import apply_lora, check_lora_file, lora_path, resume_lora, write_lora
from .types import (ConceptsType, DatasetType, EmbeddingType, GradProfileType, InitType, LoraOptionsType, OptionsType,
                    PreviewsType)

__all__ = ["NODES", "GradNormProfiler", "TrainTextualInversion", "concept_data"]

log = logging.getLogger(__name__)

CATEGORY = "inversion/train"
_P = MethodParams()  # the one place method defaults are written; the schema and execute read them
METHOD_TOOLTIP = (
    f"Timestep strategy + optimiser. {DEFAULT_METHOD} (default): t ~ g(t), measured while training (seeds/000); "
    "on the miniature world never behind vanilla, faster to reach its accuracy at a slower learning rate on both "
    "tasks and level or ahead at these defaults; both end level (README, \"Which method?\", for the intervals). "
    "vanilla is Gal et al.'s; interval and single_step are the paper's fixed windows ([350, 450], t = 400): "
    "interval was far behind on one task and level on the other; high_grad* train on a profile's best "
    "window (they need a profile); directional* are DTI (seeds/002). Their parameters are on Training Options.")


def node_id(cls) -> str | None:
    """The running node's id (None when ``execute`` is called outside ComfyUI's executor)."""
    return None if cls.hidden is None else cls.hidden.unique_id


def concept_pixels(images=None, masks=None, dataset=None):
    """A concept's pixels in [0, 1] and masks as the library takes them: (N tensors [3, H_i, W_i], N masks
    or None) from a ``dataset`` (it wins), else ([N, 3, H, W], [N, H, W] resized to the images, or None).
    An all-ones mask (Load Concept Images without masks) is no mask."""
    if dataset is not None:  # per-image tensors of any bucket, with their masks
        return dataset.pixels()
    pixels = images.movedim(-1, 1)[:, :3].float().cpu()
    if masks is None:
        return pixels, None
    m = masks.float().cpu()
    m = m[None] if m.ndim == 2 else m
    if m.shape[0] == 1 and pixels.shape[0] > 1:
        m = m.expand(pixels.shape[0], -1, -1)
    if bool((m >= 0.999).all()):
        return pixels, None
    if tuple(m.shape[-2:]) != tuple(pixels.shape[-2:]):
        m = torch.nn.functional.interpolate(m[:, None], size=pixels.shape[-2:], mode="bilinear")[:, 0]
    return pixels, m


def concept_data(model, clip, vae, init, name: str, *, images=None, masks=None, dataset=None,
                 flip: bool = True) -> ConceptData:
    """The concept (initial vectors named ``name``) and its latents, encoded once with the VAE.

    ``dataset`` (Load Concept Images' dataset output, an ``inversion.data.dataset.ConceptImages``) wins over
    ``images``/``masks`` and brings the per-image captions and the aspect buckets."""
    check_concept_wiring(init, images, dataset)
    check_embedding_fits(clip, init, "init")
    name = validate_name(name)
    emb = LearnedEmbedding(name, {k: v.detach().float().cpu() for k, v in init.vectors.items()}, f"<{name}>",
                           dict(init.metadata))
    pixels, m = concept_pixels(images, masks, dataset)
    sizes = dataset.sizes() if dataset is not None else [tuple(pixels.shape[-2:])]
    captions = None if dataset is None else dataset.captions_for(emb.placeholder)
    # Buckets of a small size have sides below 64 (about size/sqrt(2)); the VAE needs multiples of 8.
    least = 32 if dataset is not None else 64
    bad = sorted({f"{w}x{h}" for h, w in sizes if h < least or w < least or h % 8 or w % 8})
    if bad:
        which = "dataset" if dataset is not None else "images"
        raise ValueError(f"{which}: {', '.join(bad)} pixels; use Load Concept Images to fit them to a size of at "
                         "least 64 that is a multiple of 8")
    with torch.inference_mode(False):
        return prepare_concept(ComfyLatentEncoder(vae, model), pixels, emb, captions=captions, masks=m, flip=flip)


def _image_inputs() -> list:
    """The concept's images: a dataset (captions, aspect buckets) or an IMAGE batch with its masks."""
    return [
        io.Image.Input("images", optional=True, tooltip="The concept images as one IMAGE batch (Load Concept "
                       "Images' images output). Not needed when dataset is connected."),
        io.Mask.Input("masks", optional=True, tooltip="Loss masks for the images (Load Concept Images): 1 = the concept."),
        DatasetType.Input("dataset", optional=True,
                          tooltip="Load Concept Images' dataset output: the images with their per-image captions "
                          "(image.txt) and, with fit = bucket, at their own aspect ratios. Wins over images/masks."),
    ]


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
                InitType.Input("init", tooltip="Initial vectors (Caption Init): g(t) is measured with them."),
                io.Int.Input("bins", default=20, min=1, max=1000, tooltip="Timestep bins over [0, T)."),
                io.Int.Input("samples_per_bin", default=4, min=1, max=256,
                             tooltip="Draws per bin (image, prompt, noise, t); more = smoother, slower."),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="Draws per forward/backward pass."),
                io.Int.Input("window", default=_P.window, min=1, max=1000,
                             tooltip="Width of the high-grad interval to suggest, in timesteps (paper: 100)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the draws."),
                *_image_inputs(),
                OptionsType.Input("options", optional=True,
                                  tooltip="Training Options: the templates (and flip) to measure with, as the "
                                  "trainer will use them."),
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
    def execute(cls, model, clip, vae, init, bins, samples_per_bin, batch_size, window, seed, images=None,
                masks=None, dataset=None, options=None) -> io.NodeOutput:
        node = node_id(cls)
        opts = _options(options)
        concept = concept_data(model, clip, vae, init, "profile", images=images, masks=masks, dataset=dataset,
                               flip=opts.flip)
        total = -(-bins * samples_per_bin // batch_size)
        progress = progress_callback(total, node)
        with training_host(model, clip, train_t5=opts.train_t5) as host:
            profile = profile_gradients(host.text_side, host.denoiser, [concept], bins=bins,
                                        samples_per_bin=samples_per_bin, batch_size=batch_size, seed=seed,
                                        templates=opts.template_list(), reading=opts.g_reading, callback=progress)
        lo, hi = profile.best_window(min(window, profile.num_timesteps))
        payload = {"kind": "profile", "bin_edges": profile.edges.tolist(), "mean": profile.mean.tolist(),
                   "std": profile.std.tolist(), "num_timesteps": profile.num_timesteps, "window": [lo, hi],
                   "window_width": window, "step": total, "total": total}
        send_event(node, payload)
        chart = charts.profile_chart(profile, window=(lo, hi))[None]
        return io.NodeOutput(profile, chart, lo, hi, ui={UI_KEY: [payload]})


def _options(options) -> TrainingOptions:
    if options is None:
        return TrainingOptions()
    if not isinstance(options, TrainingOptions):
        raise TypeError("options: connect the output of a Training Options node")
    return options.validate()


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
                "Everything beyond what every run needs is on the optional Training Options node. "
                "Methods: " + "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items())
            ),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SD1.x, SD2.x or SDXL) to learn the concept for."),
                io.Clip.Input("clip", tooltip="Its CLIP: the embedding is learned for every text encoder in it."),
                io.Vae.Input("vae", tooltip="Its VAE (encodes the images once, before training)."),
                InitType.Input("init", tooltip="Initial vectors (Caption Init): k = the init text's tokens."),
                io.String.Input("name", default="my-concept",
                                tooltip="Name of the concept: the file models/embeddings/<name>.safetensors and the "
                                "word after 'embedding:' in prompts."),
                io.Combo.Input("method", options=list(PRESETS), default=DEFAULT_METHOD,
                               tooltip=METHOD_TOOLTIP),
                io.Int.Input("steps", default=500, min=1, max=100000, tooltip="Optimisation steps (total, when resuming)."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=10.0, step=0.0001, round=False,
                               tooltip=f"0 = the method's default ({AdamW.default_lr:g} for AdamW, "
                               f"{RiemannianSGD.default_lr:g} rad for DTI's Riemannian SGD)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per step."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of every random draw; a resumed run continues the same draws."),
                io.Combo.Input("if_exists", options=list(IF_EXISTS), default="error",
                               tooltip="When <name>.safetensors exists: error (never touch it), overwrite (train "
                               "anew; the file is replaced only when the new run completes, a cancelled run "
                               "leaves it as it was), resume (continue from it and its state in "
                               "models/inversion_runs/<name>)."),
                *_image_inputs(),
                GradProfileType.Input("profile", optional=True,
                                      tooltip="Gradient profile (Gradient Norm Profiler): required by high_grad "
                                      "methods, seeds the adaptive ones."),
                OptionsType.Input("options", optional=True,
                                  tooltip="Training Options: method parameters, schedule, regularisers, flip, "
                                  "templates, captions, checkpoints, precision, memory. Unconnected = defaults."),
                PreviewsType.Input("previews", optional=True,
                                   tooltip="Preview Options: images of the prompts every N steps, sampled on this "
                                   "model with the vectors so far, shown on the node. Unconnected = no previews "
                                   "(nothing is sampled)."),
                ConceptsType.Input("concepts", optional=True,
                                   tooltip="More concepts (Add Concept nodes, chained): trained in this same run with "
                                   "this node's own concept: one model load, each step's UNet batch holds batch_size "
                                   "images of every concept, one file models/embeddings/<name>.safetensors per "
                                   "concept (if_exists applies to each; the run's state is kept in "
                                   "models/inversion_runs/<this node's name>), a loss and norm curve per concept on "
                                   "the chart, and Training Options' contrastive_weight is seeds/003 Eq. 2 across "
                                   "the concepts. Previews show this node's own concept."),
                LoraOptionsType.Input("lora", optional=True,
                                      tooltip="LoRA Options: pivotal tuning, a LoRA on the UNet trained together with "
                                      "the embedding, saved as models/loras/<name>.safetensors when the run completes "
                                      "(if_exists applies to it too; its state is in the run's state, so resume "
                                      "continues both). Unconnected = the embedding alone."),
            ],
            outputs=[
                EmbeddingType.Output("embedding", display_name="embedding",
                                     tooltip="The learned embedding (also saved to the file)."),
                io.Image.Output("chart", display_name="chart", tooltip="Loss, sampled timesteps and vector norms."),
                io.String.Output("path", display_name="path", tooltip="The embedding file written."),
                io.Image.Output("previews_out", display_name="previews",
                                tooltip="The previews (Preview Options): a row per preview step, a column per prompt. "
                                "Without previews, a small black image."),
                io.String.Output("paths", display_name="paths",
                                 tooltip="Every embedding file written, one per line: this node's concept first, "
                                 "then each added concept's (just path without the concepts input)."),
                io.Model.Output("model_out", display_name="model",
                                tooltip="The input MODEL with the trained LoRA applied (LoRA Options), ready for a "
                                "sampler; without LoRA Options, the input MODEL unchanged."),
                io.String.Output("lora_path", display_name="lora_path",
                                 tooltip="The LoRA file written (models/loras/<name>.safetensors); empty without LoRA "
                                 "Options."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, name="", if_exists="error", concepts=None, **_):
        if if_exists != "resume":
            return ""
        try:
            names = [name.strip()] + [c.name for c in concept_list(concepts)]
            return run_files(names).fingerprint()
        except (ValueError, TypeError):
            return ""

    @classmethod
    def execute(cls, model, clip, vae, init, name, method, steps, learning_rate, batch_size, seed, if_exists,
                images=None, masks=None, dataset=None, profile=None, options=None, previews=None,
                concepts=None, lora=None) -> io.NodeOutput:
        node = node_id(cls)
        opts = _options(options)
        check_profile_reading(None if profile is None else profile.reading, opts.g_reading)  # before any work
        specs = [ConceptInput(name.strip(), init, images, masks, dataset), *concept_list(concepts)]
        lora_file = lora_path(specs[0].name) if lora is not None else None
        if lora_file is not None:
            check_lora_file(lora_file, if_exists)
        files, resume = open_run([c.name for c in specs], if_exists, node)
        data = [_concept(model, clip, vae, c, opts.flip) for c in specs]
        names = [c.name for c in specs] if len(specs) > 1 else None
        metadata = {"method": method, "model_family": embedding_family(init.keys), "batch_size": batch_size,
                    "trainer": "ComfyUI-Inversion", **({"concepts": ",".join(names)} if names else {})}
        model_in, clip_in, group = model, clip, None
        if lora is not None:  # the adapters go on a clone: the graph's MODEL never runs them
            model, group = lora_clone(model, lora, steps, seed=seed)
            resume_lora(group, lora_file, resume, files.warn)
        model, clip = static_models(model, clip)  # dynamic VRAM: core's fully loaded copy (previews use it too)
        model = with_compute_dtype(model, opts.precision)  # "auto": the model as loaded
        own = specs[0]  # previews show (and CLIP scores compare with) this node's own concept
        shown = None if previews is None else TrainingPreviews(  # before the run
            previews, model, clip, vae, node, *concept_pixels(own.images, own.masks, own.dataset))
        with training_host(model, clip, train_t5=opts.train_t5) as host, _memory(model, opts):
            autocast_dtype, loss_scale = training_precision(host, opts.precision)
            config = opts.train_config(steps=steps, batch_size=batch_size * len(data), seed=seed,
                                       lr=learning_rate or None, autocast_dtype=autocast_dtype, loss_scale=loss_scale,
                                       balance_concepts=len(data) > 1)
            m = _method(method, host, opts, profile, specs, data)
            trainer = Trainer(host.text_side, host.denoiser, data, config, timesteps=m.sampler,
                              optimizer=m.optimizer, regularizers=opts.regularizers(len(data)),
                              resume=resume, checkpoint=files.checkpoint, snapshot=files.snapshot,
                              metadata={k: str(v) for k, v in metadata.items()}, groups=[group] if group else ())
            reporter = TrainReporter(node, steps, method, host.denoiser.num_timesteps, trainer.step, concepts=names)
            callback = reporter if shown is None else shown.after_steps(trainer, reporter)
            result, written = files.run(trainer, callback)
        payload = history_payload(result.history, method=method, num_timesteps=host.denoiser.num_timesteps,
                                  total=steps, last_info=reporter.last, stop_step=result.stop_step,
                                  stop_reason=result.stop_reason, concepts=names)
        if shown is not None:
            payload.update(shown.chart_fields())
        chart = charts.loss_chart(payload)[None]
        grid = previews_off() if shown is None else shown.grid()
        model_out, lora_written = model_in, ""
        if group is not None:
            tensors = group.kohya_state_dict()  # once: the file and the MODEL output are the same LoRA
            lora_written = str(write_lora(tensors, lora_file, {**{k: str(v) for k, v in metadata.items()},
                                                               "embedding": specs[0].name,
                                                               "steps": str(result.steps_done)}))
            model_out = apply_lora(model_in, clip_in, tensors)
        return io.NodeOutput(result.embedding, chart, str(written[0]), grid, "\n".join(str(p) for p in written),
                             model_out, lora_written, ui={UI_KEY: [payload]})


def _concept(model, clip, vae, c: ConceptInput, flip: bool) -> ConceptData:
    """``concept_data`` for one wired concept, its file's image metadata (count, sizes) in its embedding."""
    data = concept_data(model, clip, vae, c.init, c.name, images=c.images, masks=c.masks, dataset=c.dataset,
                        flip=flip)
    data.embedding.metadata.update(_image_metadata(c.images, c.dataset))
    return data


def _method(method: str, host, opts: TrainingOptions, profile, specs: list[ConceptInput], data: list[ConceptData]):
    """The run's timestep sampler and optimiser. DTI's prior directions are each concept's own (its init
    text and class word); with several concepts they are worked out here, one concept at a time."""
    def class_word(c: ConceptInput) -> str:
        return opts.method.class_word or c.init.metadata.get("class_word", "")

    T = host.denoiser.num_timesteps
    if len(data) == 1:
        c = specs[0]
        return build_method(method, host.text_side, T, replace(opts.method, class_word=class_word(c)),
                            profile=profile, init_vectors=data[0].embedding.vectors,
                            init_text=c.init.metadata.get("init_text") or None)
    mu = [prior_directions(host.text_side, d.embedding.vectors, c.init.metadata.get("init_text") or None,
                           class_word(c)) for c, d in zip(specs, data)]
    init = {k: torch.cat([x[k] for x in mu]) for k in mu[0]}  # already the directions: no class word again
    return build_method(method, host.text_side, T, replace(opts.method, class_word=""), profile=profile,
                        init_vectors=init, init_text=None)


def _image_metadata(images, dataset) -> dict[str, str]:
    """How many images, at which size(s): written into the embedding file's header."""
    if dataset is not None:
        sizes = sorted({f"{img.shape[-1]}x{img.shape[-2]}" for img in dataset.images})
        return {"images": str(len(dataset.images)), "resolution": ",".join(sizes)}
    return {"images": str(images.shape[0]), "resolution": f"{images.shape[2]}x{images.shape[1]}"}


def _memory(model, opts: TrainingOptions):
    """UNet gradient checkpointing for the run, when asked (nothing otherwise)."""
    return gradient_checkpointing(model) if opts.gradient_checkpointing else contextlib.nullcontext()


NODES = [GradNormProfiler, TrainTextualInversion]

try:  # older versions kept <name>.state.safetensors in models/embeddings, where every UI lists it
    migrate_side_files()
except Exception as _e:  # noqa: BLE001 - never keep ComfyUI from starting over a file move
    log.warning("could not move old training-state files out of models/embeddings: %s", _e)
