"""Preview images while training: ComfyUI's own sampler on the model being trained, with the
current learned vectors, leaving the run and the models as it found them.

Every ``PreviewSettings.every`` steps, and after the last step, ``TrainingPreviews`` renders one
row: an image per prompt, each from ``comfy.sample.sample`` (the function KSampler calls) with one
seed, negative prompt, sampler, scheduler, step count, cfg and size, decoded by the VAE as VAEDecode
does. The vectors enter the prompts as Apply Learned Embedding puts them there
(``comfy_embed.clip_with_embedding``'s tokenizer override); the conditioning is then encoded by the
run's own CLIP object, whose patcher training has loaded (loading the clone's patcher would
displace it). Each row goes to the node as ComfyUI's progress preview image (the frontend draws it
on the node while the run goes on); the rows are the trainer's ``previews`` IMAGE, one row per
preview step and one column per prompt. With an open_clip model picked, each row is also scored
(``inversion.vision_language.clip_score``: CLIP image similarity to the concept images, text similarity to the edits),
sent to the live chart as a ``preview_score`` event and added to the final chart.

What a preview touches, and how it is put back (sampling after the run must be bit-identical, and
the run must learn exactly the vectors it learns without previews):

- autograd: sampling and encoding run under ``torch.no_grad()`` outside inference mode (weights
  moved in inference mode would become inference tensors, which training cannot use); the VAE,
  which training never uses, decodes in inference mode as in a prompt;
- the training's attention override (``comfy_attention.sdpa_attention``): lifted for the duration,
  so the patcher samples with the ``model_options`` it had before the run, as KSampler would;
- torch's global RNG (``comfy.sample.prepare_noise`` reseeds it), CPU and CUDA: restored;
- train/eval flags of every UNet and text-encoder module: restored;
- device placement: sampling and decoding load models without ``force_full_load`` (on a GPU short
  of memory ComfyUI may move weights), so MODEL and CLIP are loaded fully again and thawed
  (``comfy_host.thaw``, a no-op when nothing moved) after each preview.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils

from ..inversion.vision_language.clip_score import ClipPreviewScorer, PreviewClipScore
from ..inversion.embedding import LearnedEmbedding
from ..inversion.data.prompts import CAPTION_MARKERS
from .comfy_attention import OVERRIDE_KEY
from .comfy_embed import clip_with_embedding
from .comfy_host import thaw
from .comfy_run import check_cancel, send_event
from .downloads import NONE, fetch
from .folders import OPEN_CLIP
from .model_cache import load_open_clip, on_compute_device

__all__ = ["PreviewSettings", "TrainingPreviews", "MAX_ROWS", "MAX_PROMPTS", "TRIGGER", "previews_off"]

MAX_ROWS = 64  # preview steps per run: each row is len(prompts) images kept until the run ends
MAX_PROMPTS = 8  # each prompt is a full sampling run at every preview step
TRIGGER = "xqinversionpreview"  # the made-up word the concept's markers become (no CLIP vocabulary word)
OFF_SIZE = 64  # side of the black image the previews output holds when previews are off


def _markers() -> str:
    return " or ".join(CAPTION_MARKERS)


@dataclass(frozen=True)
class PreviewSettings:
    """What Preview Options sets: when to preview, which prompts, and KSampler's settings.

    ``prompts`` holds one prompt per line, each with ``{}`` or ``[name]`` (the pack's caption
    markers) where the concept goes; every image of a run uses ``seed``, so rows differ only by
    the vectors and columns only by the prompt."""

    every: int = 100
    prompts: str = "a photo of {}\na painting of {} on the beach"
    negative: str = "blurry, low quality, watermark, text"
    seed: int = 0
    sampler_name: str = "euler"
    scheduler: str = "normal"
    steps: int = 20
    cfg: float = 7.0
    width: int = 512
    height: int = 512
    # An open_clip model (Caption Init's class-mode list) scores each preview row: CLIP image similarity to
    # the concept images and text similarity to the edit prompts (``inversion.vision_language.clip_score``); "none" = off.
    open_clip_model: str = NONE

    def prompt_list(self) -> list[str]:
        """The non-empty lines of ``prompts``, stripped."""
        return [line.strip() for line in str(self.prompts).splitlines() if line.strip()]

    def validate(self) -> "PreviewSettings":
        """Raise a ValueError that names the setting and says what to set; returns self."""
        if not (isinstance(self.every, int) and self.every >= 1):
            raise ValueError(f"previews: every must be a whole number of steps >= 1, got {self.every!r}")
        prompts = self.prompt_list()
        if not prompts:
            raise ValueError(f"previews: prompts is empty; write one prompt per line with {_markers()} where the "
                             "concept goes, e.g. 'a photo of {}'")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"previews: {len(prompts)} prompts, at most {MAX_PROMPTS} (each is a full sampling run "
                             "at every preview step); remove some lines")
        for i, p in enumerate(prompts, 1):
            if not any(m in p for m in CAPTION_MARKERS):
                raise ValueError(f"previews: prompt {i} ({p!r}) has no {_markers()}: put one where the concept goes "
                                 "(e.g. 'a photo of {}'), or the preview would not show what is being learned")
        if self.sampler_name not in comfy.samplers.KSampler.SAMPLERS:
            raise ValueError(f"previews: sampler_name {self.sampler_name!r} is not one of ComfyUI's samplers "
                             f"({', '.join(comfy.samplers.KSampler.SAMPLERS[:6])}, ...); pick one from the list")
        if self.scheduler not in comfy.samplers.KSampler.SCHEDULERS:
            raise ValueError(f"previews: scheduler {self.scheduler!r} is not one of ComfyUI's schedulers "
                             f"({', '.join(comfy.samplers.KSampler.SCHEDULERS)}); pick one from the list")
        if not 1 <= int(self.steps) <= 1000:
            raise ValueError(f"previews: steps must be in [1, 1000], got {self.steps}")
        if not (math.isfinite(float(self.cfg)) and 0.0 <= float(self.cfg) <= 100.0):
            raise ValueError(f"previews: cfg must be in [0, 100], got {self.cfg}")
        for what, v in (("width", self.width), ("height", self.height)):
            if not (64 <= int(v) <= 4096 and int(v) % 8 == 0):
                raise ValueError(f"previews: {what} must be a multiple of 8 in [64, 4096] (the VAE works in 8-pixel "
                                 f"blocks), got {v}")
        return self

    def due(self, step: int, total: int) -> bool:
        """Whether the run previews after ``step``: every ``every`` steps, and after the last."""
        return step % self.every == 0 or step >= total

    def preview_steps(self, start: int, total: int) -> list[int]:
        """The steps after which a run from ``start`` to ``total`` previews (early stop adds its step)."""
        steps = list(range((start // self.every + 1) * self.every, total + 1, self.every))
        return steps if steps and steps[-1] == total else steps + [total]

    def least_every(self, start: int, total: int) -> int:
        """The smallest ``every`` that keeps a run from ``start`` to ``total`` within ``MAX_ROWS`` rows."""
        every = max(1, self.every)
        while len(PreviewSettings(every=every).preview_steps(start, total)) > MAX_ROWS:
            every = max(every + 1, math.ceil((total - start) / (MAX_ROWS - 1)))
        return every

    def concept_prompt(self, prompt: str, word: str = TRIGGER) -> str:
        """``prompt`` with each marker replaced by the concept's trigger ``word``."""
        for m in CAPTION_MARKERS:
            prompt = prompt.replace(m, f" {word} ")
        return " ".join(prompt.split())


