"""Cost of one textual-inversion step through the ComfyUI adapter, against the floor.

floor   = UNet forward+backward w.r.t. the context (the raw ``diffusion_model``)
        + text-encoder forward+backward w.r.t. the learned vectors (the raw CLIP transformer on
          token embeddings with the vectors spliced in);
adapter = ``ComfyTextEncoder.encode`` -> ``SimpleTextSide.combine`` -> ``ComfyDenoiser.predict_eps``
          -> eps-MSE -> backward, as the trainer runs it.
Both on the random full-size SD1.5 checkpoint loaded by CheckpointLoaderSimple, in one process,
measured alternately; prints minima, medians and the ratio (minima, and the median of each
repetition's own ratio, since a shared machine disturbs single measurements).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/comfy_step_cost.py [--batch 1] [--size 64] [--reps 7]
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import time

# On a machine shared with other jobs, OpenMP threads that spin while waiting for a descheduled
# sibling make single steps up to 10x slower at random; passive waiting keeps the measurements
# steady (set before torch starts its thread pool; an explicit setting wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # devtools, as for its siblings

from devtools import harness  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=64, help="image size in pixels (latent = size / 8)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--vectors", type=int, default=2, help="learned vectors (k)")
    args = ap.parse_args()

    if harness.comfyui_path() is None:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    env = harness.boot(tempfile.mkdtemp(prefix="comfy-bench-"))
    harness.import_pack()
    ch = importlib.import_module(f"{harness.PACK_MODULE}.nodes.comfy_host")
    prompts = importlib.import_module(f"{harness.PACK_MODULE}.inversion.prompts")
    trainer_mod = importlib.import_module(f"{harness.PACK_MODULE}.inversion.trainer")
    emb_mod = importlib.import_module(f"{harness.PACK_MODULE}.inversion.embedding")
    model, clip, _ = harness.load_checkpoint(env, harness.install_checkpoint(env, harness.sd15_checkpoint()))

    B, k, lat = args.batch, args.vectors, args.size // 8
    torch.manual_seed(0)
    with torch.inference_mode():  # as inside a ComfyUI prompt
        with ch.training_host(model, clip) as host:
            enc = host.text_side.encoders[0]
            unet = model.model.diffusion_model
            te = enc.module.transformer
            table = enc.token_table()
            texts = ["a photo of a <c>"] * B
            batch = prompts.build_prompt_batch(enc, texts, {"<c>": (0, k)})
            vectors = table[torch.tensor(enc.tokenize("cat") * k)].float().clone().requires_grad_(True)
            x0 = torch.randn(B, 4, lat, lat)
            t = torch.full((B,), 500)

            def floor_te():
                _ = enc.module.reset_clip_options()
                emb = te.get_input_embeddings()(batch.ids, out_dtype=torch.float32)
                mask = (batch.slots >= 0).unsqueeze(-1)
                rows = vectors.index_select(0, batch.slots.clamp(min=0).flatten()).view_as(emb)
                emb = torch.where(mask, rows, emb)
                n = [int(r.tolist().index(enc.eos_id)) + 1 for r in batch.ids]
                out = te(None, None, embeds=emb, num_tokens=n, dtype=torch.float32)
                out[0].float().square().mean().backward()

            def floor_unet():
                ctx = torch.randn(B, 77, 768, requires_grad=True)
                sigma = host.denoiser.sigma(t)
                xc = model.model.model_sampling.calculate_input(sigma, x0)
                ts = model.model.model_sampling.timestep(sigma).float()
                out = unet(xc, ts, context=ctx)
                out.float().square().mean().backward()

            def adapter_step():
                outs = [e.encode(batch.ids, batch.slots, vectors) for e in host.text_side.encoders]
                cond = host.text_side.combine(outs)
                noise = torch.randn_like(x0)
                eps = host.denoiser.predict_eps(host.denoiser.add_noise(x0, noise, t), t, cond)
                torch.nn.functional.mse_loss(eps, noise).backward()

            concept = trainer_mod.ConceptData(
                emb_mod.LearnedEmbedding("bench", {enc.key: vectors.detach().clone()}, "<c>"), x0.clone())
            trainer = trainer_mod.Trainer(host.text_side, host.denoiser, [concept], trainer_mod.TrainConfig(
                steps=10**6, batch_size=B, templates=("a photo of a {}",), flip=False))

            def trainer_step():
                trainer.train_step()

            cpu_times: dict[str, list[float]] = {}

            def timed(fn):
                start, cpu = time.perf_counter(), time.process_time()
                fn()
                vectors.grad = None
                cpu_times.setdefault(fn.__name__, []).append(time.process_time() - cpu)
                return time.perf_counter() - start

            for fn in (floor_te, floor_unet, adapter_step, trainer_step):  # warm-up
                timed(fn)
            te_s, unet_s, step_s, trainer_s = [], [], [], []
            for _ in range(args.reps):
                te_s.append(timed(floor_te))
                unet_s.append(timed(floor_unet))
                step_s.append(timed(adapter_step))
                trainer_s.append(timed(trainer_step))

    med = statistics.median
    # Other processes share the CPU: the minimum is the least disturbed measurement of each part,
    # and each repetition's own ratio compares parts measured seconds apart.
    floor_min = min(te_s) + min(unet_s)
    per_rep = [s / (a + b) for a, b, s in zip(te_s, unet_s, step_s)]
    print(f"SD1.5 random, batch {B}, {args.size}x{args.size}, k={k}, {args.reps} reps, torch threads "
          f"{torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    for label, xs in (("floor TE fwd+bwd", te_s), ("floor UNet fwd+bwd", unet_s), ("adapter step", step_s)):
        print(f"  {label:<20} min {min(xs):.3f} s  median {med(xs):.3f} s  (all: {', '.join(f'{x:.2f}' for x in xs)})")
    print(f"  floor (min TE + min UNet) {floor_min:.3f} s")
    print(f"  ratio adapter/floor: {min(step_s) / floor_min:.3f} (minima), {med(per_rep):.3f} (median of per-rep ratios)")
    print(f"  for information, a whole Trainer.train_step (vanilla): min {min(trainer_s):.3f} s, "
          f"ratio {min(trainer_s) / floor_min:.3f} (minima)")
    # CPU time of this process (all its threads): what other processes cannot inflate as much.
    cpu = {k: v[1:] for k, v in cpu_times.items()}  # drop the warm-up
    cpu_floor = med(cpu["floor_te"]) + med(cpu["floor_unet"])
    print(f"  CPU time (medians): TE {med(cpu['floor_te']):.3f} s, UNet {med(cpu['floor_unet']):.3f} s, "
          f"adapter step {med(cpu['adapter_step']):.3f} s, Trainer.train_step {med(cpu['trainer_step']):.3f} s; "
          f"ratio adapter/floor {med(cpu['adapter_step']) / cpu_floor:.3f}, "
          f"Trainer/floor {med(cpu['trainer_step']) / cpu_floor:.3f}")


if __name__ == "__main__":
    main()
