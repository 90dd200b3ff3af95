"""Cost of one training step relative to its floor, measured in one run.

floor = text-encoder forward+backward w.r.t. the learned vectors + denoiser forward+backward
w.r.t. the context, at the same batch, with latents, timesteps, noise and token ids prepared in
advance. step = ``Trainer.train_step`` (prompt sampling, tokenisation, encoding, loss, Eq. 4
gradient norms, sampler feedback, optimiser, bookkeeping). Also printed: the adaptive sampler's
bookkeeping as a share of a step, and a 20-bin gradient profile against 20 training steps.

    python benchmarks/step_cost.py --size small --batch 1 4
Sizes: tiny (seconds), small (a scaled-down SD: 12-layer 512-d CLIP, 2-level UNet at 32x32
latents), sd15 (SD1.5's real CLIP-L and UNet shapes at 64x64 px = 8x8 latents; random weights).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from inversion.host import SimpleTextSide  # noqa: E402
from inversion.hosts.hf import HFTextEncoder, ScheduledDenoiser, make_clip_tokenizer, unet_fn  # noqa: E402
from inversion.methods.init import make_embedding  # noqa: E402
from inversion.methods.presets import MethodParams, build_method  # noqa: E402
from inversion.methods.profiler import profile_gradients  # noqa: E402
from inversion.data.prompts import OBJECT_TEMPLATES, build_prompt_batch  # noqa: E402
from inversion.schedule import DDPMSchedule  # noqa: E402
from inversion.trainer import ConceptData, TrainConfig, Trainer  # noqa: E402

SIZES = {
    # text: (width, layers, heads); unet: diffusers UNet2DConditionModel kwargs; latent: (C, h)
    "tiny": ((64, 2, 4), dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                              attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8), (4, 16)),
    "small": ((512, 12, 8), dict(block_out_channels=(128, 256), layers_per_block=2, cross_attention_dim=512,
                                 attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")), (4, 32)),
    "sd15": ((768, 12, 12), dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                                 attention_head_dim=8), (4, 8)),
}

WORDS = sorted({w for t in OBJECT_TEMPLATES for w in t.replace("{}", "").split()} | {"toy", "cat"})


def build(size: str):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    (w, layers, heads), unet_kw, (c, h) = SIZES[size]
    tok = make_clip_tokenizer(WORDS, tempfile.mkdtemp())
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408 if size != "tiny" else len(tok), hidden_size=w,
                                      intermediate_size=4 * w, num_hidden_layers=layers, num_attention_heads=heads,
                                      max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    te.eval().requires_grad_(False)
    unet = UNet2DConditionModel(sample_size=h, in_channels=c, out_channels=c, **unet_kw).eval().requires_grad_(False)
    text = SimpleTextSide([HFTextEncoder(te, tok, "clip_l")])
    den = ScheduledDenoiser(unet_fn(unet), DDPMSchedule.make(1000))
    return text, den, (c, h)


def median_time(fn, n: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=8, help="timed repetitions (median reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    text, den, (c, h) = build(args.size)
    enc = text.encoders[0]
    print(f"size={args.size} threads={torch.get_num_threads()}")
    print(f"{'batch':>5} {'floor s':>9} {'step s':>9} {'step/floor':>10} {'adaptive %':>10} {'profile/steps':>13}")
    for B in args.batch:
        emb = make_embedding(text, "toy", init_word="toy", k=2)
        lat = torch.randn(8, c, h, h)
        concept = ConceptData(emb, lat)
        m = build_method("adaptive", text, 1000, MethodParams())
        tr = Trainer(text, den, [concept], TrainConfig(steps=10**6, batch_size=B), timesteps=m.sampler,
                     optimizer=m.optimizer)

        # The floor: the same model work with everything prepared in advance.
        prompts = [OBJECT_TEMPLATES[i % len(OBJECT_TEMPLATES)].format("<toy>") for i in range(B)]
        pb = build_prompt_batch(enc, prompts, {"<toy>": (0, 2)})
        vec = emb.vectors["clip_l"].clone().requires_grad_(True)
        x0 = lat[:B]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (B,))
        x_t = den.add_noise(x0, noise, t)

        def floor():
            vec.grad = None
            cond = text.combine([enc.encode(pb.ids, pb.slots, vec)])
            loss = ((den.predict_eps(x_t, t, cond) - noise) ** 2).mean()
            loss.backward()

        # Interleave floor and step measurements so machine noise hits both alike.
        f_times, s_times = [], []
        floor(), tr.train_step()
        for _ in range(args.steps):
            f_times.append(median_time(floor, 1, warmup=0))
            s_times.append(median_time(tr.train_step, 1, warmup=0))
        f, s = statistics.median(f_times), statistics.median(s_times)

        # Adaptive bookkeeping: sample + observe, as a share of a step.
        g = torch.Generator().manual_seed(0)
        tt = m.sampler.sample(B, g)
        gg = torch.rand(B)
        book = median_time(lambda: (m.sampler.observe(tt, gg), m.sampler.sample(B, g)), 200, warmup=5)

        # A 20-bin profile (samples_per_bin = B, so 20 batches) against 20 training steps.
        t0 = time.perf_counter()
        profile_gradients(text, den, [concept], bins=20, samples_per_bin=B, batch_size=B)
        prof = time.perf_counter() - t0
        print(f"{B:>5} {f:>9.3f} {s:>9.3f} {s / f:>10.3f} {100 * book / s:>9.2f}% {prof / (20 * s):>13.3f}")


if __name__ == "__main__":
    main()
