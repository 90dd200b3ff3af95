"""Vision-language nodes: CaptionInit (manual / caption / class), OVIPrior and BuildImageStats.

- **InversionCaptionInit** -- the initial vectors of a new concept, one per token of an init text
  (seeds/001): typed by hand, the caption of the concept images by a local captioning model
  (``models/captioners/<model folder>``), or their zero-shot class label by an open_clip model
  (``models/open_clip``). A MASK crops the region of interest first. This is the pack's only
  CaptionInit node; the manual mode needs no extra model. Besides the installed models, each combo
  offers a few "<name> (download)" entries (``inversion.download``): picked and run, the model is
  fetched once into its folder, with a toast, a log line and a byte progress bar.
- **InversionOVIPrior** -- a training-free diffusion prior (seeds/004): a CLIP image embedding
  optimised from pseudo-tokens toward the prompt's text embedding, output as a CLIP_VISION_OUTPUT
  whose ``image_embeds`` is 2-D [1, D] so the stock unCLIPConditioning node takes it (a 1-D tensor
  is silently misread by ComfyUI's unCLIP code, ../shared/COMFYUI_NOTES.md section 4).
- **InversionBuildImageStats** -- mean, covariance and embedding bank of the user's images (with a
  CLIP_VISION model), saved to ``models/ovi_stats`` for OVIPrior's constraints.

Model folders are registered with ``folder_paths`` (so ``extra_model_paths.yaml`` can add more):
``captioners``, ``open_clip``, ``ovi_stats``. Nothing is downloaded unless the user picks a
"(download)" entry; ``HF_HUB_OFFLINE=1`` refuses even that, ``HF_ENDPOINT`` names a mirror.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from pathlib import Path

import torch

import comfy.clip_model
import comfy.clip_vision
import comfy.model_management
import comfy.sd1_clip
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..inversion import caption as captioning
from ..inversion import charts, classify, dataset, download, ovi
from ..inversion import init as init_vectors
from ..inversion.embedding import LearnedEmbedding
from .comfy_host import comfy_text_side
from .comfy_run import warn_user
from .types import InitType

__all__ = ["NODES", "CaptionInit", "OVIPrior", "BuildImageStats", "comfy_vision_tower", "ComfyClipTextTower"]

log = logging.getLogger(__name__)

CAPTIONERS, OPEN_CLIP, OVI_STATS = "captioners", "open_clip", "ovi_stats"
CATEGORY = "inversion/vision-language"
NONE = "none"
FROM_CLIP = "(from the clip input)"

def _register_folders() -> None:
    for name, exts in ((CAPTIONERS, set()), (OPEN_CLIP, set(classify.WEIGHT_SUFFIXES)), (OVI_STATS, {".safetensors"})):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=True)
        folder_paths.folder_names_and_paths[name][1].update(exts)


_register_folders()


def _dirs(name: str) -> list[str]:
    return folder_paths.get_folder_paths(name)


# The downloadable models of each folder: combo label -> hub model (inversion.download's curated lists).
_DOWNLOADS = {CAPTIONERS: {m.label: m for m in download.CAPTIONERS},
              OPEN_CLIP: {m.label: m for m in download.OPEN_CLIP}}


def _installed(found: dict) -> list[str]:
    # a download in progress (<folder>.partial) is not a model yet
    return sorted(n for n in found if not n.split("/")[-1].endswith(download.PARTIAL_SUFFIX))


def _captioner_names() -> list[str]:
    # "none" stays first whatever is installed: saved manual-mode workflows hold it
    return [NONE, *_installed(captioning.find_captioners(_dirs(CAPTIONERS))), *_DOWNLOADS[CAPTIONERS]]


def _open_clip_names() -> list[str]:
    return [NONE, *_installed(classify.find_open_clip_models(_dirs(OPEN_CLIP))), *_DOWNLOADS[OPEN_CLIP]]


def _sizes(kind: str) -> str:
    return ", ".join(f"{m.folder}: {m.repo}, about {m.size}" for m in _DOWNLOADS[kind].values())


def _model_name(kind: str, name: str) -> str:
    """The on-disk name a combo entry stands for ("x (download)" -> "x"), without downloading."""
    entry = _DOWNLOADS[kind].get(name)
    return name if entry is None else entry.folder


def _fetch(kind: str, name: str, node_id: str | None) -> str:
    """The on-disk name of combo entry ``name``, downloading a "(download)" entry that is not installed yet."""
    entry = _DOWNLOADS[kind].get(name)
    if entry is None:
        return name
    found = (captioning.find_captioners if kind == CAPTIONERS else classify.find_open_clip_models)(_dirs(kind))
    if entry.folder in found:
        return entry.folder
    parent = Path(_dirs(kind)[0])
    if (parent / entry.folder).exists():  # complete: used as is; incomplete: an error that says so
        download.download(entry, parent)
        return entry.folder
    files = download.plan(entry, parent)
    size = sum(f.size or 0 for f in files) or None
    warn_user(node_id, f"Downloading {entry.repo} ({len(files)} files, {download.format_size(size)}) from "
                       f"{download.endpoint()} to {parent / entry.folder}; this happens once.")
    bar = comfy.utils.ProgressBar(max(1, size or 1), node_id=node_id)
    shown = [0]

    def progress(done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if done - shown[0] >= total // 200 or done >= total:  # ~200 bar updates, not one per MiB
            shown[0] = done
            bar.update_absolute(done, max(1, total))

    dest = download.download(entry, parent, progress, files=files)
    log.info("downloaded %s to %s", entry.repo, dest)
    return entry.folder


def _stats_names() -> list[str]:
    return [NONE] + folder_paths.get_filename_list(OVI_STATS)


def _mtime(path: str | os.PathLike | None) -> float:
    try:
        return os.path.getmtime(path) if path else 0.0
    except OSError:
        return 0.0


def _folder_mtime(folder: str | os.PathLike | None) -> float:
    """Newest modification time of the files in a model folder (a changed model re-runs the node)."""
    if not folder or not os.path.isdir(folder):
        return _mtime(folder)
    return max((_mtime(p) for p in Path(folder).iterdir() if p.is_file()), default=0.0)


# ------------------------------------------------------------------------------------- model caches
# Nodes keep no instance state (V3 clones the class per run), so loaded models live here: one of each
# kind, parked on the offload device between runs.

_lock = threading.Lock()
_cache: dict[str, tuple[tuple, object]] = {}


def _compute_device_dtype() -> tuple[torch.device, torch.dtype]:
    device = comfy.model_management.get_torch_device()
    if device.type == "cpu":
        return device, torch.float32
    return device, (torch.float16 if comfy.model_management.should_use_fp16(device) else torch.float32)


def _cached(kind: str, key: tuple, load):
    with _lock:
        hit = _cache.get(kind)
        if hit is not None and hit[0] == key:
            return hit[1]
        _cache.pop(kind, None)
        value = load()
        _cache[kind] = (key, value)
        return value


def _park(module: torch.nn.Module) -> None:
    module.to(comfy.model_management.text_encoder_offload_device())
    comfy.model_management.soft_empty_cache()


def _load_captioner(name: str) -> captioning.Captioner:
    folder = captioning.find_captioners(_dirs(CAPTIONERS)).get(name)
    _, dtype = _compute_device_dtype()
    return _cached("captioner", (name, str(folder), _folder_mtime(folder), dtype),
                   lambda: captioning.load_captioner(name, _dirs(CAPTIONERS), "cpu", dtype))


def _load_open_clip(name: str) -> classify.OpenClip:
    path = classify.find_open_clip_models(_dirs(OPEN_CLIP)).get(name)
    _, dtype = _compute_device_dtype()
    return _cached("open_clip", (name, str(path), _folder_mtime(path), dtype),
                   lambda: classify.load_open_clip(name, _dirs(OPEN_CLIP), device="cpu", dtype=dtype))


_label_cache: dict[tuple, torch.Tensor] = {}


def _label_features(clip: classify.OpenClip, labels: list[str]) -> torch.Tensor:
    key = (clip.name, id(clip.model), tuple(labels), classify.DEFAULT_TEMPLATES)
    feats = _label_cache.get(key)
    if feats is None:
        _label_cache.clear()
        feats = classify.label_features(clip, labels).cpu()
        _label_cache[key] = feats
    return feats


# ------------------------------------------------------------------------------- ComfyUI adapters

def _images_bchw(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] -> the library's [B, 3, H, W] (float32, CPU)."""
    return image[..., :3].movedim(-1, 1).float().cpu()