def _scorer(settings: PreviewSettings, images, masks, node_id: str | None) -> ClipPreviewScorer:
    """The CLIP scorer of a run's previews: the open_clip model loaded, the concept images and prompts encoded."""
    try:
        oc = load_open_clip(fetch(OPEN_CLIP, settings.open_clip_model, node_id))
    except (ValueError, ImportError) as e:
        raise type(e)(f"previews: open_clip_model: {e} (or set it to none: no CLIP scores)") from e
    with torch.inference_mode(False), torch.no_grad(), on_compute_device(oc.model, oc):
        return ClipPreviewScorer(oc, images, settings.prompt_list(), masks)


def previews_off() -> torch.Tensor:
    """The ``previews`` output of a run without previews: one small black image (nothing is sampled)."""
    return torch.zeros(1, OFF_SIZE, OFF_SIZE, 3)


def _pil(row: torch.Tensor) -> Image.Image:
    """An IMAGE [1, H, W, 3] in [0, 1] as a PIL image."""
    return Image.fromarray((row[0].clamp(0, 1).numpy() * 255.0).round().astype(np.uint8))


def _preview_size() -> int:
    try:
        from comfy.cli_args import args
        return int(args.preview_size)
    except (ImportError, AttributeError, TypeError, ValueError):
        return 512


