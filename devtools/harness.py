"""Run the pack against a real ComfyUI checkout (``COMFYUI_PATH``), with random-weight models.

Used by ``tests/comfy/conftest.py``, ``tests/comfy/test_ovi_comfy.py``, ``tests/comfy/test_browser.py``
and ``benchmarks/comfy_step_cost.py`` as ``from devtools import harness``: a package name that neither
ComfyUI's own ``tests`` package nor its ``nodes`` module can shadow, whatever the order of ``sys.path``.

- ``boot(base_dir)`` imports ComfyUI as its ``main.py`` would (CPU, ``--base-directory``), so
  models, inputs, outputs and embeddings live in a temporary folder, never in the checkout.
- ``sd15_checkpoint()`` builds, once, a random-weight *full-architecture* SD1.5 checkpoint with
  ComfyUI's own classes (UNet: PyTorch default init, never zero-init, so gradients are not
  trivial; text encoder: N(0, 0.02); saved fp16 in the original LDM key layout via
  ``BaseModel.state_dict_for_saving``) and caches it outside the repository; ``sdxl_checkpoint()``
  does the same for a full-size SDXL base (``benchmarks/train_speed.py``, on a GPU).
- ``sd21_unclip_h_checkpoint()`` builds, once, a random full-size SD2.1 unCLIP-H checkpoint the same
  way (SD2 UNet with the 2048-d unCLIP ADM input, OpenCLIP-H text encoder, VAE, and the ViT-H/14
  CLIP vision tower under ``embedder.model.visual.``) that ``unCLIPCheckpointLoader`` loads as
  SD21UnclipH, v-prediction, with a CLIP_VISION output (``tests/comfy/test_browser.py``, example 08).
- ``tiny_sdxl()`` / ``tiny_sd2()``: small ComfyUI MODEL/CLIP/VAE objects of the SDXL
  (clip_l + clip_g, pooled, ADM ``y``) and SD2 (clip_h, v-prediction) families, built with
  ComfyUI's classes and tiny configs, their weights made inference tensors as the loaders do.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_MODULE = "comfyui_inversion"
CACHE_VERSION = "v1"  # bump when the generated checkpoint changes, so caches are rebuilt
SD15_NAME = f"sd15-random-{CACHE_VERSION}.safetensors"


def comfyui_path() -> str | None:
    path = os.environ.get("COMFYUI_PATH")
    if path and os.path.isfile(os.path.join(path, "nodes.py")) and os.path.isdir(os.path.join(path, "comfy")):
        return os.path.abspath(path)
    return None


def cache_dir() -> str:
    base = os.environ.get("COMFYUI_INVERSION_TEST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "comfyui-inversion-tests")
    os.makedirs(base, exist_ok=True)
    return base


def boot(base_dir: str, cpu: bool = True) -> types.SimpleNamespace:
    """Import ComfyUI from ``COMFYUI_PATH`` with every folder under ``base_dir``; on the CPU unless
    ``cpu`` is False (then ComfyUI picks its device, or keeps the one an earlier import picked)."""
    path = comfyui_path()
    if path is None:
        raise RuntimeError("COMFYUI_PATH is not set to a ComfyUI checkout")
    shadow = sys.modules.get("nodes")
    if shadow is not None and not os.path.abspath(getattr(shadow, "__file__", "") or "").startswith(path):
        raise RuntimeError(f"a module named 'nodes' is already imported from {shadow.__file__}, not ComfyUI's")
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    for sub in ("models/checkpoints", "models/embeddings", "input", "output", "temp", "user", "custom_nodes"):
        os.makedirs(os.path.join(base_dir, sub), exist_ok=True)

    import comfy.cli_args

    # Must precede comfy.model_management's import (a CUDA build without a GPU crashes there),
    # and folder_paths reads base_directory when it is first imported.
    if cpu:
        comfy.cli_args.args.cpu = True
    comfy.cli_args.args.base_directory = base_dir
    import comfy.model_management
    import folder_paths

    # folder_paths may have been imported earlier with another base: point everything at ours.
    folder_paths.set_output_directory(os.path.join(base_dir, "output"))
    folder_paths.set_input_directory(os.path.join(base_dir, "input"))
    folder_paths.set_temp_directory(os.path.join(base_dir, "temp"))
    folder_paths.set_user_directory(os.path.join(base_dir, "user"))
    folder_paths.models_dir = os.path.join(base_dir, "models")
    # ComfyUI's folders, and the pack's own when an earlier boot imported it (nodes/folders.py)
    for name in ("checkpoints", "embeddings", "captioners", "open_clip", "ovi_stats", "inversion_runs"):
        if name in folder_paths.folder_names_and_paths:
            exts = folder_paths.folder_names_and_paths[name][1]
            folder_paths.folder_names_and_paths[name] = ([os.path.join(base_dir, "models", name)], exts)
    folder_paths.filename_list_cache.clear()

    import comfy.sd
    import comfy.utils
    import nodes

    return types.SimpleNamespace(path=path, base_dir=base_dir, comfy=sys.modules["comfy"], nodes=nodes,
                                 folder_paths=folder_paths, mm=comfy.model_management)


def import_pack(name: str = PACK_MODULE):
    """Import this repository as ComfyUI imports a custom-node folder (spec_from_file_location)."""
    # Loading by path is the behaviour being simulated here (ComfyUI's nodes.load_custom_node does
    # the same), so that the pack's relative imports run as they do inside ComfyUI.
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


# ---------------------------------------------------------------- random weights

def run_node(node_cls, node_id: str = "7", **inputs):
    """``node_cls.execute`` as ComfyUI's executor calls it: a class clone with its hidden inputs, inside
    the inference mode every prompt runs in."""
    from comfy_api.latest import io

    hidden = {io.Hidden.unique_id: node_id}
    # ComfyUI v0.8+ hands the clone its V3 data ({"hidden_inputs": ...}); earlier ones the hidden dict
    clone = node_cls.PREPARE_CLASS_CLONE({"hidden_inputs": hidden} if hasattr(io.HiddenHolder, "from_v3_data")
                                         else hidden)
    with torch.inference_mode():
        return clone.execute(**inputs)


TRAIN_INPUTS = ("model", "clip", "vae", "init", "name", "method", "steps", "learning_rate", "batch_size", "seed",
                "if_exists", "images", "masks", "dataset", "profile", "options", "lora")


def cancel_at_step(monkeypatch, step: int) -> None:
    """Press ComfyUI's Cancel when a training run reports ``step`` (through the pack's TrainReporter);
    ComfyUI must be booted and the pack imported."""
    import comfy.model_management

    comfy_run = importlib.import_module(f"{PACK_MODULE}.nodes.comfy_run")
    call = comfy_run.TrainReporter.__call__

    def cancel(self, info):
        if info.step == step:
            comfy.model_management.interrupt_current_processing(True)
        return call(self, info)

    monkeypatch.setattr(comfy_run.TrainReporter, "__call__", cancel)


def run_chart_js(folder, body: str):
    """Run ``body`` under Node.js with ``web/js/inversion/chart_math.js`` imported as ``m``; it prints one
    JSON line with ``console.log``, returned parsed (the charts' JS maths checked against the library)."""
    import json
    import pathlib
    import subprocess

    script = pathlib.Path(folder) / "probe.mjs"
    module = pathlib.Path(ROOT, "web", "js", "inversion", "chart_math.js").as_uri()
    script.write_text(f"import * as m from {json.dumps(module)};\n{body}")
    return json.loads(subprocess.run(["node", str(script)], capture_output=True, text=True, check=True).stdout)


def training_options(**widgets):
    """The pack's ``TrainingOptions`` made by its Training Options node from widget values by name (the
    node's defaults for the rest), so tests exercise the node as a graph would."""
    import importlib

    node = importlib.import_module(f"{PACK_MODULE}.nodes.options_nodes").TrainingOptionsNode
    defaults = {i.id: i.default for i in node.define_schema().inputs}
    unknown = set(widgets) - set(defaults)
    if unknown:
        raise TypeError(f"Training Options has no inputs {sorted(unknown)}")
    return run_node(node, **{**defaults, **widgets}).args[0]


def train_inputs(**kw) -> dict:
    """Train Textual Inversion's inputs from one flat dict: its own inputs as given, everything else
    (templates, flip, checkpoint_every, interval_start, ...) through a Training Options node."""
    own = {k: v for k, v in kw.items() if k in TRAIN_INPUTS}
    rest = {k: v for k, v in kw.items() if k not in TRAIN_INPUTS}
    if rest:
        own["options"] = training_options(**rest)
    return own


def _torch_reset(m: nn.Module) -> bool:
    """Run the reset_parameters of the first torch.nn class in ``m``'s MRO (ComfyUI's ops
    override it with a no-op, leaving ``torch.empty`` memory)."""
    for cls in type(m).__mro__:
        if cls.__module__.startswith("torch.nn") and "reset_parameters" in cls.__dict__:
            cls.__dict__["reset_parameters"](m)
            return True
    return False


@torch.no_grad()
def randomize_(module: nn.Module, seed: int, *, text_std: float | None = None) -> nn.Module:
    """Initialise every parameter: PyTorch defaults (``text_std`` None) or N(0, text_std) for
    linear/embedding weights with zero biases (the CLIP text-encoder convention); norms 1/0."""
    torch.manual_seed(seed)
    done: set[int] = set()
    for m in module.modules():
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            if m.weight is not None:
                m.weight.fill_(1.0)
            if m.bias is not None:
                m.bias.zero_()
        elif text_std is not None and isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.normal_(0.0, text_std)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
        elif not _torch_reset(m):
            for p in own:
                p.normal_(0.0, 0.02)
        done.update(id(p) for p in own)
    for p in module.parameters():
        if id(p) not in done:
            p.normal_(0.0, 0.02)
    return module


# ---------------------------------------------------------------- SD1.5, full size

SD15_UNET = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
    use_linear_in_transformer=False, context_dim=768, num_heads=8,
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    use_temporal_attention=False, use_temporal_resblock=False,
)
SD_VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
              ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def build_sd15_checkpoint(path: str, seed: int = 0) -> str:
    """Write a random SD1.5 checkpoint that CheckpointLoaderSimple detects as SD15/EPS."""
    import comfy.sd1_clip
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(SD15_UNET, dtype=torch.float32))
    config.set_inference_dtype(torch.float32, None)
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    return _write_random_checkpoint(path, config.get_model({}), clip, seed, "comfyui-inversion tests")


