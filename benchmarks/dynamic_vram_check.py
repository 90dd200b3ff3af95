"""Training under ComfyUI's dynamic VRAM against training with it off, on one GPU (issue 22).

Dynamic VRAM (ComfyUI v0.16+, the default on NVIDIA cards; ``ModelPatcherDynamic``, comfy-aimdo)
streams each weight to the GPU for the operation that needs it. The pack trains through core's fully
loaded copy of such a model (``nodes/comfy_host.py:static_models``). This script checks, on the random
full-size SD1.5 checkpoint (``devtools.harness``), that the outcome is the same as with
``--disable-dynamic-vram``: each mode runs in its own process, started as ComfyUI's ``main.py`` starts
(its module-level set-up decides the patcher class), loads the checkpoint with CheckpointLoaderSimple,
and trains the same concept with the same seed. It prints, for both modes:

- the patcher classes of the MODEL and CLIP given, and of those trained;
- where the UNet and each text encoder ran (the device of their outputs), and the execution device
  the encoder was given;
- the vectors' gradient after step 1 and the final vectors (max abs and relative difference);
- the median step time and the peak VRAM (``torch.cuda.max_memory_allocated``).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/dynamic_vram_check.py        # GPU: 512 px, 20 steps
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/dynamic_vram_check.py --quick  # CPU: 64 px, 2 steps (CI)

On the CPU there is no dynamic VRAM (``ModelPatcherDynamic`` reroutes to the plain patcher), so
``--quick`` checks that the script runs and that both processes agree, not the GPU behaviour. It exits
with 1 when the two modes' vectors differ by more than ``--tolerance`` (relative).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

MODES = ("on", "off")  # dynamic VRAM as ComfyUI starts by default, and with --disable-dynamic-vram


def _boot_as_main(base: str, mode: str, quick: bool):
    """ComfyUI's own start-up (``main.py``'s module level: argument parsing, comfy-aimdo, the patcher
    class), without its server; then the pack, as the harness imports it."""
    from devtools import harness

    comfy = harness.comfyui_path()
    if comfy is None:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    os.makedirs(os.path.join(base, "custom_nodes"), exist_ok=True)
    with open(os.path.join(comfy, "comfy", "cli_args.py"), encoding="utf-8") as f:
        has_flag = "--disable-dynamic-vram" in f.read()  # before v0.16 there is nothing to disable
    sys.argv = ["main.py", "--base-directory", base, "--disable-auto-launch", *(["--cpu"] if quick else []),
                *(["--disable-dynamic-vram"] if mode == "off" and has_flag else [])]
    sys.path.insert(0, comfy)
    import main  # noqa: F401 - ComfyUI's main.py: runs its set-up at import, starts no server

    env = harness.boot(base, cpu=quick)
    harness.import_pack()
    return env


def child(mode: str, quick: bool, out: str) -> None:
    """One mode in this process: train, and write what was seen to ``out`` (JSON)."""
    import importlib

    import torch

    from devtools import harness

    env = _boot_as_main(tempfile.mkdtemp(prefix=f"comfy-dynvram-{mode}-"), mode, quick)
    pack = harness.PACK_MODULE
    host = importlib.import_module(f"{pack}.nodes.comfy_host")
    nodes_t = importlib.import_module(f"{pack}.nodes.training_nodes")
    init = importlib.import_module(f"{pack}.inversion.methods.init")
    emb_mod = importlib.import_module(f"{pack}.inversion.embedding")
    trainer_mod = importlib.import_module(f"{pack}.inversion.trainer")
    import comfy.model_management as mm
    import comfy.sd1_clip

    name = harness.install_checkpoint(env, harness.sd15_checkpoint())
    model, clip, vae = harness.load_checkpoint(env, name)
    given = {"model": type(model).__name__, "clip": type(clip.patcher).__name__,
             "model_dynamic": host._is_dynamic(model), "clip_dynamic": host._is_dynamic(clip.patcher)}
    size, steps = (64, 2) if quick else (512, 20)
    images = torch.rand(3, size, size, 3, generator=torch.Generator().manual_seed(0))
    text = host.comfy_text_side(clip)
    vectors = init.from_word(text, "cat", 2)
    emb = emb_mod.LearnedEmbedding("init", vectors, "<init>", {"init_text": "cat"})
    with torch.inference_mode():
        data = nodes_t.concept_data(model, clip, vae, emb, "dynvram", images=images)
    ran: dict[str, set] = {}

    def where(label):
        def hook(module, args, output):
            first = output[0] if isinstance(output, (tuple, list)) else output
            ran.setdefault(label, set()).add(str(first.device))
            if isinstance(module, comfy.sd1_clip.SDClipModel):
                ran.setdefault(f"{label} execution device", set()).add(str(getattr(module, "execution_device", None)))
        return hook

    cuda = torch.cuda.is_available() and not quick
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model_t, clip_t = host.static_models(model, clip)
    trained = {"model": type(model_t).__name__, "clip": type(clip_t.patcher).__name__,
               "model_is_given": model_t is model, "clip_is_given": clip_t.patcher is clip.patcher}
    hooks = [model_t.model.diffusion_model.register_forward_hook(where("UNet"))]
    for key in host.encoder_keys(clip_t):
        hooks.append(getattr(clip_t.cond_stage_model, key).register_forward_hook(where(key)))
    times: list[float] = []
    grad = None
    with host.training_host(model_t, clip_t) as h:
        autocast, loss_scale = host.training_precision(h, "auto")
        config = trainer_mod.TrainConfig(steps=steps, seed=0, autocast_dtype=autocast, loss_scale=loss_scale)
        tr = trainer_mod.Trainer(h.text_side, h.denoiser, [data], config)
        while tr.step < steps:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            tr.train_step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            if grad is None:
                grad = tr.params["clip_l"].grad.detach().float().cpu()
        final = tr.embeddings()[0].vectors["clip_l"].float().cpu()
    for hk in hooks:
        hk.remove()
    result = {
        "mode": mode, "device": torch.cuda.get_device_name() if cuda else "CPU",
        "comfy_device": str(mm.get_torch_device()), "given": given, "trained": trained,
        "ran": {k: sorted(v) for k, v in ran.items()}, "step_seconds": times,
        "peak_vram_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "grad": grad.tolist(), "final": final.tolist(), "size": size, "steps": steps,
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f)


def _diff(a, b) -> tuple[float, float]:
    import torch

    a, b = torch.tensor(a), torch.tensor(b)
    d = float((a - b).abs().max())
    return d, d / max(float(b.abs().max()), 1e-30)


def table(results: dict) -> str:
    on, off = results["on"], results["off"]
    keys = sorted(set(on["ran"]) | set(off["ran"]))
    rows = [
        ("MODEL given", lambda r: f"{r['given']['model']} (dynamic: {r['given']['model_dynamic']})"),
        ("CLIP given", lambda r: f"{r['given']['clip']} (dynamic: {r['given']['clip_dynamic']})"),
        ("MODEL trained", lambda r: r["trained"]["model"] + ("" if r["trained"]["model_is_given"] else
                                                            " (core's non-dynamic copy)")),
        ("CLIP trained", lambda r: r["trained"]["clip"] + ("" if r["trained"]["clip_is_given"] else
                                                          " (core's non-dynamic copy)")),
        *[(f"{k} ran on" if "execution" not in k else k, lambda r, k=k: ", ".join(r["ran"].get(k, ["-"])))
          for k in keys],
        ("step time, median (s)", lambda r: f"{statistics.median(r['step_seconds']):.3f}"),
        ("peak VRAM (GiB)", lambda r: "-" if r["peak_vram_gib"] is None else f"{r['peak_vram_gib']:.2f}"),
    ]
    lines = [f"SD1.5 (random, full size), {on['size']} px, batch 1, {on['steps']} steps, on {on['device']}", "",
             "| | dynamic VRAM on (ComfyUI's default) | --disable-dynamic-vram |", "|---|---|---|"]
    lines += [f"| {name} | {f(on)} | {f(off)} |" for name, f in rows]
    g = _diff(on["grad"], off["grad"])
    v = _diff(on["final"], off["final"])
    lines += ["", f"gradient of the vectors after step 1: max |on - off| = {g[0]:.3g} (relative {g[1]:.3g})",
              f"final vectors after {on['steps']} steps: max |on - off| = {v[0]:.3g} (relative {v[1]:.3g})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU, 64 px, 2 steps: checks the script (CI)")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="largest relative difference of the vectors allowed (default 1e-5 on the CPU, "
                         "1e-3 on a GPU, whose kernels are not bit-reproducible across processes)")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.quick, args.out)
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            out = os.path.join(tmp, f"{mode}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--out", out,
                   *(["--quick"] if args.quick else [])]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
                print(f"the dynamic VRAM '{mode}' run failed (exit {proc.returncode})", file=sys.stderr)
                return 2
            with open(out, encoding="utf-8") as f:
                results[mode] = json.load(f)
            print(f"mode {mode}: {time.time() - t0:.0f} s")
    print(table(results))
    if not results["on"]["given"]["model_dynamic"]:
        print("\ndynamic VRAM was not active in the 'on' run (CPU, --quick, no NVIDIA card or no comfy-aimdo, or a "
              "ComfyUI before v0.16): both runs took the same path.")
    tol = args.tolerance if args.tolerance is not None else (1e-5 if results["on"]["device"] == "CPU" else 1e-3)
    rel = _diff(results["on"]["final"], results["off"]["final"])[1]
    if rel > tol:
        print(f"\nDIFFERENT: the final vectors differ by {rel:.3g} relative, above the tolerance {tol:g}")
        return 1
    print(f"\nsame outcome: the final vectors agree within {tol:g} relative")
    return 0


if __name__ == "__main__":
    sys.exit(main())
