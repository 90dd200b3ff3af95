"""InversionCaptionInit: the initial vectors of a new concept, one per token of an init text (seeds/001).

The init text is typed by hand (manual), the caption of the concept images by a local captioning
model in ``models/captioners/<model folder>`` (caption), or their zero-shot class label by an
open_clip model in ``models/open_clip`` (class). A MASK crops the region of interest first. This
is the pack's only CaptionInit node; the manual mode needs no extra model. Besides the installed
models, each combo offers a few "<name> (download)" entries, fetched once on their first run
(``nodes/downloads.py``).
"""

from __future__ import annotations

import torch

from comfy_api.latest import io

from ..inversion.vision_language import caption as captioning
from ..inversion.vision_language import classify, download
from ..inversion.methods import init as init_vectors
from ..inversion.embedding import LearnedEmbedding
from .comfy_host import comfy_text_side
from .downloads import NONE, captioner_names, download_sizes, fetch, model_name, open_clip_names
from .folders import CAPTIONERS, OPEN_CLIP, folder_mtime, installed_models, model_dirs
from .model_cache import label_features, load_captioner, load_open_clip, on_compute_device
from .types import InitType
from .vision_adapters import images_bchw

__all__ = ["NODES", "CaptionInit", "caption_text", "class_text"]

CATEGORY = "inversion/vision-language"


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
                io.Combo.Input("captioner", options=captioner_names(),
                               tooltip="caption mode: a captioning model folder in models/captioners (BLIP, "
                               "BLIP-2, GIT or transformers-native Florence-2; config.json + weights + processor "
                               "files). '... (download)' fetches that model from Hugging Face into "
                               "models/captioners on its first run (" + download_sizes(CAPTIONERS) + ")."),
                io.Combo.Input("open_clip_model", options=open_clip_names(),
                               tooltip="class mode: an open_clip model in models/open_clip: a hub folder with "
                               "open_clip_config.json, or a weights file named after its architecture "
                               "(e.g. ViT-B-32-laion2b_s34b_b79k.safetensors). '... (download)' fetches that "
                               "model from Hugging Face into models/open_clip on its first run ("
                               + download_sizes(OPEN_CLIP) + ")."),
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
            return folder_mtime(installed_models(CAPTIONERS).get(model_name(CAPTIONERS, captioner)))
        if mode == "class":
            return folder_mtime(installed_models(OPEN_CLIP).get(model_name(OPEN_CLIP, open_clip_model)))
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
            imgs, masks = images_bchw(images), None if mask is None else mask.float().cpu()
            node = None if cls.hidden is None else cls.hidden.unique_id
            if mode == "caption":
                init_text, guessed, listing = caption_text(imgs, masks, fetch(CAPTIONERS, captioner, node), choose,
                                                           max_new_tokens)
            else:
                init_text, guessed, listing = class_text(imgs, masks, fetch(OPEN_CLIP, open_clip_model, node),
                                                         labels, choose)
        else:
            raise ValueError(f"mode must be manual, caption or class, got {mode!r}")
        word = (class_word or "").strip() or guessed
        with torch.inference_mode(False):  # plain tensors: the trainer makes parameters of them
            vectors = init_vectors.from_text(comfy_text_side(clip), init_text)
        init = LearnedEmbedding("init", vectors, "<init>", {
            "init": mode, "init_text": init_text, "class_word": word,
        })
        return io.NodeOutput(init, init_text, word, listing)


def caption_text(imgs: torch.Tensor, masks: torch.Tensor | None, name: str, choose: int,
                 max_new_tokens: int) -> tuple[str, str, str]:
    """(caption, its head noun, every image's caption numbered) from captioner ``name``."""
    if name == NONE or not name:
        raise ValueError(
            "captioner: no captioning model chosen. Pick '" + download.CAPTIONERS[0].label + "' to fetch "
            "one on the first run, or put a transformers folder (BLIP, BLIP-2, GIT or Florence-2) in one of "
            + ", ".join(model_dirs(CAPTIONERS)) + ", e.g. models/captioners/blip-image-captioning-large/ with "
            "config.json, weights and processor files, and pick it"
        )
    model = load_captioner(name)
    with on_compute_device(model.model, model):
        settings = captioning.CaptionSettings(max_new_tokens=max_new_tokens)
        res = captioning.caption_images(model, imgs, masks, settings).choose(choose)
    listing = "\n".join(f"{i}: {c}" + ("  <-" if i == res.index else "") for i, c in enumerate(res.captions))
    return res.text, captioning.class_word_from_caption(res.text), listing


def class_text(imgs: torch.Tensor, masks: torch.Tensor | None, name: str, labels: str,
               choose: int) -> tuple[str, str, str]:
    """(top label, the same as class word, every image's top 3 labels) from open_clip model ``name``."""
    if name == NONE or not name:
        raise ValueError(
            "open_clip_model: no open_clip model chosen. Pick '" + download.OPEN_CLIP[0].label + "' to "
            "fetch one on the first run, or put an open_clip hub folder (open_clip_config.json + "
            "open_clip_model.safetensors) or a file such as ViT-B-32-laion2b_s34b_b79k.safetensors in one of "
            + ", ".join(model_dirs(OPEN_CLIP)) + " and pick it"
        )
    label_list = classify.parse_labels(labels) if labels.strip() else classify.imagenet_classes()
    model = load_open_clip(name)
    with on_compute_device(model.model, model):
        res = classify.classify_images(model, imgs, label_list, masks, features=label_features(model, label_list))
    top = res.choose(choose)
    n = res.image_probs.shape[0]
    lines = [f"{i}: " + ", ".join(f"{lab} ({p:.2f})" for lab, p in res.top(3, i)) for i in range(n)]
    if n > 1:
        lines.append("all: " + ", ".join(f"{lab} ({p:.2f})" for lab, p in res.top(3)))
    return top, top, "\n".join(lines)


NODES = [CaptionInit]