def comfy_vision_tower(clip_vision, device: torch.device, dtype: torch.dtype) -> ovi.HFVisionTower:
    """A ComfyUI CLIP_VISION model as an ``inversion.ovi.VisionTower``.

    The weights are copied into a transformers ``CLIPVisionModelWithProjection`` (ComfyUI uses the
    same key names): a copy made outside inference mode is usable by autograd, and transformers'
    layers add residuals out of place, which ComfyUI's ``CLIPLayer`` does not (notes section 3).
    Call under ``torch.inference_mode(False)``.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    model = getattr(clip_vision, "model", None)
    vm = getattr(model, "vision_model", None)
    proj = getattr(model, "visual_projection", None)
    if not isinstance(model, comfy.clip_model.CLIPVisionModelProjection) or vm.embeddings.class_embedding is None \
            or not isinstance(proj, torch.nn.Linear):
        raise TypeError(
            "clip_vision: OVI needs a CLIP vision model with a projection into the text space (e.g. "
            "clip_vision_h.safetensors for SD2.1 unCLIP-H, ViT-L for unCLIP-L, ViT-bigG); SigLIP, DINOv2 and "
            f"projection-less encoders cannot be used (got {type(model).__name__})"
        )
    layer = vm.encoder.layers[0]
    acts = {id(fn): name for name, fn in comfy.clip_model.ACTIVATIONS.items()}
    act = acts.get(id(layer.mlp.activation))
    if act is None:
        raise TypeError("clip_vision: unknown MLP activation in this CLIP vision model; update nodes/vision_language.py")
    conv = vm.embeddings.patch_embedding
    cfg = CLIPVisionConfig(
        hidden_size=int(vm.embeddings.class_embedding.shape[0]), intermediate_size=int(layer.mlp.fc1.weight.shape[0]),
        num_hidden_layers=len(vm.encoder.layers), num_attention_heads=int(layer.self_attn.heads),
        num_channels=int(conv.weight.shape[1]), image_size=int(clip_vision.image_size),
        patch_size=int(conv.weight.shape[-1]), projection_dim=int(proj.weight.shape[0]), hidden_act=act,
        layer_norm_eps=float(vm.pre_layrnorm.eps),
    )
    with torch.device("meta"):
        hf = CLIPVisionModelWithProjection(cfg)
    sd = {k: v.detach().to(device, dtype).clone() for k, v in model.state_dict().items()
          if not k.startswith("multi_modal_projector.")}
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise TypeError(f"clip_vision: weights do not match a CLIP vision transformer (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    emb = hf.vision_model.embeddings
    emb.position_ids = torch.arange(emb.num_positions, device=device).expand((1, -1))
    return ovi.HFVisionTower(hf.eval(), int(clip_vision.image_size), clip_vision.image_mean, clip_vision.image_std)


_towers: "weakref.WeakKeyDictionary[object, tuple[torch.dtype, ovi.HFVisionTower]]" = weakref.WeakKeyDictionary()


def _vision_tower(clip_vision) -> ovi.HFVisionTower:
    """The converted copy of ``clip_vision`` (cached, parked on the offload device between runs)."""
    _, dtype = _compute_device_dtype()
    hit = _towers.get(clip_vision)
    if hit is not None and hit[0] == dtype:
        return hit[1]
    _towers.clear()  # one converted copy at a time: a ViT-H is 1.2 GB
    tower = comfy_vision_tower(clip_vision, torch.device(comfy.model_management.text_encoder_offload_device()), dtype)
    _towers[clip_vision] = (dtype, tower)
    return tower


class ComfyClipTextTower:
    """An SD2.x CLIP (clip_h) or SDXL CLIP (clip_g) as an ``inversion.ovi.TextTower``: the projected
    pooled output, which lies in OpenCLIP-H's / bigG's joint image-text space."""

    def __init__(self, clip):
        csm = getattr(clip, "cond_stage_model", None)
        keys = [k for k in ("clip_h", "clip_g", "clip_l")
                if isinstance(getattr(csm, k, None), comfy.sd1_clip.SDClipModel)]
        if not keys:
            raise TypeError(f"clip: OVI needs an SD2.x or SDXL CLIP, got {type(csm).__name__}")
        if keys[0] == "clip_l":
            raise ValueError(
                "clip: this is an SD1 CLIP (clip_l only). SD1 checkpoints carry no text projection and "
                "ComfyUI leaves it uninitialised, so its pooled output is not in any image-embedding space. "
                "Connect an SD2.x CLIP (clip_h, the space of clip_vision_h / SD2.1 unCLIP-H), an SDXL CLIP "
                "(clip_g, the space of ViT-bigG), or choose an open_clip text encoder file instead"
            )
        self.key = keys[0]
        self.clip = clip
        proj = getattr(getattr(csm, self.key).transformer, "text_projection", None)
        self.embed_dim = int(proj.weight.shape[0]) if isinstance(proj, torch.nn.Linear) else -1

    @torch.no_grad()
    def encode_text(self, texts) -> torch.Tensor:
        rows = []
        for text in texts:
            _, pooled = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True)
            rows.append(pooled.float().reshape(1, -1).cpu())
        out = torch.cat(rows, 0)
        self.embed_dim = int(out.shape[1])
        return out


def _progress(total: int):
    bar = comfy.utils.ProgressBar(max(1, total))

    def callback(_event: dict) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update(1)

    return callback


# ---------------------------------------------------------------------------------------- CaptionInit

class CaptionInit(io.ComfyNode):
    """The initial vectors of a concept: one per token of an init text, per text encoder (seeds/001)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InversionCaptionInit",
            display_name="Caption Init (Inversion)",
            category=CATEGORY,
            description=(
                "Initial vectors for textual inversion, one per token of an init text (An Image is Worth One "
                "Sentence): typed by hand (manual), a caption of the concept images from a local captioning "
                "model in models/captioners (caption), or their zero-shot class from an open_clip model in "
                "models/open_clip (class). An optional mask crops the object first. Captions and vectors "
                "follow the init text, which you can edit downstream. The '(download)' entries of captioner "
                "and open_clip_model are fetched from Hugging Face into those folders the first time they "
                "run (with a progress bar); after that they are ordinary installed models."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the checkpoint you will train on: the vectors are "
                              "rows of its token tables (every text encoder: clip_l, clip_h, clip_g)."),
                io.Combo.Input("mode", options=["manual", "caption", "class"], default="manual",
                               tooltip="manual: use the text below. caption: describe the images with a "
                               "captioning model. class: zero-shot classify them with open_clip."),
                io.String.Input("text", default="", multiline=False,
                                tooltip="manual mode: the init text, e.g. 'a red toy car' (one vector per "
                                "token). Ignored in caption/class mode; to edit a caption, paste it here "
                                "and switch to manual."),
                io.Image.Input("images", optional=True,
                               tooltip="The concept images (caption and class modes)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Region of interest: each image is cropped to the mask's bounding box "
                              "(plus a margin) before captioning or classifying. One mask or one per image."),
                io.Combo.Input("captioner", options=_captioner_names(),
                               tooltip="caption mode: a captioning model folder in models/captioners (BLIP, "
                               "BLIP-2, GIT or transformers-native Florence-2; config.json + weights + processor "
                               "files). '... (download)' fetches that model from Hugging Face into "
                               "models/captioners on its first run (" + _sizes(CAPTIONERS) + ")."),
                io.Combo.Input("open_clip_model", options=_open_clip_names(),
                               tooltip="class mode: an open_clip model in models/open_clip: a hub folder with "
                               "open_clip_config.json, or a weights file named after its architecture "
                               "(e.g. ViT-B-32-laion2b_s34b_b79k.safetensors). '... (download)' fetches that "
                               "model from Hugging Face into models/open_clip on its first run ("
                               + _sizes(OPEN_CLIP) + ")."),
                io.String.Input("labels", default="", multiline=True,
                                tooltip="class mode: your labels, one per line (or comma-separated). "
                                "Empty = the 1000 ImageNet class names shipped with the pack."),
                io.Int.Input("choose", default=-1, min=-1, max=4095,
                             tooltip="Several images: -1 takes the consensus caption/label; i takes "
                             "image i's (see the 'captions' output)."),
                io.String.Input("class_word", default="",
                                tooltip="The class word for Directional TI's prior (e.g. 'car'). Empty = "
                                "guessed: the top label (class mode) or the caption's head noun."),
                io.Int.Input("max_new_tokens", default=30, min=1, max=200,
                             tooltip="caption mode: the longest caption generated, in model tokens."),
            ],
            outputs=[
                InitType.Output("init", display_name="init", tooltip="Initial vectors (k per text encoder) with the init text "
                                "and class word; feed it to the trainer."),
                io.String.Output("init_text", display_name="init_text", tooltip="The text the vectors come from."),
                io.String.Output("class_word_out", display_name="class_word",
                                 tooltip="Class word for Directional TI's prior."),
                io.String.Output("captions", display_name="captions", tooltip="Every image's caption or top labels, one per line, "
                                 "numbered for 'choose'."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, mode, captioner=NONE, open_clip_model=NONE, **_):
        if mode == "caption":
            name = _model_name(CAPTIONERS, captioner)
            return _folder_mtime(captioning.find_captioners(_dirs(CAPTIONERS)).get(name))
        if mode == "class":
            name = _model_name(OPEN_CLIP, open_clip_model)
            return _folder_mtime(classify.find_open_clip_models(_dirs(OPEN_CLIP)).get(name))
        return 0.0

    @classmethod
    def execute(cls, clip, mode, text, images=None, mask=None, captioner=NONE, open_clip_model=NONE,
                labels="", choose=-1, class_word="", max_new_tokens=30) -> io.NodeOutput:
        text = (text or "").strip()
        listing = ""
        if mode == "manual":
            if not text:
                raise ValueError("text: manual mode needs an init text, e.g. 'a red toy car'")
            init_text, guessed = text, captioning.class_word_from_caption(text)
        elif mode in ("caption", "class"):
            if images is None:
                raise ValueError(f"images: {mode} mode needs the concept images connected")
            imgs = _images_bchw(images)
            masks = None if mask is None else mask.float().cpu()
            node = None if cls.hidden is None else cls.hidden.unique_id
            if mode == "caption":
                name = _fetch(CAPTIONERS, captioner, node)
                init_text, guessed, listing = cls._caption(imgs, masks, name, choose, max_new_tokens)
            else:
                name = _fetch(OPEN_CLIP, open_clip_model, node)
                init_text, guessed, listing = cls._classify(imgs, masks, name, labels, choose)
        else:
            raise ValueError(f"mode must be manual, caption or class, got {mode!r}")
        word = (class_word or "").strip() or guessed
        with torch.inference_mode(False):  # plain tensors: the trainer makes parameters of them
            vectors = init_vectors.from_text(comfy_text_side(clip), init_text)
        init = LearnedEmbedding("init", vectors, "<init>", {
            "init": mode, "init_text": init_text, "class_word": word,
        })
        return io.NodeOutput(init, init_text, word, listing)

    @staticmethod
    def _caption(imgs, masks, name, choose, max_new_tokens):
        if name == NONE or not name:
            raise ValueError(
                "captioner: no captioning model chosen. Pick '" + download.CAPTIONERS[0].label + "' to fetch "
                "one on the first run, or put a transformers folder (BLIP, BLIP-2, GIT or Florence-2) in one of "
                + ", ".join(_dirs(CAPTIONERS)) + ", e.g. models/captioners/blip-image-captioning-large/ with "
                "config.json, weights and processor files, and pick it"
            )
        model = _load_captioner(name)
        device, _ = _compute_device_dtype()
        model.model.to(device)
        model.device = device
        try:
            settings = captioning.CaptionSettings(max_new_tokens=max_new_tokens)
            res = captioning.caption_images(model, imgs, masks, settings).choose(choose)
        finally:
            _park(model.model)
            model.device = torch.device(comfy.model_management.text_encoder_offload_device())
        listing = "\n".join(f"{i}: {c}" + ("  <-" if i == res.index else "") for i, c in enumerate(res.captions))
        return res.text, captioning.class_word_from_caption(res.text), listing

    @staticmethod
    def _classify(imgs, masks, name, labels, choose):
        if name == NONE or not name:
            raise ValueError(
                "open_clip_model: no open_clip model chosen. Pick '" + download.OPEN_CLIP[0].label + "' to "
                "fetch one on the first run, or put an open_clip hub folder (open_clip_config.json + "
                "open_clip_model.safetensors) or a file such as ViT-B-32-laion2b_s34b_b79k.safetensors in one of "
                + ", ".join(_dirs(OPEN_CLIP)) + " and pick it"
            )
        label_list = classify.parse_labels(labels) if labels.strip() else classify.imagenet_classes()
        model = _load_open_clip(name)
        device, _ = _compute_device_dtype()
        model.model.to(device)
        model.device = device
        try:
            res = classify.classify_images(model, imgs, label_list, masks, features=_label_features(model, label_list))
        finally:
            _park(model.model)
            model.device = torch.device(comfy.model_management.text_encoder_offload_device())
        top = res.choose(choose)
        n = res.image_probs.shape[0]
        lines = [f"{i}: " + ", ".join(f"{lab} ({p:.2f})" for lab, p in res.top(3, i)) for i in range(n)]
        if n > 1:
            lines.append("all: " + ", ".join(f"{lab} ({p:.2f})" for lab, p in res.top(3)))
        return top, top, "\n".join(lines)


# -------------------------------------------------------------------------------------------- OVI

class OVIPrior(io.ComfyNode):
    """A CLIP image embedding optimised toward the prompt (seeds/004), for unCLIP models."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InversionOVIPrior",
            display_name="OVI Prior (Inversion)",
            category=CATEGORY,
            description=(
                "Training-free diffusion prior (Optimization-based Visual Inversion): optimises pseudo-tokens "
                "through the CLIP vision model until its image embedding matches the prompt's text embedding. "
                "Connect the output to unCLIPConditioning with an SD2.1 unCLIP checkpoint to generate from text "
                "with no image and no trained prior. The text side must share the vision model's space: an SD2.x "
                "CLIP for clip_vision_h (never an SD1 CLIP), or an open_clip text encoder from models/open_clip."
            ),
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the unCLIP checkpoint was "
                                    "trained with (clip_vision_h for SD2.1 unCLIP-H), e.g. from CLIPVisionLoader."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="What the image should show; its text embedding is the target."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Text side: an SD2.x CLIP (its clip_h pooled output is projected into "
                              "ViT-H's space) or an SDXL CLIP (clip_g, for ViT-bigG). SD1 CLIPs are refused."),
                io.Combo.Input("text_encoder", options=[FROM_CLIP] + [n for n in _open_clip_names() if n != NONE],
                               default=FROM_CLIP,
                               tooltip="Or take the text embedding from an open_clip model file of the same "
                               "CLIP as the vision model (models/open_clip)."),
                io.Int.Input("num_tokens", default=1, min=1, max=256,
                             tooltip="Pseudo-tokens optimised. More reach a higher similarity to the text "
                             "(paper, Fig. 2) but drift further from real images."),
                io.Int.Input("steps", default=300, min=1, max=10000, tooltip="Adam steps (paper: 500-1000)."),
                io.Float.Input("lr", default=0.05, min=1e-5, max=10.0, step=0.001,
                               tooltip="Adam learning rate on the pseudo-tokens (unit scale)."),
                io.Combo.Input("image_stats", options=_stats_names(), default=NONE,
                               tooltip="Statistics of real image embeddings from BuildImageStats "
                               "(models/ovi_stats); needed when lambda_m or lambda_n > 0."),
                io.Float.Input("lambda_m", default=0.0, min=0.0, max=10.0, step=0.001,
                               tooltip="Mahalanobis pull toward the images' mean (paper: 0.009; >= 0.05 "
                               "collapses every prompt toward a generic image)."),
                io.Float.Input("lambda_n", default=0.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Nearest-neighbour pull toward the closest real embeddings (paper: 0.5)."),
                io.Int.Input("nn_k", default=1, min=1, max=64,
                             tooltip="How many nearest real embeddings the lambda_n term pulls toward."),
                io.Int.Input("token_seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the random pseudo-tokens the optimisation starts from."),
            ],
            outputs=[
                io.ClipVisionOutput.Output("clip_vision_output", display_name="clip_vision_output", tooltip="image_embeds [1, D] for "
                                           "unCLIPConditioning (only image_embeds is set)."),
                io.Image.Output("similarity_chart", display_name="similarity_chart", tooltip="Cosine similarity to the text embedding per step."),
                io.Float.Output("similarity", display_name="similarity", tooltip="Final cosine similarity to the text embedding."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, image_stats=NONE, **_):
        return _mtime(folder_paths.get_full_path(OVI_STATS, image_stats)) if image_stats != NONE else 0.0

    @classmethod
    def execute(cls, clip_vision, prompt, clip=None, text_encoder=FROM_CLIP, num_tokens=1, steps=300, lr=0.05,
                image_stats=NONE, lambda_m=0.0, lambda_n=0.0, nn_k=1, token_seed=0) -> io.NodeOutput:
        if not prompt.strip():
            raise ValueError("prompt: give the text the image should match")
        settings = ovi.OVISettings(num_tokens=num_tokens, steps=steps, lr=lr, lambda_m=lambda_m, lambda_n=lambda_n,
                                   nn_k=nn_k, seed=token_seed)
        target = cls._text_embedding(clip, text_encoder, prompt)
        stats = None
        if image_stats != NONE:
            path = folder_paths.get_full_path(OVI_STATS, image_stats)
            if path is None:
                raise ValueError(f"image_stats: {image_stats!r} not found in {_dirs(OVI_STATS)}")
        elif lambda_m > 0 or lambda_n > 0:
            raise ValueError("image_stats: lambda_m / lambda_n > 0 need image statistics; build them from your "
                             "images with the BuildImageStats node, or set both to 0")
        with torch.inference_mode(False), torch.enable_grad():
            if image_stats != NONE:
                stats = ovi.load_image_stats(path)
            tower = _vision_tower(clip_vision)
            if target.shape[-1] != tower.embed_dim:
                raise ValueError(
                    f"clip/text_encoder: the text embedding is {target.shape[-1]}-d but the vision model embeds "
                    f"in {tower.embed_dim}-d; use the text side of the same CLIP (SD2.x CLIP with clip_vision_h)"
                )
            tower.model.to(_compute_device_dtype()[0])
            try:
                result = ovi.optimize_visual_inversion(tower, target.clone(), settings, stats, _progress(steps))
            finally:
                _park(tower.model)
        out = comfy.clip_vision.Output()
        embeds = result.embeds.reshape(1, -1).to(comfy.model_management.intermediate_device())
        out["image_embeds"] = embeds  # 2-D [1, D]: unclip_adm iterates rows
        out["mm_projected"] = None
        sims = result.similarity[:, 0].tolist()
        chart = charts.similarity_chart(sims).unsqueeze(0)
        return io.NodeOutput(out, chart, float(sims[-1]))

    @staticmethod
    def _text_embedding(clip, text_encoder, prompt: str) -> torch.Tensor:
        """The prompt's projected text embedding [1, D] from the open_clip file or the CLIP input."""
        if text_encoder and text_encoder != FROM_CLIP:
            model = _load_open_clip(text_encoder)
            model.model.to(_compute_device_dtype()[0])
            model.device = _compute_device_dtype()[0]
            try:
                return ovi.OpenClipTextTower(model).encode_text([prompt]).cpu()
            finally:
                _park(model.model)
                model.device = torch.device(comfy.model_management.text_encoder_offload_device())
        if clip is None:
            raise ValueError("clip: connect an SD2.x CLIP (or pick an open_clip text_encoder) for the text embedding")
        return ComfyClipTextTower(clip).encode_text([prompt])


class BuildImageStats(io.ComfyNode):
    """Mean, covariance and embedding bank of the user's images for OVI's constraints."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InversionBuildImageStats",
            display_name="Build Image Stats (Inversion)",
            category=CATEGORY,
            is_output_node=True,
            description=(
                "Encodes your images with a CLIP vision model and saves their mean, covariance (shrunk, so a "
                "few images suffice) and embeddings to models/ovi_stats/<name>.safetensors, for OVIPrior's "
                "Mahalanobis and nearest-neighbour constraints. No dataset download needed."
            ),
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="The same CLIP vision model OVIPrior will use."),
                io.String.Input("name", default="my_images",
                                tooltip="File name in models/ovi_stats (.safetensors is added)."),
                io.Image.Input("images", optional=True, tooltip="Images to describe (an IMAGE batch)."),
                io.String.Input("folder", default="",
                                tooltip="Or a folder of images (absolute, or under ComfyUI's input folder)."),
                io.Float.Input("shrinkage", default=-1.0, min=-1.0, max=1.0, step=0.01,
                               tooltip="Covariance shrinkage toward the identity: -1 = automatic (Ledoit-Wolf), "
                               "0 = sample covariance, 1 = isotropic."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name."),
            ],
            outputs=[io.String.Output("stats_file", display_name="stats_file", tooltip="The file name to pick in OVIPrior's image_stats.")],
        )

    @classmethod
    def execute(cls, clip_vision, name, images=None, folder="", shrinkage=-1.0, overwrite=False) -> io.NodeOutput:
        name = (name or "").strip()
        if not name or any(c in name for c in "/\\") or name.startswith("."):
            raise ValueError(f"name: {name!r} is not a file name; use letters, digits, '_' or '-'")
        batches = []
        if images is not None:
            batches.append(images[..., :3])
        folder = (folder or "").strip()
        if folder:
            root = folder if os.path.isabs(folder) else os.path.join(folder_paths.get_input_directory(), folder)
            # centre crops at the encoder's resolution: what CLIP's own preprocessing would keep
            found = dataset.load_concept_folder(root, size=int(clip_vision.image_size), mode="crop",
                                                alpha_as_mask=False)
            if found.skipped:
                node = None if cls.hidden is None else cls.hidden.unique_id
                warn_user(node, f"skipped {len(found.skipped)} image(s) in {root}: "
                          + "; ".join(f"{n} ({why})" for n, why in found.skipped))
            batches.append(found.images.movedim(1, -1))
        if not batches:
            raise ValueError("images/folder: connect images or give a folder of images (at least 2)")
        total = sum(b.shape[0] for b in batches)
        bar = comfy.utils.ProgressBar(total)
        embeds = []
        for b in batches:
            for i in range(0, b.shape[0], 16):
                comfy.model_management.throw_exception_if_processing_interrupted()
                chunk = b[i:i + 16]
                # ComfyUI's own encoder and preprocessing: the embeddings CLIPVisionEncode would give.
                embeds.append(clip_vision.encode_image(chunk.float(), crop=True)["image_embeds"].float().cpu())
                bar.update(chunk.shape[0])
        with torch.inference_mode(False):
            embeds = torch.cat(embeds, 0).clone()
            stats = ovi.stats_from_embeddings(embeds, None if shrinkage < 0 else shrinkage,
                                              {"images": str(total), "source": folder or "IMAGE input"})
            dest = Path(_dirs(OVI_STATS)[0]) / f"{name}.safetensors"
            ovi.save_image_stats(stats, dest, overwrite=overwrite)
        folder_paths.filename_list_cache.pop(OVI_STATS, None)
        log.info("saved image statistics of %d images (shrinkage %.3f) to %s", total, stats.shrinkage, dest)
        return io.NodeOutput(dest.name, ui={"text": [f"{dest.name}: {total} images, {stats.embed_dim}-d, "
                                                      f"shrinkage {stats.shrinkage:.3f}"]})


NODES = [CaptionInit, OVIPrior, BuildImageStats]
