"""Cost of one textual-inversion step through the ComfyUI adapter, against the floor.

floor   = UNet forward+backward w.r.t. the context (the raw ``diffusion_model``)
        + text-encoder forward+backward w.r.t. the learned vectors (the raw CLIP transformer on
          token embeddings with the vectors spliced in);
adapter = ``ComfyTextEncoder.encode`` -> ``SimpleTextSide.combine`` -> ``ComfyDenoiser.predict_eps``
          -> eps-MSE -> backward, as the trainer runs it.
Both on the random full-size SD1.5 checkpoint loaded by CheckpointLoaderSimple, in one process,
measured alternately; prints minima, medians and the ratio (minima, and the median of each
repetition's own ratio, since a shared machine disturbs single measurements).

``--attention``: ``sdpa`` (the default) is what the trainer runs: ``training_host`` gives the UNet
PyTorch's scaled-dot-product attention (``nodes/comfy_attention.py``), and the floor gets the same;
``comfy`` keeps ComfyUI's own choice (sub-quadratic on the CPU); ``both`` measures each in its own
subprocess (so each peak resident memory is its own) and prints the gain.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/comfy_step_cost.py [--batch 1] [--size 64] [--reps 7]
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/comfy_step_cost.py --size 512 --reps 1 --attention both

``--lora compare``: pivotal tuning's cost (issue 25). The Trainer step without a LoRA and with LoRA Options'
defaults (rank 4 on the attention projections, ComfyUI's own adapters on a MODEL clone, as the trainer node
builds it), each in its own subprocess (each peak resident memory its own); prints the ratios. ``--lora on``
measures one process with the LoRA.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/comfy_step_cost.py --lora compare --size 256 --reps 3
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

# On a machine shared with other jobs, OpenMP threads that spin while waiting for a descheduled
# sibling make single steps up to 10x slower at random; passive waiting keeps the measurements
# steady (set before torch starts its thread pool; an explicit setting wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # devtools, as for its siblings

from devtools import harness  # noqa: E402


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled from /proc every 20 ms;
    ``ru_maxrss`` cannot tell a step's peak from the earlier peak of loading the checkpoint)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.start, self.peak = interval, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.current())

    def __enter__(self):
        self.start = self.peak = self.current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def step_functions(mods, host, model, B: int, k: int, lat: int, groups=()) -> tuple[dict, list[torch.Tensor]]:
    """The four measured callables (floor TE, floor UNet, adapter step, a whole Trainer step) over
    one training host; returns them and the learned vectors, one per text encoder (whose ``.grad``
    the caller clears)."""
    prompts, trainer_mod, emb_mod = mods["prompts"], mods["trainer"], mods["embedding"]
    device, dtype = host.device, host.dtype
    encoders = host.text_side.encoders
    unet = model.model.diffusion_model
    batches = {e.key: prompts.build_prompt_batch(e, ["a photo of a <c>"] * B, {"<c>": (0, k)}) for e in encoders}
    vectors = {e.key: e.token_table()[torch.tensor(e.tokenize("cat") * k, device=e.token_table().device)]
               .float().clone().requires_grad_(True) for e in encoders}
    x0 = torch.randn(B, 4, lat, lat, device=device)
    t = torch.full((B,), 500)
    ctx_width = sum(e.width for e in host.text_side.encoders)
    sampling = model.model.model_sampling

    def floor_te():  # every text encoder (SDXL: clip_l and clip_g), each with its own vectors
        loss = 0.0
        for enc in encoders:
            te, batch, vec = enc.module.transformer, batches[enc.key], vectors[enc.key]
            ids, slots = batch.ids.to(vec.device), batch.slots.to(vec.device)
            enc.module.reset_clip_options()
            emb = te.get_input_embeddings()(ids, out_dtype=torch.float32)
            rows = vec.index_select(0, slots.clamp(min=0).flatten()).view_as(emb)
            emb = torch.where((slots >= 0).unsqueeze(-1), rows, emb)
            n = [int(r.tolist().index(enc.eos_id)) + 1 for r in batch.ids]
            out = te(None, None, embeds=emb, num_tokens=n, dtype=torch.float32)
            loss = loss + out[0].float().square().mean()
        loss.backward()

    def floor_unet():
        # The UNet alone, at the adapter's compute dtype and with the patcher's transformer options
        # (so with the trainer's attention choice); SDXL's ADM vector is a random input here.
        ctx = torch.randn(B, 77, ctx_width, device=device, dtype=dtype, requires_grad=True)
        sigma = host.denoiser.sigma(t).to(device)
        xc = sampling.calculate_input(sigma, x0).to(dtype)
        ts = sampling.timestep(sigma).float()
        extra = {}
        if host.denoiser.uses_adm:
            extra["y"] = torch.randn(B, model.model.adm_channels, device=device, dtype=dtype)
        options = dict(model.model_options.get("transformer_options", {}))
        out = unet(xc, ts, context=ctx, transformer_options=options, **extra)
        out.float().square().mean().backward()

    def adapter_step():
        outs = [e.encode(batches[e.key].ids, batches[e.key].slots, vectors[e.key]) for e in encoders]
        cond = host.text_side.combine(outs)
        noise = torch.randn_like(x0)
        eps = host.denoiser.predict_eps(host.denoiser.add_noise(x0, noise, t), t, cond)
        torch.nn.functional.mse_loss(eps, noise).backward()

    concept = trainer_mod.ConceptData(
        emb_mod.LearnedEmbedding("bench", {key: v.detach().clone() for key, v in vectors.items()}, "<c>"),
        x0.detach().clone())
    trainer = trainer_mod.Trainer(host.text_side, host.denoiser, [concept], trainer_mod.TrainConfig(
        steps=10**6, batch_size=B, templates=("a photo of a {}",), flip=False), groups=list(groups))

    def trainer_step():
        trainer.train_step()

    return {"floor_te": floor_te, "floor_unet": floor_unet, "adapter_step": adapter_step,
            "trainer_step": trainer_step}, list(vectors.values())


def pack_modules() -> dict:
    name = harness.PACK_MODULE
    return {m.rsplit(".", 1)[-1]: importlib.import_module(f"{name}.{m}")
            for m in ("nodes.comfy_host", "nodes.comfy_attention", "inversion.data.prompts", "inversion.trainer",
                      "inversion.embedding", "nodes.comfy_lora", "inversion.lora")}


def attention_choice(mods, attention: str):
    """``training_host`` with its attention as asked: ``sdpa`` as the trainer runs, ``comfy`` with
    the SDPA override switched off (ComfyUI's own attention choice)."""
    ch = mods["comfy_host"]
    if attention == "comfy":
        ch.sdpa_attention = lambda model: contextlib.nullcontext(False)
    elif attention != "sdpa":
        raise ValueError(f"--attention: expected comfy, sdpa or both, got {attention!r}")
    return ch.training_host


def measure(args) -> dict:
    if harness.comfyui_path() is None:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    env = harness.boot(tempfile.mkdtemp(prefix="comfy-bench-"))
    harness.import_pack()
    mods = pack_modules()
    training_host = attention_choice(mods, args.attention)
    model, clip, _ = harness.load_checkpoint(env, harness.install_checkpoint(env, harness.sd15_checkpoint()))

    groups = []
    if args.lora == "on":  # as the trainer node: ComfyUI's adapters on a clone, outside inference mode
        model, group = mods["comfy_lora"].lora_clone(model, mods["lora"].LoraSpec(), steps=10**6, seed=0)
        groups.append(group)
    B, k, lat = args.batch, args.vectors, args.size // 8
    torch.manual_seed(0)
    cpu_times: dict[str, list[float]] = {}
    times: dict[str, list[float]] = {}
    with torch.inference_mode():  # as inside a ComfyUI prompt
        with training_host(model, clip) as host:
            fns, vectors = step_functions(mods, host, model, B, k, lat, groups)
            if groups or args.trainer_only:  # the floors and the bare adapter step do not train a LoRA
                fns = {"trainer_step": fns["trainer_step"]}

            def timed(name):
                start, cpu = time.perf_counter(), time.process_time()
                fns[name]()
                for v in vectors:
                    v.grad = None
                cpu_times.setdefault(name, []).append(time.process_time() - cpu)
                return time.perf_counter() - start

            with PeakRSS() as rss:
                for name in fns:  # warm-up
                    timed(name)
                for _ in range(args.reps):
                    for name in fns:
                        times.setdefault(name, []).append(timed(name))
    return {"times": times, "cpu": {k: v[1:] for k, v in cpu_times.items()}, "rss_start": rss.start,
            "rss_peak": rss.peak, "threads": torch.get_num_threads()}


def report(args, r: dict) -> None:
    med = statistics.median
    te_s, unet_s, step_s, trainer_s = (r["times"][k] for k in ("floor_te", "floor_unet", "adapter_step", "trainer_step"))
    # Other processes share the CPU: the minimum is the least disturbed measurement of each part,
    # and each repetition's own ratio compares parts measured seconds apart.
    floor_min = min(te_s) + min(unet_s)
    per_rep = [s / (a + b) for a, b, s in zip(te_s, unet_s, step_s)]
    print(f"SD1.5 random, batch {args.batch}, {args.size}x{args.size}, k={args.vectors}, {args.reps} reps, "
          f"attention {args.attention}, torch threads {r['threads']}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    for label, xs in (("floor TE fwd+bwd", te_s), ("floor UNet fwd+bwd", unet_s), ("adapter step", step_s)):
        print(f"  {label:<20} min {min(xs):.3f} s  median {med(xs):.3f} s  (all: {', '.join(f'{x:.2f}' for x in xs)})")
    print(f"  floor (min TE + min UNet) {floor_min:.3f} s")
    print(f"  ratio adapter/floor: {min(step_s) / floor_min:.3f} (minima), {med(per_rep):.3f} (median of per-rep ratios)")
    print(f"  for information, a whole Trainer.train_step (vanilla): min {min(trainer_s):.3f} s, "
          f"ratio {min(trainer_s) / floor_min:.3f} (minima)")
    # CPU time of this process (all its threads): what other processes cannot inflate as much.
    cpu = r["cpu"]
    if all(cpu.values()):
        cpu_floor = med(cpu["floor_te"]) + med(cpu["floor_unet"])
        print(f"  CPU time (medians): TE {med(cpu['floor_te']):.3f} s, UNet {med(cpu['floor_unet']):.3f} s, "
              f"adapter step {med(cpu['adapter_step']):.3f} s, Trainer.train_step {med(cpu['trainer_step']):.3f} s; "
              f"ratio adapter/floor {med(cpu['adapter_step']) / cpu_floor:.3f}, "
              f"Trainer/floor {med(cpu['trainer_step']) / cpu_floor:.3f}")
    print(f"  resident memory: {r['rss_start'] / 2**30:.2f} GiB with the models loaded, peak during the steps "
          f"{r['rss_peak'] / 2**30:.2f} GiB (+{(r['rss_peak'] - r['rss_start']) / 2**30:.2f})")


def _child(args, attention: str, lora: str = "off", trainer_only: bool = False) -> dict:
    """This benchmark in a subprocess of its own (its peak resident memory its own); its result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--batch", str(args.batch), "--size", str(args.size),
           "--reps", str(args.reps), "--vectors", str(args.vectors), "--attention", attention, "--lora", lora,
           "--json", path] + (["--trainer-only"] if trainer_only else [])
    subprocess.run(cmd, check=True)
    with open(path) as f:
        out = json.load(f)
    os.unlink(path)
    return out


def compare_lora(args) -> None:
    """The Trainer step without and with the LoRA, each in its own process, alternated ``--pairs`` times."""
    runs = {"off": [], "on": []}
    for _ in range(args.pairs):
        for lora in ("off", "on"):
            runs[lora].append(_child(args, "sdpa", lora, trainer_only=True))
    t = {k: min(min(r["times"]["trainer_step"]) for r in v) for k, v in runs.items()}
    mem = {k: min(r["rss_peak"] - r["rss_start"] for r in v) for k, v in runs.items()}
    peak = {k: min(r["rss_peak"] for r in v) for k, v in runs.items()}
    print(f"pivotal tuning's cost, random SD1.5, {args.size} px, batch {args.batch}, k={args.vectors}, {args.reps} "
          f"steps x {args.pairs} process pairs (minima):")
    print(f"  Trainer step: embedding alone {t['off']:.2f} s, with the LoRA (rank 4, attention) {t['on']:.2f} s, "
          f"ratio {t['on'] / t['off']:.2f}")
    print(f"  peak RSS: alone {peak['off'] / 2**30:.2f} GiB (+{mem['off'] / 2**30:.2f} during the steps), with the "
          f"LoRA {peak['on'] / 2**30:.2f} GiB (+{mem['on'] / 2**30:.2f}); ratio of the peaks "
          f"{peak['on'] / peak['off']:.3f}")


def both(args) -> None:
    """Each attention in its own process (a process's memory peak is its own), then the gain."""
    results = {attention: _child(args, attention) for attention in ("comfy", "sdpa")}
    c, s = results["comfy"], results["sdpa"]
    print(f"gain of SDPA over ComfyUI's default attention ({args.size} px, batch {args.batch}; minima):")
    for name, label in (("floor_unet", "UNet fwd+bwd"), ("adapter_step", "adapter step"), ("trainer_step", "Trainer step")):
        a, b = min(c["times"][name]), min(s["times"][name])
        print(f"  {label:<14} comfy {a:.2f} s  sdpa {b:.2f} s  speed-up x{a / b:.2f}")
    gc, gs = c["rss_peak"] - c["rss_start"], s["rss_peak"] - s["rss_start"]
    print(f"  peak RSS during the steps: comfy {c['rss_peak'] / 2**30:.2f} GiB (+{gc / 2**30:.2f} over the loaded "
          f"models), sdpa {s['rss_peak'] / 2**30:.2f} GiB (+{gs / 2**30:.2f}); ratio of the step memory "
          f"{gc / max(gs, 1):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=64, help="image size in pixels (latent = size / 8)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--vectors", type=int, default=2, help="learned vectors (k)")
    ap.add_argument("--attention", choices=("comfy", "sdpa", "both"), default="sdpa",
                    help="the UNet's attention: the trainer's SDPA, ComfyUI's default, or both compared")
    ap.add_argument("--lora", choices=("off", "on", "compare"), default="off",
                    help="pivotal tuning: a LoRA trained with the vectors (compare: without and with, own processes)")
    ap.add_argument("--pairs", type=int, default=2, help="--lora compare: alternated process pairs")
    ap.add_argument("--trainer-only", action="store_true", help=argparse.SUPPRESS)  # compare's children: the same work
    ap.add_argument("--json", help=argparse.SUPPRESS)  # where a child of --attention both writes its result
    args = ap.parse_args()
    if args.lora == "compare":
        compare_lora(args)
        return
    if args.attention == "both":
        both(args)
        return
    r = measure(args)
    if args.lora == "on" or args.trainer_only:
        print(f"{'with' if args.lora == 'on' else 'without'} the LoRA: Trainer step min {min(r['times']['trainer_step']):.3f} s, peak RSS "
              f"{r['rss_peak'] / 2**30:.2f} GiB")
    else:
        report(args, r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f)


if __name__ == "__main__":
    main()
