"""Files the command line writes (issue 26) in a real ComfyUI: the pack's Load Embedding reads them, and
ComfyUI's own ``embedding:`` route splices them into a prompt."""

from __future__ import annotations

import json
import os

import torch

from devtools import harness


def test_a_command_line_file_loads_in_load_embedding_and_through_embedding_syntax(comfyui, sdxl, tmp_path):
    import comfy.sd1_clip

    from inversion.cli.run import main
    from tiny_models import tiny_sd_pipeline_folder

    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 120, 200)).save(images / f"{i}.png")
    pipe = tiny_sd_pipeline_folder(str(tmp_path / "model"))
    cfg = tmp_path / "run.json"  # the JSON form of a config; out = ComfyUI's models/embeddings
    cfg.write_text(json.dumps({"model": pipe, "out": comfyui.embeddings_dir,
                               "concepts": [{"name": "cli-cat", "images": str(images), "init_text": "a grey cat",
                                             "steps": 2, "size": 32}]}))
    assert main([str(cfg), "--quiet", "--threads", "1"]) == 0
    assert os.path.isfile(os.path.join(comfyui.embeddings_dir, "cli-cat.safetensors"))
    nodes = {n.__name__: n for n in comfyui.mod("nodes").NODES}
    comfyui.folder_paths.filename_list_cache.clear()
    emb = harness.run_node(nodes["LoadEmbedding"], file="cli-cat.safetensors").args[0]
    assert emb.name == "cli-cat" and emb.vectors["clip_l"].shape == (3, 32)
    raw = comfy.sd1_clip.load_embed("cli-cat", [comfyui.embeddings_dir], 32, "clip_l")
    torch.testing.assert_close(raw.float(), emb.vectors["clip_l"])
    with torch.inference_mode():  # SDXL's clip_l is 32 wide in the tiny model: the file's vectors reach it
        (with_emb,) = comfyui.nodes.CLIPTextEncode().encode(sdxl.clip, "a photo of embedding:cli-cat")
        (dropped,) = comfyui.nodes.CLIPTextEncode().encode(sdxl.clip, "a photo of")  # a missing file's prompt
    assert (with_emb[0][0][..., :32] - dropped[0][0][..., :32]).abs().max() > 1e-4