def _write_random_checkpoint(path: str, model, clip, seed: int, generator: str, clip_vision=None,
                             after_randomize=None) -> str:
    """Randomise ``model`` and ``clip`` (and a fresh SD VAE; ``clip_vision``, a ComfyUI ``ClipVisionModel``,
    when given), save them as one fp16 checkpoint at ``path`` through ``BaseModel.state_dict_for_saving``
    (ComfyUI's own checkpoint writer). ``after_randomize(model)`` may adjust the random weights."""
    import comfy.ldm.models.autoencoder as ae
    import comfy.utils

    model = randomize_(model, seed)
    if after_randomize is not None:
        after_randomize(model)
    clip = randomize_(clip, seed + 1, text_std=0.02)
    vae = randomize_(ae.AutoencoderKL(ddconfig=dict(SD_VAE), embed_dim=4), seed + 2)
    vision_sd = None
    if clip_vision is not None:  # CLIP's own init convention, as for the text encoder
        vision_sd = randomize_(clip_vision.model, seed + 3, text_std=0.02).state_dict()
    sd = model.state_dict_for_saving(clip.state_dict(), vae.state_dict(), vision_sd)
    del model, clip, vae, vision_sd, clip_vision
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    tmp = f"{path}.{os.getpid()}.tmp"
    comfy.utils.save_torch_file(sd, tmp, metadata={"generator": generator, "version": CACHE_VERSION})
    os.replace(tmp, path)  # atomic: a concurrent run never sees a half-written file
    return path


