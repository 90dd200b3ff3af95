"""N concepts in one run (Add Concept nodes into the trainer) against N separate runs, wall clock.

Both go through the nodes as a graph runs them (``TrainTextualInversion.execute`` inside the
inference mode of a prompt), on a random full-size SD1.5 checkpoint (``devtools.harness``) loaded by
CheckpointLoaderSimple, with the same work per concept: ``--steps`` steps of ``batch_size`` 1 each,
i.e. one run of N concepts makes ``--steps`` steps whose UNet batch holds one image of each concept
(N), and the separate runs make N x ``--steps`` steps of batch 1. Every run includes what a queued
prompt pays: encoding the images with the VAE, preparing the model for gradients, writing the files.
The two are measured alternately (``--reps`` times, the order swapped each time); prints each
repetition's times and ratio (separate / together), their median and their range.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/multi_concept.py [--concepts 3] [--steps 4] [--reps 3]
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see comfy_step_cost.py

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # devtools, as for its siblings

from devtools import harness  # noqa: E402


def _images(seed: int, size: int) -> torch.Tensor:
    return torch.rand(2, size, size, 3, generator=torch.Generator().manual_seed(seed))


class Bench:
    """The booted ComfyUI, the pack's nodes, the model, and one concept's inputs per index."""

    def __init__(self, size: int, model: str):
        if harness.comfyui_path() is None:
            raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout")
        self.env = harness.boot(tempfile.mkdtemp(prefix="comfy-bench-"))
        harness.import_pack()
        self.nodes = {n.__name__: n for n in importlib.import_module(f"{harness.PACK_MODULE}.nodes").NODES}
        if model == "sd15":
            self.model, self.clip, self.vae = harness.load_checkpoint(
                self.env, harness.install_checkpoint(self.env, harness.sd15_checkpoint()))
        else:
            self.model, self.clip, self.vae = harness.tiny_sd2(
                self.env.folder_paths.get_folder_paths("embeddings"))
        self.size = size
        self.init = harness.run_node(self.nodes["CaptionInit"], clip=self.clip, mode="manual", text="a toy")[0]

    def _train(self, name: str, seed: int, steps: int, concepts=None) -> None:
        inputs = dict(model=self.model, clip=self.clip, vae=self.vae, init=self.init, name=name, method="vanilla",
                      steps=steps, learning_rate=0.0, batch_size=1, seed=0, if_exists="overwrite",
                      images=_images(seed, self.size))
        if concepts is not None:
            inputs["concepts"] = concepts
        harness.run_node(self.nodes["TrainTextualInversion"], **inputs)

    def together(self, n: int, steps: int) -> float:
        """One run of ``n`` concepts (the trainer's own and n - 1 Add Concept nodes); seconds."""
        t0 = time.perf_counter()
        chain = None
        for i in range(1, n):
            extra = {} if chain is None else {"concepts": chain}
            chain = harness.run_node(self.nodes["AddConcept"], init=self.init, name=f"joint-{i}",
                                     images=_images(i, self.size), **extra)[0]
        self._train("joint-0", 0, steps, chain)
        return time.perf_counter() - t0

    def separate(self, n: int, steps: int) -> float:
        """``n`` runs of one concept each; seconds."""
        t0 = time.perf_counter()
        for i in range(n):
            self._train(f"alone-{i}", i, steps)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="steps per concept (batch 1 per concept)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", type=int, default=64, help="image size in pixels")
    ap.add_argument("--model", choices=("sd15", "tiny-sd2"), default="sd15")
    args = ap.parse_args()
    bench = Bench(args.size, args.model)
    bench.together(args.concepts, 1)  # warm-up: first-call costs (attention patching, allocator) out of the timing
    bench.separate(1, 1)
    ratios = []
    print(f"{args.concepts} concepts x {args.steps} steps, batch 1 per concept, {args.model} at {args.size} px, "
          f"torch threads {torch.get_num_threads()}")
    for r in range(args.reps):
        if r % 2 == 0:
            joint, alone = bench.together(args.concepts, args.steps), bench.separate(args.concepts, args.steps)
        else:
            alone, joint = bench.separate(args.concepts, args.steps), bench.together(args.concepts, args.steps)
        ratios.append(alone / joint)
        print(f"rep {r + 1}: one run {joint:.1f} s, {args.concepts} separate runs {alone:.1f} s, "
              f"ratio {alone / joint:.2f}", flush=True)
    print(f"separate / one run: median {statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f} "
          f"over {len(ratios)} repetitions")


if __name__ == "__main__":
    main()
