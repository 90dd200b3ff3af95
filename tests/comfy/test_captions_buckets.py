"""Per-image captions and aspect buckets through ComfyUI: Load Concept Images' dataset output, the
training nodes' ``concept_data`` and the library trainer on the tiny SD2 model (real ComfyUI objects)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from devtools import harness

SIZE = 128  # buckets at 128: sides multiples of 16, e.g. 128x128, 176x96, 96x176


def _write(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    g = np.random.default_rng(0)
    for name, (h, w) in {"a_square": (128, 128), "b_wide": (100, 180), "c_tall": (190, 100)}.items():
        Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, f"{name}.png"))
    with open(os.path.join(folder, "a_square.txt"), "w", encoding="utf-8") as f:
        f.write("a photo of [name],\nred")
    with open(os.path.join(folder, "b_wide.txt"), "w", encoding="utf-8") as f:
        f.write("blue stripes, outdoors")  # no marker: the concept goes first
    with open(os.path.join(folder, "orphan.txt"), "w", encoding="utf-8") as f:
        f.write("a caption without its image")


def test_captions_and_buckets_reach_training(comfyui, sd2, toasts):
    nodes = {n.__name__: n for n in comfyui.mod("nodes").NODES}
    folder = os.path.join(comfyui.folder_paths.get_input_directory(), "captions-buckets")
    _write(folder)
    out = harness.run_node(nodes["LoadConceptImages"], "5", folder="captions-buckets", size=SIZE, fit="bucket",
                           alpha_as_mask=True)
    images, masks, count, ds = out.args
    assert count == 3 and images.shape == (3, SIZE, SIZE, 3) and masks.shape == (3, SIZE, SIZE)  # previews: square
    assert ds.sizes() == [(128, 128), (96, 176), (176, 96)] and ds.names[1] == "b_wide.png"
    assert ds.captions == ["a photo of [name], red", "blue stripes, outdoors", None]
    warned = " ".join(str(p) for _, p in toasts)
    assert "no [name] or {} marker" in warned and "b_wide.txt" in warned and "orphan.txt" in warned
    before = nodes["LoadConceptImages"].fingerprint_inputs(folder="captions-buckets")
    with open(os.path.join(folder, "a_square.txt"), "a", encoding="utf-8") as f:
        f.write(", edited")
    assert nodes["LoadConceptImages"].fingerprint_inputs(folder="captions-buckets") != before  # a caption edit reloads

    training = comfyui.mod("nodes.training_nodes")
    init = harness.run_node(nodes["CaptionInit"], clip=sd2.clip, mode="manual", text="a toy")[0]
    with pytest.raises(ValueError, match="images / dataset"):
        training.concept_data(sd2.model, sd2.clip, sd2.vae, init, "capbucket")
    with torch.inference_mode():  # as inside a prompt
        concept = training.concept_data(sd2.model, sd2.clip, sd2.vae, init, "capbucket", dataset=ds,
                                        images=images)  # the dataset wins
    assert [tuple(t.shape[-2:]) for t in concept.tables()] == [(16, 16), (12, 22), (22, 12)]
    assert concept.captions[:2] == ["a photo of <capbucket>, red", "a photo of <capbucket>, red"]
    assert concept.captions[2] == "<capbucket>, blue stripes, outdoors" and concept.captions[4] is None

    trainer_mod = comfyui.mod("inversion.trainer")
    host_mod = comfyui.mod("nodes.comfy_host")
    seen: list[tuple[tuple[int, int], list[str]]] = []
    with torch.inference_mode(), host_mod.training_host(sd2.model, sd2.clip) as host:
        tr = trainer_mod.Trainer(host.text_side, host.denoiser, [concept],
                                 trainer_mod.TrainConfig(steps=8, batch_size=2, seed=1, lr=1e-2))
        draw = tr.data.draw

        def recording(gen, batch_size, timesteps):
            d = draw(gen, batch_size, timesteps)
            seen.append((tuple(d.x0.shape[-2:]), d.prompts))
            return d

        tr.data.draw = recording
        res = tr.run()
    assert res.steps_done == 8 and all(math.isfinite(x) for x in res.history.loss)
    prompts = {p for _, ps in seen for p in ps}
    assert prompts & {"a photo of <capbucket>, red", "<capbucket>, blue stripes, outdoors"}  # the captions trained
    assert len({shape for shape, _ in seen}) >= 2  # more than one bucket, each micro-batch of one shape
    assert not torch.equal(res.embedding.vectors["clip_h"], init.vectors["clip_h"])