def sd15_checkpoint() -> str:
    """Path of the cached random SD1.5 checkpoint, built on first use (~1 min, 2 GB)."""
    path = os.path.join(cache_dir(), SD15_NAME)
    if not os.path.isfile(path):
        build_sd15_checkpoint(path)
    return path


def install_checkpoint(env: types.SimpleNamespace, path: str) -> str:
    """Link ``path`` into the base folder's models/checkpoints; returns the ckpt_name to use."""
    name = os.path.basename(path)
    dst = os.path.join(env.base_dir, "models", "checkpoints", name)
    if not os.path.exists(dst):
        os.symlink(path, dst)
    env.folder_paths.filename_list_cache.clear()
    return name


def load_checkpoint(env: types.SimpleNamespace, ckpt_name: str):
    """(MODEL, CLIP, VAE) through CheckpointLoaderSimple, under inference mode as a prompt runs."""
    with torch.inference_mode():
        return env.nodes.CheckpointLoaderSimple().load_checkpoint(ckpt_name)


# ---------------------------------------------------------------- tiny SDXL / SD2 objects

def _tiny_te(width: int, layers: int = 3) -> dict:
    return {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
            "num_attention_heads": 2, "projection_dim": width}


def _tiny_unet(context_dim: int, adm: int | None) -> dict:
    cfg = dict(
        use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=32,
        num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_middle=1,
        transformer_depth_output=[1, 1, 1, 1], use_linear_in_transformer=True, context_dim=context_dim,
        num_head_channels=16, use_spatial_transformer=True, legacy=False, adm_in_channels=adm,
        use_temporal_attention=False, use_temporal_resblock=False, dtype=torch.float32,
    )
    if adm is not None:
        cfg["num_classes"] = "sequential"
    return cfg