@contextlib.contextmanager
def _own_attention(model, own_options: dict) -> Iterator[None]:
    """The patcher's ``model_options`` from before the run for the duration (no training override)."""
    current = model.model_options
    if current is own_options or OVERRIDE_KEY not in current.get("transformer_options", {}):
        yield
        return
    model.model_options = own_options
    try:
        yield
    finally:
        model.model_options = current


@contextlib.contextmanager
def _modes_kept(*modules: torch.nn.Module) -> Iterator[None]:
    """Every submodule's train/eval flag as it was on entry, whatever ran inside."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _rng_kept() -> contextlib.AbstractContextManager:
    """torch's global RNG states (CPU, and CUDA where initialised) restored on exit."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


class TrainingPreviews:
    """The previews of one training run: renders a row when due and keeps the rows for the grid."""

    def __init__(self, settings: PreviewSettings, model, clip, vae, node_id: str | None = None,
                 concept_images: torch.Tensor | list[torch.Tensor] | None = None, concept_masks=None):
        """Before the run (``model.model_options`` is read here, before the training's attention override).

        With ``settings.open_clip_model`` set, the open_clip model is loaded (fetched on its first run when
        a "(download)" entry is picked) and the ``concept_images`` ([N, 3, H, W] or N [3, H_i, W_i] in [0, 1],
        cropped to ``concept_masks`` when given) and prompts are encoded here, once."""
        if not isinstance(settings, PreviewSettings):
            raise TypeError("previews: connect the 'previews' output of a Preview Options node")
        if vae is None or getattr(vae, "first_stage_model", None) is None:
            raise ValueError("previews: the VAE decodes the previews; wire the checkpoint's VAE into the trainer")
        self.settings = settings.validate()
        self.model, self.clip, self.vae = model, clip, vae
        self.node_id = node_id
        self.own_options = model.model_options
        self.bar: comfy.utils.ProgressBar | None = None
        self.rows: list[torch.Tensor] = []
        self.steps: list[int] = []
        self.scores: list[tuple[int, PreviewClipScore]] = []
        self.scorer = None if settings.open_clip_model in (NONE, "") else \
            _scorer(settings, concept_images, concept_masks, node_id)

    def after_steps(self, trainer, callback: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``callback`` (the run's reporter) followed, when due, by a preview of ``trainer``'s vectors.
        Refuses a cadence that would make more than ``MAX_ROWS`` rows over the steps left."""
        s, start, total = self.settings, trainer.step, trainer.config.steps
        rows = len(s.preview_steps(start, total))
        if rows > MAX_ROWS:
            raise ValueError(f"previews: every = {s.every} over steps {start + 1}-{total} makes {rows} preview rows, "
                             f"at most {MAX_ROWS}; set every to at least {s.least_every(start, total)}")
        self.bar = comfy.utils.ProgressBar(total, node_id=self.node_id)

        def after_step(info):
            answer = callback(info)
            if s.due(info.step, info.total) or info.stop_reason:
                self.render(trainer.embeddings()[0], info.step, info.total)
            return answer

        return after_step

    def render(self, embedding: LearnedEmbedding, step: int, total: int) -> torch.Tensor:
        """One row [1, H, W x prompts, 3] for ``embedding`` at ``step``: kept, and shown on the node."""
        images = self.images(embedding)
        row = torch.cat(images, dim=2)
        self.rows.append(row)
        self.steps.append(int(step))
        if self.bar is not None:
            self.bar.update_absolute(step, total, ("JPEG", _pil(row), _preview_size()))
        if self.scorer is not None:
            self.score(images, int(step))
        return row

    def score(self, images: list[torch.Tensor], step: int) -> PreviewClipScore:
        """The row's CLIP similarities (``inversion.vision_language.clip_score``): kept, and sent to the live chart."""
        oc = self.scorer.clip
        with torch.inference_mode(False), torch.no_grad(), _rng_kept(), on_compute_device(oc.model, oc):
            result = self.scorer([img[0].movedim(-1, 0) for img in images])
        self.scores.append((step, result))
        send_event(self.node_id, {"kind": "preview_score", "step": step, "clip_image": result.image,
                                  "clip_text": result.text})
        return result

    def chart_fields(self) -> dict[str, Any]:
        """The CLIP similarities for the final chart (``inversion.charts.loss_chart``); {} when not scored."""
        if self.scorer is None:
            return {}
        return {"clip_step": [s for s, _ in self.scores], "clip_image": [r.image for _, r in self.scores],
                "clip_text": [r.text for _, r in self.scores], "clip_model": self.settings.open_clip_model,
                "clip_prompts": list(self.scorer.prompts),
                "clip_prompt_image": [list(r.per_prompt_image) for _, r in self.scores],
                "clip_prompt_text": [list(r.per_prompt_text) for _, r in self.scores]}

    def images(self, embedding: LearnedEmbedding) -> list[torch.Tensor]:
        """An image [1, H, W, 3] per prompt, with every piece of state the run depends on put back."""
        s = self.settings
        model, clip = self.model, self.clip
        with torch.inference_mode(False):
            try:
                with torch.no_grad(), _rng_kept(), _own_attention(model, self.own_options), \
                        _modes_kept(model.model, clip.cond_stage_model):
                    concept = clip_with_embedding(clip, embedding, TRIGGER)
                    negative = self._encode(concept, s.negative)
                    images = []
                    for prompt in s.prompt_list():
                        positive = self._encode(concept, s.concept_prompt(prompt))
                        images.append(self._decode(self._sample(positive, negative)))
                        check_cancel()
                    return images
            finally:
                self._reload()

    def _encode(self, concept_clip, text: str):
        """CLIPTextEncode's conditioning: tokens from the embedding's tokenizer, encoded by the run's CLIP."""
        return self.clip.encode_from_tokens_scheduled(concept_clip.tokenize(text))

    def _sample(self, positive, negative) -> torch.Tensor:
        """KSampler's path (EmptyLatentImage, prepare_noise, comfy.sample.sample) without its progress bar."""
        s = self.settings
        latent = torch.zeros([1, 4, s.height // 8, s.width // 8], device=comfy.model_management.intermediate_device())
        latent = comfy.sample.fix_empty_latent_channels(self.model, latent)
        noise = comfy.sample.prepare_noise(latent, s.seed)
        return comfy.sample.sample(self.model, noise, s.steps, s.cfg, s.sampler_name, s.scheduler, positive, negative,
                                   latent, denoise=1.0, disable_pbar=True, seed=s.seed)

    def _decode(self, samples: torch.Tensor) -> torch.Tensor:
        """VAEDecode, as in a prompt (inference mode); a plain float CPU tensor [1, H, W, 3]."""
        with torch.inference_mode():
            images = self.vae.decode(samples)
            if images.ndim == 5:
                images = images.reshape(-1, *images.shape[-3:])
            images = images[:1, ..., :3].float().cpu()
        return images.clone()

    def _reload(self) -> None:
        """MODEL and CLIP fully loaded and trainable-through again, as ``training_host`` left them."""
        comfy.model_management.load_models_gpu([self.model, self.clip.patcher], force_full_load=True)
        thaw(self.model.model)
        thaw(self.clip.cond_stage_model)

    def grid(self) -> torch.Tensor:
        """The rows as one IMAGE [1, rows x H, prompts x W, 3]: a row per preview step, a column per prompt."""
        if not self.rows:
            return previews_off()
        return torch.cat(self.rows, dim=1)
