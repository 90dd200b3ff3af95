"""Training speed on a GPU: steps/s and peak VRAM of our trainer, the floor, and diffusers' script.

For SD1.5 at 512 px and SDXL at 1024 px, batch 1 and 4, on random full-architecture checkpoints
(``devtools.harness``: built once with ComfyUI's own classes, cached outside the repository):

- ours:      ``Trainer.train_step`` through the ComfyUI adapter (``training_host``), as the node runs it;
- floor:     UNet forward+backward w.r.t. the context + text encoder forward+backward w.r.t. the
             learned vectors, at the same precision (``benchmarks/comfy_step_cost.py`` defines both);
- diffusers: diffusers' ``examples/textual_inversion/textual_inversion.py``, unmodified, as a
             subprocess on a diffusers-format random SD1.5 of the same architecture, at the same
             precision (``--mixed_precision fp16`` where ComfyUI runs the UNet in fp16). Its steps/s
             is (N2 - N1) / (wall(N2 steps) - wall(N1 steps)): startup and model loading cancel.
             This project does not ship diffusers' code: give the script with ``--diffusers-script``
             or ``DIFFUSERS_TI_SCRIPT`` (it needs diffusers, transformers, accelerate and tensorboard,
             its default logger); without it the column is skipped, and said so. SD1.5 only (SDXL
             has another script).

GPU (the numbers to quote; builds the SDXL checkpoint on first use, ~7 GB):

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/train_speed.py \
        --diffusers-script /path/to/diffusers/examples/textual_inversion/textual_inversion.py

``--quick``: CPU, SD1.5 at 64 px, batch 1, 2 steps, no SDXL: checks the benchmark runs (CI).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see comfy_step_cost.py

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # devtools
sys.path.insert(0, HERE)  # comfy_step_cost

from devtools import harness  # noqa: E402

GPU_CASES = [("sd15", 512, 1), ("sd15", 512, 4), ("sdxl", 1024, 1), ("sdxl", 1024, 4)]
QUICK_CASES = [("sd15", 64, 1)]


def boot(gpu: bool):
    """ComfyUI in-process; on a GPU, ``comfy.model_management`` is imported before ``harness.boot``
    (which asks for the CPU) so that ComfyUI picks the GPU, as ``main.py`` would."""
    if harness.comfyui_path() is None:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    if gpu:
        sys.path.insert(0, harness.comfyui_path())
        import comfy.cli_args
        comfy.cli_args.args.cpu = False
        import comfy.model_management  # noqa: F401  (fixes the device now)
    env = harness.boot(tempfile.mkdtemp(prefix="comfy-speed-"), cpu=not gpu)
    harness.import_pack()
    return env


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fns, names, vectors, device, warmup: int, steps: int) -> tuple[float, float]:
    """Seconds per step of running ``names`` in sequence, and the peak VRAM (GiB; NaN on the CPU)."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        for n in names:
            fns[n]()
            for v in vectors:
                v.grad = None
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        for n in names:
            fns[n]()
            for v in vectors:
                v.grad = None
    sync(device)
    per_step = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else math.nan
    return per_step, peak


def load(env, family: str):
    path = harness.sd15_checkpoint() if family == "sd15" else harness.sdxl_checkpoint()
    model, clip, _ = harness.load_checkpoint(env, harness.install_checkpoint(env, path))
    return model, clip