def _tiny_vae(embedding_directory: str | None = None, channels: int = 4):
    import comfy.ldm.models.autoencoder as ae
    import comfy.sd

    ddconfig = dict(SD_VAE, ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1, z_channels=channels)
    sd = randomize_(ae.AutoencoderKL(ddconfig=dict(ddconfig), embed_dim=channels), 7).state_dict()
    vae = comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": ddconfig, "embed_dim": channels}})
    vae.latent_channels = channels
    return vae


def _tiny(family: str, embedding_directory: str | None, seed: int):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.supported_models_base
    import comfy.text_encoders.sd2_clip as sd2_clip

    cpu = torch.device("cpu")
    with torch.inference_mode():  # what the loaders do inside a prompt: weights become inference tensors
        if family == "sdxl":
            widths = {"clip_l": 32, "clip_g": 64}
            config = comfy.supported_models.SDXL(_tiny_unet(96, 64 + 6 * 256))
            config.unet_config["num_head_channels"] = 16  # the family default (64) leaves 0 heads at width 32
            model = comfy.model_base.SDXL(config, comfy.model_base.ModelType.EPS, device=cpu)
            target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
        else:
            widths = {"clip_h": 48}
            config = comfy.supported_models.SD20(_tiny_unet(48, None))
            config.unet_config["num_head_channels"] = 16
            model = comfy.model_base.BaseModel(config, comfy.model_base.ModelType.V_PREDICTION, device=cpu)
            target = comfy.supported_models_base.ClipTarget(sd2_clip.SD2Tokenizer, sd2_clip.SD2ClipModel)
        randomize_(model, seed)
        options = {f"{k}_model_config": _tiny_te(w) for k, w in widths.items()}
        clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory, model_options=options)
        randomize_(clip.cond_stage_model, seed + 1, text_std=0.02)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
        vae = _tiny_vae()
    return patcher, clip, vae


def tiny_sdxl(embedding_directory: str | None = None, seed: int = 0):
    """(MODEL, CLIP, VAE): SDXL family, clip_l 32-d + clip_g 64-d, pooled from clip_g into ADM y."""
    return _tiny("sdxl", embedding_directory, seed)


def tiny_sd2(embedding_directory: str | None = None, seed: int = 0):
    """(MODEL, CLIP, VAE): SD2 family, clip_h 48-d, v-prediction."""
    return _tiny("sd2", embedding_directory, seed)


