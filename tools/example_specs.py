"""The example workflows, as data: nodes (type, widget values by name) and links (by socket name).

``tools/build_examples.py`` turns each into the JSON the ComfyUI editor saves. Every workflow has a
Note that says what it does and what to change first, and every model loader declares the model
file it names (``properties.models``: name, download URL, models sub-folder), which ComfyUI's
missing-models dialog offers to download, as in ComfyUI's own templates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class N:
    """A node: a key for links, its type, widget values by name, and optional column/title."""

    key: str
    type: str
    widgets: dict[str, Any] = field(default_factory=dict)
    title: str | None = None
    col: int | None = None  # layout column; default: depth along the links within its row
    size: tuple[int, int] | None = None
    row: int = 0  # layout band: rows are stacked top to bottom
    models: list[dict[str, str]] | None = None  # properties.models: the files a loader needs, with URLs
    mode: int = 0  # LiteGraph's node mode: 0 always, 2 never (muted: the user unmutes it with Ctrl+M)


@dataclass
class W:
    stem: str
    nodes: list[N]  # the first is the Note that explains the workflow
    links: list[tuple[str, str, str, str]]  # (from key, output name, to key, input name)


def note(*paragraphs: str, size: tuple[int, int] = (440, 320)) -> N:
    return N("note", "Note", {"text": "\n\n".join(paragraphs)}, col=0, size=size)


SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
UNCLIP = "sd21-unclip-h.ckpt"
CONCEPT = "my-concept"

# Where each checkpoint comes from. The frontend's dialog downloads only .safetensors/.sft files (or
# URLs on its own allow-list); for the unCLIP .ckpt, which exists in no other format, it still shows
# the name, folder and URL to fetch by hand.
MODELS = {
    SD15: "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/" + SD15,
    SDXL: "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/" + SDXL,
    UNCLIP: "https://huggingface.co/stabilityai/stable-diffusion-2-1-unclip/resolve/main/" + UNCLIP,
}


def checkpoint(name: str, loader: str = "CheckpointLoaderSimple") -> N:
    """A checkpoint loader that declares its file: ComfyUI offers the download when it is missing."""
    return N("ckpt", loader, {"ckpt_name": name},
             models=[{"name": name, "url": MODELS[name], "directory": "checkpoints"}])


def load_images(size: int = 512) -> N:
    return N("images", "InversionLoadConceptImages", {"folder": CONCEPT, "size": size, "fit": "crop",
                                                       "alpha_as_mask": True})


def train(method: str, steps: int, **widgets: Any) -> N:
    w = {"name": CONCEPT, "method": method, "steps": steps, "batch_size": 1, "learning_rate": 0.0, "seed": 0,
         "control_after_generate": "fixed", "if_exists": "error"}
    w.update(widgets)
    return N("train", "InversionTrainTextualInversion", w)


def options(**widgets: Any) -> N:
    """A Training Options node (its defaults, except ``widgets``) wired into the trainer."""
    return N("options", "InversionTrainingOptions", widgets)


OPTIONS_LINKS = [("options", "options", "train", "options")]


TRAIN_LINKS = [
    ("ckpt", "MODEL", "train", "model"), ("ckpt", "CLIP", "train", "clip"), ("ckpt", "VAE", "train", "vae"),
    ("images", "images", "train", "images"), ("images", "masks", "train", "masks"),
    ("ckpt", "CLIP", "init", "clip"), ("init", "init", "train", "init"),
    ("train", "chart", "chart", "images"),
]


def sample_nodes(prompt: str, size: int = 512, cfg: float = 7.0, steps: int = 25) -> list[N]:
    """Try the concept at once: Apply Learned Embedding -> CLIP Text Encode -> KSampler -> Save."""
    nodes = [
        N("apply", "InversionApplyLearnedEmbedding", {"trigger": CONCEPT, "strength": 1.0}),
        N("pos", "CLIPTextEncode", {"text": prompt}),
        N("neg", "CLIPTextEncode", {"text": "blurry, low quality, watermark, text"}),
        N("latent", "EmptyLatentImage", {"width": size, "height": size, "batch_size": 4}),
        N("sampler", "KSampler", {"seed": 1, "control_after_generate": "fixed", "steps": steps, "cfg": cfg,
                                  "sampler_name": "euler_ancestral", "scheduler": "normal", "denoise": 1.0}),
        N("decode", "VAEDecode"),
        N("save", "SaveImage", {"filename_prefix": f"inversion/{CONCEPT}"}),
    ]
    for n in nodes:
        n.row = 1  # below the training nodes
    return nodes


SAMPLE_LINKS = [
    ("ckpt", "CLIP", "apply", "clip"), ("train", "embedding", "apply", "embedding"),
    ("apply", "clip", "pos", "clip"), ("ckpt", "CLIP", "neg", "clip"),
    ("ckpt", "MODEL", "sampler", "model"), ("pos", "CONDITIONING", "sampler", "positive"),
    ("neg", "CONDITIONING", "sampler", "negative"), ("latent", "LATENT", "sampler", "latent_image"),
    ("sampler", "LATENT", "decode", "samples"), ("ckpt", "VAE", "decode", "vae"), ("decode", "IMAGE", "save", "images"),
]

SETUP = (f"Put 3-6 varied photos of your concept in ComfyUI/input/{CONCEPT}/ (or type an absolute folder in "
         "Load Concept Images), pick your checkpoint, set a name in Train Textual Inversion, then Queue. "
         "The chart on the trainer shows the loss live.")
USE = (f"The embedding is saved to models/embeddings/{CONCEPT}.safetensors: write embedding:{CONCEPT} in any "
       f"prompt, or use the trigger word '{CONCEPT}' through Apply Learned Embedding, as the sampler on the right "
       "does. if_exists = error never overwrites a file; choose 'resume' to continue training it.")


WORKFLOWS: list[W] = [
    W("01_vanilla_textual_inversion", [
        note("VANILLA TEXTUAL INVERSION (Gal et al., An Image is Worth One Word)",
             "Learns one new word for your concept: the vectors start from the init text in Caption Init "
             "(one vector per token), timesteps are drawn uniformly from [0, 1000) and AdamW updates the "
             "vectors. The reference method: comparable with A1111 and diffusers; the other examples converge "
             "faster.", SETUP, USE),
        checkpoint(SD15),
        load_images(512),
        N("init", "InversionCaptionInit", {"mode": "manual", "text": "a toy"}),
        train("vanilla", 3000),
        N("chart", "PreviewImage"),
        *sample_nodes(f"a photo of {CONCEPT} on a wooden table, sunlight"),
    ], TRAIN_LINKS + SAMPLE_LINKS),

    W("02_profile_then_high_grad", [
        note("PROFILE, THEN TRAIN ON THE HIGH-GRAD WINDOW (Wang & Kalogeiton, Conditional Gradient-based TI)",
             "Gradient Norm Profiler measures g(t), how strongly the prompt steers the model at each timestep, "
             "on your images (about bins x samples_per_bin / batch_size training steps). Its chart shows g(t) "
             "with its spread and the best window. Train Textual Inversion with method = high_grad then samples "
             "only that window (width 'window', 100 in the paper), which converges in far fewer steps than "
             "uniform sampling.",
             "interval_start / interval_end on the profiler are the suggested window; the profile output also "
             "seeds the adaptive methods.", SETUP, USE),
        checkpoint(SD15),
        load_images(512),
        N("init", "InversionCaptionInit", {"mode": "manual", "text": "a toy"}),
        N("profiler", "InversionGradNormProfiler", {"bins": 20, "samples_per_bin": 4, "batch_size": 4, "window": 100,
                                                    "seed": 0, "control_after_generate": "fixed"}),
        N("profile_chart", "PreviewImage"),
        train("high_grad", 1000),
        N("chart", "PreviewImage"),
    ], TRAIN_LINKS + [
        ("ckpt", "MODEL", "profiler", "model"), ("ckpt", "CLIP", "profiler", "clip"),
        ("ckpt", "VAE", "profiler", "vae"), ("images", "images", "profiler", "images"),
        ("images", "masks", "profiler", "masks"), ("init", "init", "profiler", "init"),
        ("profiler", "profile", "train", "profile"), ("profiler", "chart", "profile_chart", "images"),
    ]),

    W("03_adaptive_timesteps", [
        note("ADAPTIVE TIMESTEP SAMPLING (Wang & Kalogeiton, Eq. 5)",
             "The default method: timesteps are drawn with probability proportional to g(t), which the trainer "
             "estimates from the gradients it computes anyway (no profiling run, no extra passes). A share of "
             "uniform draws ('explore') keeps every bin measured. The chart on the trainer shows the running g(t) "
             "estimate per bin next to the loss and the sampled timesteps.",
             "Training Options holds what a run may change beyond the basics: adaptive_bins sets the "
             "resolution of the estimate (20 bins of 50 timesteps); there too are the learning-rate schedule "
             "and warm-up, gradient accumulation, flip, templates and per-image caption handling, checkpoint "
             "cadence, precision (auto: fp16 models train with dynamic loss scaling) and UNet gradient "
             "checkpointing for small cards.", SETUP, USE, size=(460, 400)),
        checkpoint(SD15),
        load_images(512),
        N("init", "InversionCaptionInit", {"mode": "manual", "text": "a toy"}),
        options(adaptive_bins=20, checkpoint_every=100),
        train("adaptive", 1000),
        N("chart", "PreviewImage"),
        *sample_nodes(f"a photo of {CONCEPT} in a snowy forest"),
    ], TRAIN_LINKS + OPTIONS_LINKS + SAMPLE_LINKS),

    W("04_directional_ti_class_prior", [
        note("DIRECTIONAL TEXTUAL INVERSION with a class-word prior (DTI, ICLR 2026)",
             "The learned vectors keep the norm of real words (m*, the vocabulary's mean norm) and only their "
             "direction is trained, with Riemannian SGD on the sphere; a von Mises-Fisher prior (kappa) pulls "
             "the direction toward the class word. Embeddings stay in-distribution, so prompts such as 'a "
             "watercolor of <concept> in the snow' keep their style and context.",
             "Set class_word (on Training Options) to what the concept is ('toy', 'dog', 'mug'); empty takes "
             "Caption Init's class "
             "word. The chart shows the vector norm sitting on m* (dashed). learning_rate 0 = 0.01 rad per step.",
             SETUP, USE),
        checkpoint(SD15),
        load_images(512),
        N("init", "InversionCaptionInit", {"mode": "manual", "text": "a plush toy", "class_word": "toy"}),
        options(class_word="toy", kappa=1e-4),
        train("directional", 1000),
        N("chart", "PreviewImage"),
        *sample_nodes(f"a watercolor painting of {CONCEPT} in the snow"),
    ], TRAIN_LINKS + OPTIONS_LINKS + SAMPLE_LINKS),

    W("05_caption_initialisation", [
        note("CAPTION INITIALISATION (Qiu et al., An Image is Worth One Sentence)",
             "Instead of one hand-picked word, the embedding starts as a whole sentence: Caption Init describes "
             "your images with a local captioning model and makes one vector per token of the caption, so "
             "training starts close to the concept and needs fewer steps.",
             "'captioner' is set to blip-image-captioning-large (download): the first run fetches it from "
             "Hugging Face (about 1.9 GB) into models/captioners/ with a progress bar, later runs use it "
             "from disk. Or put any transformers captioning folder (BLIP, BLIP-2, GIT or Florence-2) in "
             "models/captioners/ and pick it. mode = class uses an open_clip model in models/open_clip "
             "instead (ViT-B-32-laion2b_s34b_b79k (download) fetches one) and takes the top ImageNet label "
             "(or your own labels). The captions preview lists every image's caption; 'choose' picks one "
             "(-1 = consensus).", SETUP, USE, size=(460, 420)),
        checkpoint(SD15),
        load_images(512),
        N("init", "InversionCaptionInit", {"mode": "caption", "text": "", "choose": -1, "max_new_tokens": 30,
                                           "captioner": "blip-image-captioning-large (download)"}),
        N("captions", "PreviewAny"),
        train("adaptive", 600),
        N("chart", "PreviewImage"),
    ], TRAIN_LINKS + [("images", "images", "init", "images"), ("init", "captions", "captions", "source")]),

    W("06_use_learned_embedding", [
        note("USE A LEARNED EMBEDDING in a normal text-to-image graph",
             f"Simplest: write embedding:{CONCEPT} in any CLIP Text Encode (a space or the start of the prompt "
             "before 'embedding:'), with the model family it was trained on. ComfyUI, A1111/Forge and "
             "InvokeAI read the same file.",
             "This graph does it the other way: Load Embedding reads the file and Apply Learned Embedding gives a "
             f"CLIP that understands the bare trigger word '{CONCEPT}'. ComfyUI then re-runs the prompt whenever "
             "the embedding changes (an overwritten file alone is not noticed by its cache), and 'strength' "
             "weights the concept.", size=(440, 300)),
        checkpoint(SD15),
        N("load", "InversionLoadEmbedding", {"file": f"{CONCEPT}.safetensors"}),
        N("apply", "InversionApplyLearnedEmbedding", {"trigger": CONCEPT, "strength": 1.0}),
        N("pos", "CLIPTextEncode", {"text": f"a photo of {CONCEPT} on a beach at sunset, detailed"}),
        N("neg", "CLIPTextEncode", {"text": "blurry, low quality, watermark, text"}),
        N("latent", "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 4}),
        N("sampler", "KSampler", {"seed": 1, "control_after_generate": "randomize", "steps": 25, "cfg": 7.0,
                                  "sampler_name": "euler_ancestral", "scheduler": "normal", "denoise": 1.0}),
        N("decode", "VAEDecode"),
        N("save", "SaveImage", {"filename_prefix": f"inversion/{CONCEPT}"}),
    ], [
        ("ckpt", "CLIP", "apply", "clip"), ("load", "embedding", "apply", "embedding"),
        ("apply", "clip", "pos", "clip"), ("ckpt", "CLIP", "neg", "clip"), ("ckpt", "MODEL", "sampler", "model"),
        ("pos", "CONDITIONING", "sampler", "positive"), ("neg", "CONDITIONING", "sampler", "negative"),
        ("latent", "LATENT", "sampler", "latent_image"), ("sampler", "LATENT", "decode", "samples"),
        ("ckpt", "VAE", "decode", "vae"), ("decode", "IMAGE", "save", "images"),
    ]),

    W("07_slerp_between_concepts", [
        note("SLERP BETWEEN TWO CONCEPTS (Directional TI)",
             "Embedding Slerp blends two learned concepts of the same model and vector count along the great "
             "circle between their directions (norms are interpolated linearly): alpha 0 = concept a, 1 = "
             "concept b. Directional TI embeddings interpolate most smoothly.",
             "Train two concepts first (e.g. 04_directional_ti_class_prior twice, named concept-a and concept-b), "
             "then pick their files here. Save Embedding writes a blend you like to models/embeddings.",
             size=(440, 300)),
        checkpoint(SD15),
        N("a", "InversionLoadEmbedding", {"file": "concept-a.safetensors"}),
        N("b", "InversionLoadEmbedding", {"file": "concept-b.safetensors"}),
        N("slerp", "InversionEmbeddingSlerp", {"alpha": 0.5, "name": "a-b-blend"}),
        N("apply", "InversionApplyLearnedEmbedding", {"trigger": "a-b-blend", "strength": 1.0}),
        N("pos", "CLIPTextEncode", {"text": "a photo of a-b-blend on a table"}),
        N("neg", "CLIPTextEncode", {"text": "blurry, low quality, watermark, text"}),
        N("latent", "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 4}),
        N("sampler", "KSampler", {"seed": 1, "control_after_generate": "fixed", "steps": 25, "cfg": 7.0,
                                  "sampler_name": "euler_ancestral", "scheduler": "normal", "denoise": 1.0}),
        N("decode", "VAEDecode"),
        N("save", "SaveImage", {"filename_prefix": "inversion/a-b-blend"}),
    ], [
        ("a", "embedding", "slerp", "a"), ("b", "embedding", "slerp", "b"),
        ("ckpt", "CLIP", "apply", "clip"), ("slerp", "embedding", "apply", "embedding"),
        ("apply", "clip", "pos", "clip"), ("ckpt", "CLIP", "neg", "clip"), ("ckpt", "MODEL", "sampler", "model"),
        ("pos", "CONDITIONING", "sampler", "positive"), ("neg", "CONDITIONING", "sampler", "negative"),
        ("latent", "LATENT", "sampler", "latent_image"), ("sampler", "LATENT", "decode", "samples"),
        ("ckpt", "VAE", "decode", "vae"), ("decode", "IMAGE", "save", "images"),
    ]),

    W("08_ovi_prior_sd21_unclip", [
        note("OVI: TEXT-TO-IMAGE WITH AN unCLIP MODEL, NO IMAGE AND NO PRIOR (Dell'Erba & Bagdanov)",
             "unCLIP checkpoints are conditioned on a CLIP image embedding. OVI Prior finds one for your prompt "
             "by optimising pseudo-tokens through the CLIP vision model until its image embedding matches the "
             "prompt's text embedding (cosine similarity, charted per step); unCLIPConditioning then feeds it to "
             "the model with the same prompt. The negative prompt gets its own image embedding through a second "
             "unCLIPConditioning: a blank image's, as in the paper (its Fig. 1: without one, guidance runs against "
             "a zero embedding and casts violet), or OVI of negative_prompt (negative on OVI Prior).",
             f"Needs the SD2.1 unCLIP-H checkpoint ({UNCLIP}) in models/checkpoints, from "
             f"{MODELS[UNCLIP]} (the missing-models dialog shows this link): its CLIP (ViT-H text side) "
             "and CLIP vision model share one space. Optional constraints: build statistics of your own images "
             "with Build Image Stats (a folder of any size is streamed), pick them in image_stats, and set "
             "lambda_m (Mahalanobis) or lambda_n (nearest neighbour). The paper's 0.009 / 0.5 are for a large "
             "image set; with a few images of one subject start lambda_m far lower. lambda_m >= 0.05 collapses "
             "to a generic image.",
             size=(460, 440)),
        checkpoint(UNCLIP, "unCLIPCheckpointLoader"),
        N("ovi", "InversionOVIPrior", {"prompt": "a red fox sitting in fresh snow, golden hour", "num_tokens": 1,
                                       "steps": 300, "lr": 0.05, "lambda_m": 0.0, "lambda_n": 0.0}),
        N("sim_chart", "PreviewImage"),
        N("pos", "CLIPTextEncode", {"text": "a red fox sitting in fresh snow, golden hour"}),
        N("neg", "CLIPTextEncode", {"text": "blurry, low quality"}),
        N("unclip", "unCLIPConditioning", {"strength": 1.0, "noise_augmentation": 0.0}),
        N("unclip_neg", "unCLIPConditioning", {"strength": 1.0, "noise_augmentation": 0.0}),
        N("latent", "EmptyLatentImage", {"width": 768, "height": 768, "batch_size": 2}),
        N("sampler", "KSampler", {"seed": 1, "control_after_generate": "fixed", "steps": 30, "cfg": 7.0,
                                  "sampler_name": "euler_ancestral", "scheduler": "normal", "denoise": 1.0}),
        N("decode", "VAEDecode"),
        N("save", "SaveImage", {"filename_prefix": "inversion/ovi"}),
    ], [
        ("ckpt", "CLIP_VISION", "ovi", "clip_vision"), ("ckpt", "CLIP", "ovi", "clip"),
        ("ovi", "similarity_chart", "sim_chart", "images"),
        ("ckpt", "CLIP", "pos", "clip"), ("ckpt", "CLIP", "neg", "clip"),
        ("pos", "CONDITIONING", "unclip", "conditioning"), ("ovi", "clip_vision_output", "unclip", "clip_vision_output"),
        ("neg", "CONDITIONING", "unclip_neg", "conditioning"),
        ("ovi", "negative_clip_vision_output", "unclip_neg", "clip_vision_output"),
        ("ckpt", "MODEL", "sampler", "model"), ("unclip", "CONDITIONING", "sampler", "positive"),
        ("unclip_neg", "CONDITIONING", "sampler", "negative"), ("latent", "LATENT", "sampler", "latent_image"),
        ("sampler", "LATENT", "decode", "samples"), ("ckpt", "VAE", "decode", "vae"), ("decode", "IMAGE", "save", "images"),
    ]),

    W("09_sdxl_training", [
        note("SDXL TEXTUAL INVERSION",
             "Same graph as SD1.5 with an SDXL checkpoint: the embedding gets vectors for both text encoders "
             "(clip_l 768-d and clip_g 1280-d) and the file carries both, as ComfyUI, A1111/Forge and diffusers "
             "expect for SDXL.",
             "Memory: training back-propagates through the UNet at the image size; if 1024 px does not fit, "
             "set 768 in Load Concept Images (about half the activations, faster); the embedding still works "
             "at 1024 afterwards. An SDXL embedding only works with SDXL checkpoints.", SETUP, USE),
        checkpoint(SDXL),
        load_images(1024),
        N("init", "InversionCaptionInit", {"mode": "manual", "text": "a toy"}),
        train("adaptive", 800),
        N("chart", "PreviewImage"),
        *sample_nodes(f"a photo of {CONCEPT} on a wooden table, sunlight, detailed", size=1024, cfg=6.0, steps=30),
    ], TRAIN_LINKS + SAMPLE_LINKS),
    W("10_previews_score_best_step", [
        note("PREVIEWS WHILE TRAINING, THE SCORE AND THE BEST STEP",
             "Preview Options makes the trainer draw its prompts every 100 steps (and after the last) with "
             "ComfyUI's own sampler on the model being trained, with the vectors learned so far: each row appears "
             "on the trainer while it runs, and the previews output collects them (a row per preview step, a "
             "column per prompt; one seed, so rows differ only by training). Write {} or [name] where the concept "
             "goes: the first prompt shows the concept, the second whether it still combines with other words. "
             "Each preview costs one KSampler run per prompt; fewer steps or a smaller size make it cheaper.",
             "Training Options' score_every = 10 scores the vectors on fixed draws (a smooth curve on the chart, "
             "about one training step per score) and keeps each scored step's embedding; keep = best writes the "
             "lowest-scoring step, which the chart marks as the best step, to the file the sampler below uses.",
             SETUP, size=(460, 420)),
        checkpoint(SD15),
        load_images(512),
        N("init", "InversionCaptionInit", {"mode": "manual", "text": "a toy"}),
        options(score_every=10, keep="best"),
        N("previews", "InversionPreviewOptions", {"every": 100, "prompts": "a photo of {}\na painting of {} on the beach",
                                                  "seed": 0, "control_after_generate": "fixed", "steps": 20,
                                                  "cfg": 7.0, "width": 512, "height": 512}),
        train("adaptive", 1000),
        N("chart", "PreviewImage"),
        N("grid", "PreviewImage", title="Previews (a row per preview step)"),
        *sample_nodes(f"a photo of {CONCEPT} on a wooden table, sunlight"),
    ], TRAIN_LINKS + OPTIONS_LINKS + SAMPLE_LINKS + [
        ("previews", "previews", "train", "previews"), ("train", "previews", "grid", "images"),
    ]),
    W("11_several_concepts", [
        note("SEVERAL CONCEPTS IN ONE RUN",
             "Add Concept brings a second concept (its own images, init and name) into the trainer's concepts "
             "input; chain more Add Concept nodes (concepts into concepts) for more. One run trains them all: the "
             "model is prepared once and every step's UNet batch holds batch_size images of each concept, so each "
             "concept gets the steps and the batch it would get alone. Each concept gets its own file "
             "(models/embeddings/<name>.safetensors; the trainer's paths output lists them) and its own loss and "
             "norm curve on the chart.",
             f"Put the photos of the first concept in ComfyUI/input/{CONCEPT}/ and of the second in "
             "ComfyUI/input/my-second-concept/, pick your checkpoint, then Queue. With several concepts Training "
             "Options' contrastive_weight is Arar et al.'s Eq. 2 across them: each concept's vectors are pushed "
             "away from the others' and toward their nearest real words.",
             size=(460, 380)),
        checkpoint(SD15),
        load_images(512),
        N("images2", "InversionLoadConceptImages", {"folder": "my-second-concept", "size": 512, "fit": "crop",
                                                     "alpha_as_mask": True}, row=1),
        N("init", "InversionCaptionInit", {"mode": "manual", "text": "a toy"}),
        N("init2", "InversionCaptionInit", {"mode": "manual", "text": "a mug"}, row=1),
        N("add", "InversionAddConcept", {"name": "my-second-concept"}, row=1),
        options(contrastive_weight=0.001),
        train("adaptive", 800),
        N("chart", "PreviewImage"),
        N("paths", "PreviewAny", title="Files written"),
    ], TRAIN_LINKS + OPTIONS_LINKS + [
        ("ckpt", "CLIP", "init2", "clip"), ("init2", "init", "add", "init"),
        ("images2", "images", "add", "images"), ("images2", "masks", "add", "masks"),
        ("add", "concepts", "train", "concepts"), ("train", "paths", "paths", "source"),
    ]),
    W("12_pivotal_tuning_lora", [
        note("PIVOTAL TUNING: AN EMBEDDING AND A LORA TRAINED TOGETHER",
             "LoRA Options on the trainer's lora input trains a LoRA on the UNet's attention together with the "
             "embedding (rank, alpha and its own learning rate on the node). The trainer writes "
             f"models/embeddings/{CONCEPT}.safetensors and models/loras/{CONCEPT}.safetensors (kohya keys: ComfyUI's "
             "LoraLoader and A1111/Forge load it) and outputs the model with the LoRA, which the middle row samples "
             "with at once.",
             "Save LoRA + Embedding writes the pair as A1111's bundle (one LoRA file with the embedding inside, "
             f"models/loras/{CONCEPT}_bundle.safetensors), or as two files. The bottom row is muted: after the "
             "first run, select it and press Ctrl+M; Load LoRA + Embedding applies the saved file's LoRA with "
             "ComfyUI's loader and its embedding as the trigger word, as in any later session.", SETUP,
             size=(460, 420)),
        checkpoint(SD15),
        load_images(512),
        N("init", "InversionCaptionInit", {"mode": "manual", "text": "a toy"}),
        N("lora", "InversionLoraOptions", {"rank": 4, "alpha": 4.0, "learning_rate": 1e-4, "start": 0.0,
                                           "blocks": "all", "layers": "attention"}),
        train("adaptive", 500),
        N("chart", "PreviewImage"),
        N("save_pair", "InversionSaveLoraEmbedding", {"name": "", "layout": "A1111 bundle (one LoRA file)",
                                                      "overwrite": False}),
        *sample_nodes(f"a photo of {CONCEPT} on a wooden table, sunlight"),
        *[N(k, t, w, row=2, mode=2) for k, t, w in (
            ("load_pair", "InversionLoadLoraEmbedding", {"lora_name": f"{CONCEPT}_bundle.safetensors",
                                                         "strength_model": 1.0, "strength_clip": 1.0,
                                                         "embedding": "auto", "embedding_strength": 1.0}),
            ("pos2", "CLIPTextEncode", {"text": f"a painting of {CONCEPT} in a garden"}),
            ("neg2", "CLIPTextEncode", {"text": "blurry, low quality, watermark, text"}),
            ("latent2", "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 4}),
            ("sampler2", "KSampler", {"seed": 2, "control_after_generate": "fixed", "steps": 25, "cfg": 7.0,
                                      "sampler_name": "euler_ancestral", "scheduler": "normal", "denoise": 1.0}),
            ("decode2", "VAEDecode", {}),
            ("save2", "SaveImage", {"filename_prefix": f"inversion/{CONCEPT}-from-files"}),
        )],
    ], [link for link in TRAIN_LINKS + SAMPLE_LINKS if link != ("ckpt", "MODEL", "sampler", "model")] + [
        ("lora", "lora", "train", "lora"), ("train", "MODEL", "sampler", "model"),
        ("train", "lora_path", "save_pair", "lora_path"), ("train", "embedding", "save_pair", "embedding"),
        ("ckpt", "MODEL", "load_pair", "model"), ("ckpt", "CLIP", "load_pair", "clip"),
        ("load_pair", "clip", "pos2", "clip"), ("ckpt", "CLIP", "neg2", "clip"),
        ("load_pair", "model", "sampler2", "model"), ("pos2", "CONDITIONING", "sampler2", "positive"),
        ("neg2", "CONDITIONING", "sampler2", "negative"), ("latent2", "LATENT", "sampler2", "latent_image"),
        ("sampler2", "LATENT", "decode2", "samples"), ("ckpt", "VAE", "decode2", "vae"),
        ("decode2", "IMAGE", "save2", "images"),
    ]),
]