def measure_ours(env, mods, family, size, batch, warmup, steps) -> dict:
    import comfy.model_management as mm

    step_cost = importlib.import_module("comfy_step_cost")
    model, clip = load(env, family)
    torch.manual_seed(0)
    with torch.inference_mode(), mods["comfy_host"].training_host(model, clip) as host:
        fns, vectors = step_cost.step_functions(mods, host, model, batch, 2, size // 8)
        ours, ours_mem = timed(fns, ["trainer_step"], vectors, host.device, warmup, steps)
        floor, floor_mem = timed(fns, ["floor_te", "floor_unet"], vectors, host.device, warmup, steps)
        dtype = host.dtype
    del fns, vectors, host, model, clip
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    return {"ours": ours, "ours_mem": ours_mem, "floor": floor, "floor_mem": floor_mem, "dtype": dtype}


# ---------------------------------------------------------------- diffusers' example script

def diffusers_sd15(path: str, comfy_path: str) -> str:
    """A random SD1.5 in diffusers' folder layout, made with diffusers' and transformers' classes
    (the tokenizer files are ComfyUI's copy of CLIP's)."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return path
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tok_dir = os.path.join(comfy_path, "comfy", "sd1_tokenizer")
    tokenizer = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"),
                              model_max_length=77)  # the script pads every prompt to this length
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                                        hidden_act="quick_gelu"))
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, sample_size=512, layers_per_block=2)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = f"{path}.{os.getpid()}.tmp"
    pipe.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def measure_diffusers(script: str, size: int, batch: int, steps: int, precision: str, workdir: str) -> float:
    """Seconds per step of diffusers' unmodified script: the difference of two runs' wall times."""
    from PIL import Image

    model = diffusers_sd15(os.path.join(harness.cache_dir(), "sd15-random-diffusers-v1"), harness.comfyui_path())
    images = os.path.join(workdir, "images")
    os.makedirs(images, exist_ok=True)
    for i in range(4):
        Image.effect_noise((size, size), 64).convert("RGB").save(os.path.join(images, f"{i}.png"))

    def run(n: int) -> float:
        out = os.path.join(workdir, f"out{n}")
        cmd = [sys.executable, script, "--pretrained_model_name_or_path", model, "--train_data_dir", images,
               "--learnable_property", "object", "--placeholder_token", "<c>", "--initializer_token", "cat",
               "--resolution", str(size), "--train_batch_size", str(batch), "--max_train_steps", str(n),
               "--learning_rate", "5e-3", "--mixed_precision", precision, "--output_dir", out,
               "--save_steps", str(10**6), "--checkpointing_steps", str(10**6), "--dataloader_num_workers", "0",
               "--seed", "0"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"diffusers' script failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        shutil.rmtree(out, ignore_errors=True)
        return wall

    short, long = run(1), run(1 + steps)
    return (long - short) / steps


def diffusers_skip_reason(script: str | None) -> str | None:
    if not script:
        return "no script given (--diffusers-script or DIFFUSERS_TI_SCRIPT)"
    if not os.path.isfile(script):
        return f"{script} does not exist"
    missing = [m for m in ("diffusers", "transformers", "accelerate", "tensorboard")
               if importlib.util.find_spec(m) is None]
    if missing:
        return f"its dependencies are not installed: {', '.join(missing)}"
    return None


# ---------------------------------------------------------------- the table

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU, SD1.5 64 px, batch 1, 2 steps (a check that it runs)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement (10; quick: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (3; quick: 1)")
    ap.add_argument("--only", choices=("sd15", "sdxl"), help="one family only")
    ap.add_argument("--diffusers-script", default=os.environ.get("DIFFUSERS_TI_SCRIPT"),
                    help="path to diffusers' examples/textual_inversion/textual_inversion.py")
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and not args.quick
    if not gpu and not args.quick:
        sys.exit("no CUDA GPU: run with --quick for the CPU check")
    steps = args.steps or (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    cases = [c for c in (QUICK_CASES if args.quick else GPU_CASES) if args.only in (None, c[0])]

    env = boot(gpu)
    step_cost = importlib.import_module("comfy_step_cost")
    mods = step_cost.pack_modules()
    skip = diffusers_skip_reason(args.diffusers_script)
    device = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"train_speed: {device}, torch {torch.__version__}, {steps} timed steps after {warmup} warm-up")
    if skip:
        print(f"diffusers column skipped: {skip}")
    rows = []
    for family, size, batch in cases:
        r = measure_ours(env, mods, family, size, batch, warmup, steps)
        diff = math.nan
        if skip is None and family == "sd15":
            precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(r["dtype"], "no")
            with tempfile.TemporaryDirectory(prefix="diffusers-ti-") as work:
                diff = measure_diffusers(args.diffusers_script, size, batch, steps, precision, work)
        rows.append((family, size, batch, r, diff))

    head = (f"{'model':<6} {'px':>5} {'B':>2} {'dtype':>8} | {'ours it/s':>9} {'VRAM GiB':>8} | {'floor it/s':>10} "
            f"{'VRAM GiB':>8} | {'diffusers it/s':>14} | {'ours/floor':>10} {'ours/diffusers':>14}")
    print(head)
    print("-" * len(head))
    for family, size, batch, r, diff in rows:
        ours, floor = 1 / r["ours"], 1 / r["floor"]
        dif = 1 / diff if diff == diff else math.nan
        print(f"{family:<6} {size:>5} {batch:>2} {str(r['dtype']).replace('torch.', ''):>8} | {ours:>9.3f} "
              f"{r['ours_mem']:>8.2f} | {floor:>10.3f} {r['floor_mem']:>8.2f} | {dif:>14.3f} | "
              f"{ours / floor:>10.3f} {ours / dif:>14.3f}")
    print("it/s: optimisation steps per second (higher is better); ratios of it/s, measured in this run. "
          "VRAM: torch.cuda.max_memory_allocated (nan on the CPU; not measurable for the diffusers subprocess).")


if __name__ == "__main__":
    main()