# ---------------------------------------------------------------- tiny SD3 / Flux objects

TINY_T5 = {"d_ff": 32, "d_kv": 8, "num_heads": 2, "num_layers": 2}  # T5-XXL's layout, 2 narrow layers


def _flow_clip(family: str, t5: bool, embedding_directory: str | None, seed: int):
    """SD3's (clip_l 32-d, clip_g 64-d, T5 or not) or Flux's (clip_l 32-d, T5 48-d) CLIP, ComfyUI's classes with
    small configs through ``model_options`` (``<key>_model_config``), as ComfyUI lets a loader shrink them.

    SD3's T5 keeps its 4096 features: ``SD3ClipModel`` pads the CLIP states to 4096 and joins T5's tokens to
    them, so its token table is the real one (32128 x 4096); its two layers are narrow (d_ff 32, 2 heads of 8)."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.flux as flux_te
    import comfy.text_encoders.sd3_clip as sd3_clip

    opts = {"clip_l_model_config": _tiny_te(32)}
    if family == "sd3":
        opts.update(clip_g_model_config=_tiny_te(64), t5xxl_model_config=TINY_T5)
        target = comfy.supported_models_base.ClipTarget(
            sd3_clip.SD3Tokenizer, sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=t5, dtype_t5=torch.float32))
    else:
        opts.update(t5xxl_model_config=dict(TINY_T5, d_model=48))
        target = comfy.supported_models_base.ClipTarget(flux_te.FluxTokenizer, flux_te.flux_clip(dtype_t5=torch.float32))
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory, model_options=opts)
    randomize_(clip.cond_stage_model, seed + 1, text_std=0.02)
    return clip


def _flux_config() -> dict:
    import dataclasses

    import comfy.ldm.flux.model as flux_model

    cfg = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48, hidden_size=64,
               mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000,
               patch_size=2, qkv_bias=True, guidance_embed=True, dtype=torch.float32)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(flux_model.FluxParams)}:  # ComfyUI v0.2x+
        cfg["txt_ids_dims"] = []
    return cfg


def _tiny_flow(family: str, t5: bool, embedding_directory: str | None, seed: int):
    import comfy.model_patcher
    import comfy.supported_models

    cpu = torch.device("cpu")
    with torch.inference_mode():
        if family == "sd3":  # MMDiT: hidden = 64 x depth; y = [clip_l pooled 32, clip_g projected pooled 64]
            config = comfy.supported_models.SD3({
                "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
                "adm_in_channels": 96, "pos_embed_max_size": 32, "num_patches": 32 * 32, "pos_embed_scaling_factor": None,
                "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
                "dtype": torch.float32})
        else:
            config = comfy.supported_models.Flux(_flux_config())
        model = randomize_(config.get_model({}, device=cpu), seed)
        if family == "sd3":  # a buffer the checkpoint fills (torch.empty until then): SD3's fixed 2-D sin-cos table
            import comfy.ldm.modules.diffusionmodules.mmdit as mmdit

            table = mmdit.get_2d_sincos_pos_embed(128, 32)
            model.diffusion_model.pos_embed.copy_(torch.from_numpy(table).float().unsqueeze(0))
        clip = _flow_clip(family, t5, embedding_directory, seed)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
        vae = _tiny_vae(channels=16)
    return patcher, clip, vae


def tiny_sd3(embedding_directory: str | None = None, seed: int = 0, t5: bool = True):
    """(MODEL, CLIP, VAE): SD3 family (MMDiT depth 2, shift 3), clip_l 32-d + clip_g 64-d (+ T5, 4096-d, 2 layers)."""
    return _tiny_flow("sd3", t5, embedding_directory, seed)


def tiny_flux(embedding_directory: str | None = None, seed: int = 0):
    """(MODEL, CLIP, VAE): Flux.1-dev family (1 double + 1 single block, guidance input), clip_l 32-d, T5 48-d."""
    return _tiny_flow("flux", True, embedding_directory, seed)


# ---------------------------------------------------------------- SDXL, full size (GPU benchmark)

SDXL_NAME = f"sdxl-random-{CACHE_VERSION}.safetensors"
SDXL_UNET = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
    use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_attention=False, use_temporal_resblock=False,
)


def build_sdxl_checkpoint(path: str, seed: int = 0) -> str:
    """Write a random full-size SDXL base checkpoint (2.6 B UNet, clip_l + clip_g, VAE; ~7 GB fp16)
    that CheckpointLoaderSimple detects as SDXL; built in fp16 to keep the peak memory near 8 GB."""
    import comfy.sdxl_clip
    import comfy.supported_models

    unet = dict(SDXL_UNET, dtype=torch.float16)
    config = comfy.supported_models.SDXL(unet)
    config.set_inference_dtype(torch.float16, None)
    clip = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float16)
    return _write_random_checkpoint(path, config.get_model({}), clip, seed, "comfyui-inversion benchmarks")


def sdxl_checkpoint() -> str:
    """Path of the cached random full-size SDXL checkpoint, built on first use (7 GB; minutes on a CPU)."""
    path = os.path.join(cache_dir(), SDXL_NAME)
    if not os.path.isfile(path):
        build_sdxl_checkpoint(path)
    return path


# ---------------------------------------------------------------- SD2.1 unCLIP-H, full size (example 08)

UNCLIP_H_NAME = f"sd21-unclip-h-random-{CACHE_VERSION}.safetensors"
SD21_UNCLIP_H_UNET = dict(  # SD2.x's UNet; the ADM input takes [image embed 1024, noise-level embed 1024]
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2048, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
    use_linear_in_transformer=True, context_dim=1024, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    use_temporal_attention=False, use_temporal_resblock=False,
)
V_PRED_BIAS = "output_blocks.11.1.transformer_blocks.0.norm1.bias"  # supported_models.SD20.model_type reads its std


def _spread_v_pred_bias(model) -> None:
    """ComfyUI tells SD2 v-prediction from eps by the spread (std > 0.09) of one LayerNorm bias; a random
    model has it at 0 (eps). Give it std 0.2, as trained v-models have, so the file loads as V_PREDICTION."""
    bias = model.diffusion_model.state_dict()[V_PRED_BIAS]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bias.copy_(torch.randn(bias.shape, generator=g) * 0.2)


def build_sd21_unclip_h_checkpoint(path: str, seed: int = 0) -> str:
    """Write a random full-size SD2.1 unCLIP-H checkpoint (0.87 B UNet, OpenCLIP-H text encoder, VAE and the
    0.63 B ViT-H/14 vision tower; ~3.9 GB fp16) that ``unCLIPCheckpointLoader`` detects as ``SD21UnclipH``,
    v-prediction, and returns a CLIP_VISION for (``comfy/clip_vision_config_h.json``: 32 layers, 1280 wide,
    1024-d projection). Built in fp16 to keep the peak memory near the file's size."""
    import comfy.clip_vision
    import comfy.supported_models
    import comfy.text_encoders.sd2_clip as sd2_clip

    config = comfy.supported_models.SD21UnclipH(dict(SD21_UNCLIP_H_UNET, dtype=torch.float16))
    config.set_inference_dtype(torch.float16, None)
    clip = sd2_clip.SD2ClipModel(device="cpu", dtype=torch.float16)
    vision_config = os.path.join(os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_h.json")
    clip_vision = comfy.clip_vision.ClipVisionModel(vision_config)
    clip_vision.model.to(torch.float16)
    return _write_random_checkpoint(path, config.get_model({}), clip, seed, "comfyui-inversion tests",
                                    clip_vision=clip_vision, after_randomize=_spread_v_pred_bias)


def sd21_unclip_h_checkpoint() -> str:
    """Path of the cached random SD2.1 unCLIP-H checkpoint, built on first use (~3.9 GB; see README for timings)."""
    path = os.path.join(cache_dir(), UNCLIP_H_NAME)
    if not os.path.isfile(path):
        build_sd21_unclip_h_checkpoint(path)
    return path
