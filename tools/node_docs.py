"""Hand-written parts of the node help pages (``web/docs/<NodeId>.md``).

``tools/build_examples.py --docs`` writes each page: the title and description from the node's
schema, the prose below, then tables of its inputs and outputs (name, type, default, tooltip)
generated from the live schema, so the help never lists an input the node does not have.
"""

from __future__ import annotations

PAPERS = {
    "000": "Wang & Kalogeiton, *Conditional Gradient-based Textual Inversion* (ECCV-W 2024)",
    "001": "Qiu, Guo & Wei, *An Image is Worth One Sentence: Fast Textual Inversion with Supreme Initialization*",
    "002": "*Directional Textual Inversion* (ICLR 2026, arXiv 2512.13672)",
    "003": "Arar et al., *Domain-Agnostic Tuning-Encoder for Fast Personalization*",
    "004": "Dell'Erba & Bagdanov, *Training-Free Diffusion Priors via Optimization-based Visual Inversion*",
    "gal": "Gal et al., *An Image is Worth One Word* (ICLR 2023)",
}

DOCS: dict[str, dict[str, str]] = {
    "InversionLoadConceptImages": {
        "body": """\
## How to use

Put 3-6 pictures of the concept in a folder inside ComfyUI's `input` directory (for example
`input/my-concept/`) and type the folder name, or an absolute path. Vary the background, the
angle and the lighting: whatever all pictures share becomes part of the learned word.

- **size** is the training resolution: 512 for SD1.x, 768 for SD2.x-768, 1024 (or 768 to save
  memory) for SDXL. The same value also sets the cost of every training step.
- **fit = pad** keeps the whole picture; the white borders are masked out of the loss.
- Pictures with transparency (PNG) give a mask for free: only the object is learned
  (**alpha_as_mask**).
- Connect **images** (and **masks**) instead of a folder to use Load Image nodes or any IMAGE batch.

Wire **images** and **masks** into Train Textual Inversion and Gradient Norm Profiler.
""",
    },
    "InversionCaptionInit": {
        "body": """\
## Why initialisation matters

Textual inversion starts from existing token vectors and moves them toward the concept. Starting
from a good description means fewer steps: with one vector per token of a caption (Qiu et al.)
the embedding already says "a red plush toy dinosaur" before training begins.

## Modes

- **manual**: type the init text ("a toy", "a ceramic mug"); one vector per token.
- **caption**: a local captioning model describes the connected images. Put a transformers
  folder (BLIP, BLIP-2, GIT or Florence-2) in `models/captioners/`, e.g.
  `models/captioners/blip-image-captioning-large/`, or pick
  **blip-image-captioning-large (download)**.
- **class**: an open_clip model from `models/open_clip/` classifies the images zero-shot over the
  ImageNet classes shipped with the pack, or over your **labels**; the top label is the init text.
  **ViT-B-32-laion2b_s34b_b79k (download)** fetches one.

## Downloads

Nothing is downloaded unless you pick a **(download)** entry and run the node. Then, once, the
model's files come from Hugging Face (`https://huggingface.co/<repo>/resolve/main/...`; the
`HF_ENDPOINT` environment variable names a mirror) into `models/captioners/<name>/` or
`models/open_clip/<name>/`: a toast and the server log say what, how big and where to, and the
node's progress bar counts the bytes. The files land in `<name>.partial/` first and the folder
takes its name when complete, so a cancelled or failed download leaves no half model. Later runs
find the folder on disk and never touch the network. With `HF_HUB_OFFLINE=1`, or without a
connection, the node stops with an error that lists the files to fetch by hand:

| entry | Hugging Face repository | files | into |
|---|---|---|---|
| blip-image-captioning-large | `Salesforce/blip-image-captioning-large` (~1.9 GB) | `config.json`, `model.safetensors`, `preprocessor_config.json`, `tokenizer_config.json`, `tokenizer.json`, `vocab.txt`, `special_tokens_map.json` | `models/captioners/blip-image-captioning-large/` |
| ViT-B-32-laion2b_s34b_b79k | `laion/CLIP-ViT-B-32-laion2B-s34B-b79K` (~0.6 GB) | `open_clip_config.json`, `open_clip_model.safetensors` | `models/open_clip/ViT-B-32-laion2b_s34b_b79k/` |

A **mask** crops each image to the object first (the paper's "click on the object"). With several
images, **choose** = -1 takes the consensus; the **captions** output lists each image's result
with its number. **class_word** is passed to Directional TI as its prior direction.

Longer init texts mean more vectors (k): more capacity, slightly slower steps, and a concept that
takes k positions in every prompt.
""",
        "paper": "001",
    },
    "InversionGradNormProfiler": {
        "body": """\
## What it measures

For each timestep bin it draws images, prompts, noise and t, and measures
g(t) = E || grad_c || eps_hat(x_t, t, c) - eps || ||: how much the text conditioning can change the model's
prediction at that noise level. Timesteps with large g(t) are where a learned word has an
effect; training there converges faster (the paper's high-grad interval).

When it finishes, the chart on the node (and the **chart** image) shows the mean g(t) per bin
with a +-1 std band; the highlighted window is the best interval of width **window**, also given
as **interval_start** / **interval_end**.

## Using the profile

- Train Textual Inversion with **method = high_grad** (or high_grad_directional) needs it: it
  trains only inside the window.
- The adaptive methods use it as their starting estimate (optional).

Cost: about bins x samples_per_bin / batch_size training steps (80 steps' worth by default).
The profile depends on the model and, less, on the images; re-profile when you change the
checkpoint.
""",
        "paper": "000",
    },
    "InversionTrainTextualInversion": {
        "body": """\
## What it does

Learns the vectors of a new word for the concept in **images** (or **dataset**: Load Concept
Images' output with per-image captions and aspect-ratio buckets), starting from **init**, and
saves `models/embeddings/<name>.safetensors` (SD1.x / SD2.x: one tensor; SDXL: `clip_l` and
`clip_g`). Use it as `embedding:<name>` in any prompt, or wire the **embedding** output into
Apply Learned Embedding to try it at once. The chart on the node is drawn live: the loss and its
moving average, the timesteps sampled so far, the adaptive sampler's g(t) estimate and the
vector norm (with DTI's fixed norm m*). It comes back after a page reload.

## Choosing a method

| method | use it when |
|---|---|
| `adaptive` (default) | t ~ g(t), measured while training (seeds/000 Eq. 5). On the miniature world (10 seeds, two tasks) never behind vanilla: at AdamW 2e-3 ahead over the run on both tasks (+0.08, 95 % CI +0.03 to +0.14; +0.04, CI +0.03 to +0.06), at this node's defaults leaning ahead on one (+0.05, CI -0.05 to +0.14) and level on the other; by the end of a run both are level |
| `high_grad` | you ran Gradient Norm Profiler: trains on its best window (ahead of vanilla per step on one task of the miniature world, +0.13, level on the other; slower than adaptive once the profiler's run is counted) |
| `interval` | a fixed window (interval_start/end; the paper's [350, 450]): far behind vanilla on one task of the miniature world (-0.24), level on the other (+0.01) |
| `directional` | prompts must stay faithful (styles, scenes): fixed norm, Riemannian SGD, vMF prior toward each vector's initial token (**class_word** for the class word's vector) |
| `adaptive_directional`, `high_grad_directional` | both at once |
| `vanilla` | results comparable with A1111 / diffusers |
| `single_step` | one timestep (t = 400 by default; kept for comparison with the paper, not re-measured on the second task) |
| `directional_adamw` | DTI's ablation |

The node holds what every run needs; everything else is on the optional **Training Options**
node wired into **options**: the parameters that only some methods read (interval_start/end,
single_t, window, adaptive_bins, kappa, class_word), the learning-rate schedule and warm-up,
gradient accumulation and clipping, the regularisers, flip, templates, caption handling,
checkpoint cadence, precision and UNet gradient checkpointing. **learning_rate** 0 picks the
method's own default.

## Steps and time

Typical: 500-3000 steps. **batch_size** > 1
averages more images per step (smoother, proportionally slower). Training Options'
**checkpoint_every** saves the
embedding, and the run's state in `models/inversion_runs/<name>/`, so an interrupted run can
continue with **if_exists = resume**. Cancel stops after the current step and keeps the last good
vectors. An existing file is replaced only by a run that completes: with **if_exists = overwrite**
a cancelled run leaves it as it was and keeps its own vectors in `models/inversion_runs/<name>/`
(resume continues that run). Vectors that grow far beyond the vocabulary's norms raise a warning
(8x the largest word's) and, when they explode (50x), stop the run with the last sane vectors.

## Regularisers

Training Options' **l2_weight** penalises large vectors; **l2_init_weight** pulls each vector back
toward its initial vector; **contrastive_weight** keeps each vector near real words. With one
concept it is a one-concept adaptation of the nearest-neighbour contrastive loss: its nearest
tokens against the rest of the vocabulary. With several concepts (**concepts** connected) it is
Arar et al.'s Eq. 2 itself: the nearest tokens against the other concepts' vectors. All help a
concept combine with other words in prompts.

## Several concepts in one run

Chain **Add Concept** nodes (each with its own images, init and name) into **concepts**: the run
trains this node's concept and each added one together. The model is prepared once and every
step's UNet batch holds **batch_size** images of each concept (sample j of a batch is concept
j mod N, so with 3 concepts and batch_size 1 the UNet sees 3 images per step): each concept gets
the steps and the batch it would get alone. Each concept gets its own file,
`models/embeddings/<name>.safetensors` (**paths** lists them, this node's first), with the
**if_exists** rules applied to each: a cancelled run replaces none of them. The run's state is
kept in `models/inversion_runs/<this node's name>/` (each concept's snapshots in its own folder);
resume it with the same concepts in the same order. The chart draws a loss curve (smoothed) and a
vector-norm curve per concept. Previews show this node's own concept. Two concepts of one name
are refused. When the concepts' images differ in size (aspect buckets), a batch cannot mix them:
then its images are drawn from all concepts' images together instead of evenly per concept.

## Previews

Wire a **Preview Options** node into **previews** to see the concept while it trains: every N
steps the trainer samples its prompts on this model with the vectors so far, shows the row on the
node, and returns all rows as the **previews** image (a row per preview step, a column per prompt).
Without it, nothing is sampled and **previews** is a small black image.

## If the concept does not show

Use a prompt like "a photo of embedding:<name>" with the same model family; train longer or with
a more specific init text; check the loss chart went down; vary the training images more if
the background leaks in.
""",
        "paper": "000 002 003 gal",
    },
    "InversionAddConcept": {
        "body": """\
## What it does

Adds one concept to a Train Textual Inversion run: its **name** (the file
`models/embeddings/<name>.safetensors` and the word after `embedding:`), its initial vectors
(**init**, from Caption Init) and its pictures (**images** and **masks**, or **dataset**, from Load
Concept Images). Chain several: each node's **concepts** output into the next one's **concepts**
input, the last into the trainer's **concepts**. Nothing is computed here; the trainer encodes the
images and trains every concept in one run (see its help: one model load, each step's UNet batch
holds batch_size images of each concept, one file per concept).

## Why train several together

One run instead of N: the model is prepared once and the concepts share each UNet batch, which is
faster than N separate runs (the README gives the measured ratio). With **contrastive_weight** on
Training Options the concepts are each other's negatives (Arar et al.'s Eq. 2), which keeps similar
concepts apart. Every concept needs a name of its own; a name used twice is refused.
""",
        "paper": "003",
    },
    "InversionLoraOptions": {
        "body": """\
## Pivotal tuning: the embedding and a LoRA together

An embedding carries a concept only as far as the text encoder can say it; a LoRA on the UNet lets
the model draw it more closely. Wire this node into Train Textual Inversion's **lora** input and the
run trains both: the vectors as always, and a LoRA on the UNet's attention projections (ComfyUI's
own LoRA adapters, as core's Train LoRA makes them), each with its own learning rate.

- The run writes `models/embeddings/<name>.safetensors` and `models/loras/<name>.safetensors`. The
  LoRA is in kohya's layout (`lora_unet_*`), which ComfyUI's Load LoRA and A1111/Forge load: use the
  pair with `embedding:<name>` in the prompt and the LoRA at strength 1.
- The trainer's **model** output is the input MODEL with the LoRA applied, for a sampler in the same
  graph. The MODEL you wired in is never changed.
- **if_exists** applies to the LoRA file too: error never touches it, overwrite replaces it when the
  run completes, and resume continues the run. The LoRA's state is in the run's state, so a
  cancelled run resumes exactly.
- **start** > 0 trains the embedding alone for that fraction of the steps before the LoRA joins it,
  the order diffusers' pivotal-tuning scripts use.

## What it was measured to do

On the miniature world (README, "An embedding and a LoRA together"; 10 paired seeds on each of two
tasks):
- At the default rate, 1e-4, the LoRA changed nothing measurable.
- At 1e-3 it reached the concept in fewer steps (150 vs 200, and 125 vs 175), but not in less time,
  because a step costs more.
- Edit faithfulness was level at both rates.

On the random SD1.5 checkpoint, a step with the LoRA took 1.21x as long and about 0.65 GiB more
memory. The world's concept is one the text encoder nearly expresses, so likeness of real subjects
is not measured there. Use **Save LoRA + Embedding** for A1111's one-file bundle.
""",
    },
    "InversionSaveLoraEmbedding": {
        "body": """\
## Two files or one

- **two files (every UI)**: `models/loras/<name>.safetensors` (kohya keys) and
  `models/embeddings/<name>.safetensors`. ComfyUI (Load LoRA + `embedding:<name>`), A1111/Forge,
  InvokeAI and diffusers all load this pair. A file the trainer already wrote with the same
  contents is left as it is.
- **A1111 bundle (one LoRA file)**: the LoRA with each embedding inside as
  `bundle_emb.<word>.string_to_param.*` (SD1/SD2) or `bundle_emb.<word>.clip_l` / `.clip_g`
  (SDXL). A1111 loads the LoRA and makes each word a trigger. Load LoRA + Embedding reads it in
  ComfyUI. ComfyUI's own Load LoRA ignores the embeddings and logs `lora key not loaded:
  bundle_emb...`.

**Forge**: Forge skips a whole LoRA that has more than 12 keys it cannot match, and each bundled
tensor is one such key (an SDXL concept is two). Use two files for Forge, or for more than a few
concepts.

Several concepts: wire the trainer's **paths** output into **paths** and every concept goes with
the LoRA, each under its own word. A word cannot contain a dot, because A1111 cuts bundle keys at
dots. With **overwrite** off, an existing file is an error and nothing is written.
""",
    },
    "InversionLoadLoraEmbedding": {
        "body": """\
## What it reads

One LoRA file from `models/loras`. The LoRA's own keys go to ComfyUI's LoRA loader (the code
Load LoRA runs, with **strength_model** and **strength_clip**), so nothing is logged as not
loaded. Every embedding in the file becomes its own trigger word, through the same route as Apply
Learned Embedding. It reads:

- A1111's and OneTrainer's bundles: `bundle_emb.<word>.string_to_param.*`, `.emb_params`,
  `.clip_l` / `.clip_g`.
- ai-toolkit's unprefixed `emb_params`, or `clip_l` / `clip_g`. This one is named after the file,
  or after the `name` in its header.

A LoRA without bundled embeddings (**embedding** = auto) gets the file beside it:
`models/embeddings/<lora name>.safetensors` (this pack's two-file pair), or
`<lora name>_emb.safetensors` next to the LoRA (diffusers' advanced scripts). Choose a file to use
another one. Choose none to load the LoRA alone. The **triggers** output lists the words for your
prompts.

Flux and SD3 bundles carry T5 rows too (`t5` or `t5xxl`): they are applied to the CLIP's T5, as
`embedding:` applies a file's `t5xxl` tensor.
""",
    },
    "InversionTrainingOptions": {
        "body": """\
## What it is for

Train Textual Inversion keeps the inputs every run needs; this node holds the rest, so a graph
shows only what it changes. Wire **options** into the trainer (and into Gradient Norm Profiler,
which measures with the same templates and flip). Unconnected, the trainer uses these defaults.

## Groups

- **Method parameters**: interval_start / interval_end (interval), single_t (single_step),
  window (high_grad*), adaptive_bins (adaptive*), kappa and class_word (directional*).
- **Regularisers**: l2_weight, contrastive_weight, l2_init_weight (0 = off). contrastive_weight is
  the vocabulary contrast for one concept, and Arar et al.'s Eq. 2 across the concepts of a run of
  several (Add Concept).
- **Schedule**: lr_schedule (constant, linear or cosine to 0 at the last step) after
  warmup_steps of linear warm-up; grad_accum micro-batches per step (an effective batch of
  batch_size x grad_accum without its memory); max_grad_norm clipping.
- **Data**: flip; templates (object, style or custom lines with `{}`); for images with a caption
  file (`image.txt` beside `image.png`, the concept marked as `[name]` or `{}`), caption_shuffle,
  caption_keep and caption_dropout.
- **Cadence**: checkpoint_every.
- **Score, best step, early stop** (Voronov et al.'s DVAR): score_every > 0 evaluates a deterministic
  loss (fixed images, noise and timesteps) every N steps, charts it, and keeps each evaluation's
  embedding in `models/inversion_runs/<name>/snapshots/`; keep = best writes the lowest-scoring
  snapshot as `<name>.safetensors` (last by default); early_stop ends the run when the score has
  flattened (variance of the last 310 scores below 0.15 of all scores). Off by default: each score
  costs a few forward passes, and early stop is off until measurements show it safe.
- **g_reading**: what the gradient norm g(t) behind the adaptive sampler and the profiler is taken
  with respect to: the learned vectors (tokens, default) or the text encoder's output (context:
  cheaper at batch > 1, the encoder runs once per distinct prompt rather than once per image).
  Paired on the miniature world, tokens was ahead of context in 1 of 4 cells (+0.04, CI +0.01 to
  +0.07) and level in the other three.
- **l2_init_weight**: seeds/003's pull of each vector toward its initial vector (0 = off).
- **Precision and memory**: precision = auto trains in the model's own compute dtype (fp16 models
  with dynamic loss scaling: a step whose gradient overflows is skipped and the scale lowered);
  fp32 / bf16 / fp16 force it on a GPU. gradient_checkpointing recomputes the UNet's activations
  in the backward pass: much less memory (SDXL at 1024 px on 8-12 GB cards), slower steps.
""",
    },
    "InversionPreviewOptions": {
        "body": """\
## What it does

Wire **previews** into Train Textual Inversion's **previews** input. Every **every** steps, and
after the last step (or the step an early stop ends the run), the trainer draws each prompt with
ComfyUI's own sampler (the function KSampler calls) on the model it is training, with the vectors
learned so far put into the prompt as Apply Learned Embedding puts them, and decodes it with the
VAE. The row of images appears on the trainer while it runs (as ComfyUI's node preview), and the
trainer's **previews** output holds all rows: a row per preview step, a column per prompt. Connect
it to a Preview Image or Save Image node.

## Prompts

One prompt per line, with `{}` or `[name]` where the concept goes (the same markers as templates
and captions): `a photo of {}` shows the concept, an edit such as `a painting of {} on the beach`
shows whether it still combines with other words. **negative**, **seed**, **sampler_name**, **scheduler**,
**steps**, **cfg**, **width** and **height** mean what they mean on KSampler; every image uses the
same seed, so two rows differ only by training.

## CLIP scores

Pick an **open_clip_model** (the list of Caption Init's class mode; a "(download)" entry is fetched
into models/open_clip on its first run) and each preview row is scored with Textual Inversion's two
metrics (Gal et al. 2022, Sec. 4.3), drawn as their own panel on the trainer's chart, live and in
its chart output:

- **image**: the mean CLIP cosine between the first prompt's image (the concept in a template) and
  the concept images (cropped to their masks when they have one). Higher: it looks more like them.
- **text**: the mean CLIP cosine between each other prompt's image (the edits) and that prompt with
  the concept left out ("a painting of on the beach"). Higher: the edit is followed. With one prompt,
  both are measured on it.

Every row uses one seed, so each value is one sample: it follows the vectors faithfully from row to
row, but read the trend, not the third decimal. Which step is best stays the deterministic score's
choice (Training Options' score_every). **none** loads nothing and scores nothing.

## Cost, and what it leaves unchanged

Each preview is one KSampler run of **steps** steps per prompt plus a VAE decode; fewer steps and a
smaller size make previews cheaper, and a run makes at most 64 of them (a smaller **every** is
refused with the value to use). Training is unchanged by previews: the run learns exactly the
vectors it learns without them (the preview restores torch's random state, the model's attention
settings and its train/eval flags), and sampling after the run gives the same images as after a
run without previews. Unconnected, nothing is sampled.
""",
    },
    "InversionApplyLearnedEmbedding": {
        "body": """\
## How to use

Put it between the checkpoint's CLIP and your CLIP Text Encode nodes. Prompts encoded with the
output CLIP understand the **trigger** word (bare, or as `embedding:<trigger>`) as the learned
vectors: "a photo of my-concept on a beach".

- No file is written or read: the embedding comes straight from the trainer, Load Embedding or
  Embedding Slerp.
- Because the output is a new CLIP object, ComfyUI re-encodes the prompt whenever the embedding
  changes; an embedding file overwritten on disk alone is not noticed by ComfyUI's cache.
- **strength** weights the concept's tokens like `(word:1.2)`.
- The trigger must not be a word CLIP already knows, and the embedding must match the CLIP's
  model family (an SDXL embedding needs an SDXL CLIP).
""",
    },
    "InversionSaveEmbedding": {
        "body": """\
## Formats

- **auto**: SD1.x / SD2.x embeddings as one tensor (`emb_params`), SDXL as `clip_l` + `clip_g`:
  the files ComfyUI (`embedding:<name>`), A1111/Forge, SD.Next and InvokeAI load.
- **single**: always one tensor (the first text encoder's).
- **sdxl**: the two-tensor SDXL layout.
- **diffusers**: `{token: vectors}`, for diffusers' `load_textual_inversion`.

Existing files are never replaced unless **overwrite** is on. The trainer already saves its
result; use this node for blends (Embedding Slerp) or to export another format.
""",
    },
    "InversionLoadEmbedding": {
        "body": """\
## What it reads

Any embedding file in `models/embeddings`: this pack's `.safetensors`, ComfyUI/A1111 `.pt` and
`.safetensors`, SDXL two-tensor files, kohya and InvokeAI files, and diffusers
`learned_embeds.bin` / `.safetensors`. Pickled `.pt` files are opened with
`torch.load(weights_only=True)`, which refuses code.

Use the output with Apply Learned Embedding, Embedding Slerp or Save Embedding (to convert the
format). Refresh the node list (R) after adding files.
""",
    },
    "InversionEmbeddingSlerp": {
        "body": """\
## How it blends

Each vector of **a** and **b** is split into a direction and a norm; directions are interpolated
along the great circle between them (spherical linear interpolation), norms linearly. The blend
stays at the norm of real words, which keeps it usable in prompts; plain averaging shrinks the
vectors. Directional TI embeddings blend most smoothly.

Both embeddings must come from the same model family and have the same number of vectors.
Sweep **alpha** from 0 to 1 for a morph between the concepts.
""",
        "paper": "002",
    },
    "InversionInspectEmbedding": {
        "body": """\
## What it shows

One line per learned vector, one block per text encoder (SDXL: clip_l and clip_g):

- **norm** against the norms of every word in the CLIP's vocabulary (min, 5 %, median, 95 %,
  max) and its percentile among them. Far above the largest word's norm, the concept drowns out
  the rest of the prompt; far below, it barely registers. Directional methods keep it at the
  vocabulary's norm.
- **cos to init**: the cosine to the vector training started from, recomputed from the init text
  the pack's files record. Other trainers' files (A1111 `.pt`, diffusers, kohya) record none:
  "unknown".
- **nearest**: the vocabulary words closest in direction (cosine), what the vector "reads as".
  A trailing `-` marks a word piece that continues into the next token ("dog-" as in "doggy").
- **drift**: when the run's folder `models/inversion_runs/<name>/` holds earlier vectors
  (`snapshots/step-000100.safetensors`, `state.safetensors`, an unfinished `<name>.safetensors`),
  each one's cosine to the final vector and its norm, by step.

The **chart** draws each norm over its vocabulary's band and, with snapshots, the cosine to the
final vector over steps.

## How to use

Wire the CLIP of the model the embedding was trained for (an SDXL embedding needs an SDXL CLIP)
and either connect an **embedding** (trainer, Load Embedding, Slerp) or pick a **file** in
`models/embeddings`; a file picked here wins over the input. The report also shows in the node.
""",
        "paper": "002",
    },
    "InversionOVIPrior": {
        "body": """\
## What it does

unCLIP checkpoints (SD2.1 unCLIP) are conditioned on a CLIP image embedding instead of (or with)
text; normally that embedding comes from an image or from a separately trained prior. OVI makes
one from the prompt alone: it optimises a few pseudo-tokens through the CLIP vision model until
its image embedding has the highest cosine similarity with the prompt's text embedding. The
**similarity_chart** shows that similarity per step.

## Wiring

unCLIPCheckpointLoader (`sd21-unclip-h.ckpt`) -> its CLIP_VISION into **clip_vision**, its CLIP into
**clip**; the output into unCLIPConditioning together with the encoded prompt. The text side must
live in the vision model's space: an SD2.x CLIP for `clip_vision_h` (or an open_clip text encoder
from `models/open_clip`); an SD1 CLIP is refused.

## The negative side

Classifier-free guidance also runs the model on the negative prompt, and an unCLIP model wants an
image embedding there too. Without one ComfyUI uses zeros, which the paper (Fig. 1) shows casts a
strong violet filter and lowers quality. **negative_clip_vision_output** is that embedding: wire it
with the negative prompt's conditioning into a second unCLIPConditioning, and that into the
sampler's negative (example 08 does). **negative** picks it:

- `blank image` (default): the CLIP vision model's embedding of a blank input (all zeros after
  CLIP's normalisation), the ECLIPSE pipeline's default that the paper uses;
- `negative prompt (OVI)`: OVI toward **negative_prompt**'s text, optimised with the prompt in one
  batch (the analogue of a prior's output for the negative text).

## Constraints

With statistics of real images (Build Image Stats -> **image_stats**): **lambda_m** pulls the
embedding toward their distribution (Mahalanobis; >= 0.05 collapses every prompt to a generic
image), **lambda_n** toward the nearest real embeddings. More **num_tokens** reach a higher
similarity but drift further from real images.

Which lambda is meaningful depends on the statistics:

| statistics | lambda_m | lambda_n |
|---|---|---|
| a large, varied set (the paper's setting: COCO-sized, thousands of images) | the paper's 0.009; 0.05 and above collapse | the paper's 0.5 |
| a few images of one subject (tens) | much lower: start an order of magnitude or more below 0.009 and raise it until the similarity starts to drop | ~0.5 works, but every prompt is pulled toward those few images |

Why: the Mahalanobis term (z - mu)^T Sigma^-1 (z - mu) is measured in units of the set's own
spread. A large varied set has a wide, well-estimated covariance; a few similar images have a
tight one, shrunk toward isotropic (Ledoit-Wolf), so the same prompt's embedding lies many more
"standard deviations" away and the term is far larger. The nearest-neighbour term is a cosine
(0..2) whatever the set, so its weight carries over. These are qualitative rules: no
measurement on real models backs a number beyond the paper's settings.
""",
        "paper": "004",
    },
    "InversionBuildImageStats": {
        "body": """\
## What it makes

Encodes your images with the CLIP vision model and saves their mean, a shrunk covariance (so a
few dozen images suffice) and the embeddings themselves to
`models/ovi_stats/<name>.safetensors`. OVI Prior's **lambda_m** (Mahalanobis) and **lambda_n**
(nearest neighbour) constraints read it. Use images of the kind you want to generate; no dataset
download is needed.

## Large image sets

Give a **folder** (absolute, or under ComfyUI's `input` folder; **recursive** also reads its
sub-folders): its images are decoded and encoded **batch_size** at a time, so only one batch is
ever in memory, with a progress bar and Cancel. Only the embeddings are kept (D floats per image:
4 KB for ViT-H), so a COCO-sized set (about 100,000 images, 0.4 GB of embeddings) works; an
existing file is refused before anything is encoded unless **overwrite** is on.

## Which lambda for which statistics

The paper's lambda_m = 0.009 and lambda_n = 0.5 are for statistics of a large, varied image set.
Statistics of a few images of one subject are tight and nearly isotropic, so the Mahalanobis term
is much larger for the same prompt: start lambda_m an order of magnitude or more lower and raise it
until OVI's similarity begins to drop. lambda_n is a cosine term and carries over (~0.5), but with
few images it pulls every prompt toward them. (Qualitative guidance; see OVI Prior's help.)

Use the same CLIP vision model as OVI Prior. Refresh the node list (R) afterwards so the file
appears in OVI Prior's **image_stats**.
""",
        "paper": "004",
    },
}
