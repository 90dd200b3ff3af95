"""The pack inside a running ComfyUI server: /object_info, a training workflow over HTTP, Cancel.

The server (``server_process.ComfyServer``) runs ``main.py --cpu`` on 127.0.0.1 with
``--base-directory`` pointing at a temporary folder whose ``custom_nodes/`` links to this
repository, so nothing is written into the ComfyUI checkout. Events are read from the websocket.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from devtools import harness
from devtools import server_process as sp

RUN_TIMEOUT = 900


@pytest.fixture(scope="module")
def server(comfyui, tmp_path_factory):
    srv = sp.ComfyServer(str(tmp_path_factory.mktemp("server-base")))
    srv.install_pack()
    srv.ckpt = srv.link_model(comfyui.harness.sd15_checkpoint())
    concept = os.path.join(srv.base_dir, "input", "concept")
    os.makedirs(concept, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(os.path.join(concept, f"{i}.png"))
    start = time.time()
    srv.start(timeout=240)
    srv.startup_s = time.time() - start
    yield srv
    srv.stop()


def test_every_node_is_registered_with_tooltips(comfyui, server):
    info = server.get("/object_info", timeout=120)
    ours = [n.GET_SCHEMA().node_id for n in comfyui.mod("nodes").NODES]
    missing = [n for n in ours if n not in info]
    assert not missing, f"not in /object_info: {missing}\n{server.log_tail()}"
    for node_id in ours:
        node = info[node_id]
        assert node["python_module"].startswith("custom_nodes."), node_id
        for group in ("required", "optional"):
            for name, spec in node["input"].get(group, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    exts = server.get("/extensions")
    assert any(e.endswith(f"/{sp.PACK_FOLDER}/js/inversion_charts.js") for e in exts), exts


def _workflow(ckpt: str, name: str, steps: int, if_exists: str = "error", checkpoint_every: int = 0) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "InversionLoadConceptImages",
              "inputs": {"folder": "concept", "size": 64, "fit": "crop", "alpha_as_mask": True}},
        "3": {"class_type": "InversionCaptionInit",
              "inputs": {"clip": ["1", 1], "mode": "manual", "text": "a toy", "captioner": "none",
                         "open_clip_model": "none", "labels": "", "choose": -1, "class_word": "",
                         "max_new_tokens": 30}},
        "4": {"class_type": "InversionTrainTextualInversion",
              "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0], "init": ["3", 0],
                         "masks": ["2", 1], "name": name, "method": "adaptive", "steps": steps, "batch_size": 1,
                         "learning_rate": 0.0, "seed": 0, "if_exists": if_exists, "options": ["5", 0]}},
        "5": {"class_type": "InversionTrainingOptions", "inputs": _option_widgets(checkpoint_every=checkpoint_every)},
    }


def _option_widgets(**over) -> dict:
    """Every widget of the Training Options node (an API prompt names them all), defaults unless given."""
    node = importlib.import_module(f"{harness.PACK_MODULE}.nodes.options_nodes").TrainingOptionsNode
    return {**{i.id: i.default for i in node.define_schema().inputs}, **over}


async def _run_prompt(url: str, prompt: dict, interrupt_after_step: int | None = None) -> dict:
    """Queue ``prompt``, collect its websocket messages until it finishes; optionally press Cancel."""
    import aiohttp

    client_id = uuid.uuid4().hex
    events: list[dict] = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url.replace('http', 'ws')}/ws?clientId={client_id}") as ws:
            async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                body = await r.json()
                assert r.status == 200, body
            prompt_id = body["prompt_id"]
            deadline = time.time() + RUN_TIMEOUT
            interrupted = False
            while time.time() < deadline:
                msg = await ws.receive(timeout=RUN_TIMEOUT)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                m = json.loads(msg.data)
                events.append(m)
                data = m.get("data", {})
                if (m["type"] == "inversion.progress" and interrupt_after_step is not None and not interrupted
                        and data.get("step", 0) >= interrupt_after_step):
                    interrupted = True
                    async with session.post(f"{url}/interrupt", json={}) as r:
                        assert r.status == 200
                if data.get("prompt_id") == prompt_id and m["type"] in (
                        "execution_success", "execution_error", "execution_interrupted"):
                    break
            history = {}
            for _ in range(120):  # the history entry is written just after the final message
                async with session.get(f"{url}/history/{prompt_id}") as r:
                    history = (await r.json()).get(prompt_id, {})
                if history.get("status", {}).get("completed") is not None or history.get("outputs"):
                    break
                await asyncio.sleep(0.5)
    return {"events": events, "history": history, "prompt_id": prompt_id}


def test_training_workflow_runs_over_http(server):
    start = time.time()
    res = asyncio.run(_run_prompt(server.url, _workflow(server.ckpt, "served-concept", 3)))
    types_seen = [e["type"] for e in res["events"]]
    assert "execution_success" in types_seen, (types_seen, server.log_tail())
    progress = [e["data"] for e in res["events"] if e["type"] == "inversion.progress"]
    assert [p["step"] for p in progress] == [1, 2, 3]
    assert all(p["node"] == "4" and p["kind"] == "train" and np.isfinite(p["loss"]) for p in progress)
    assert any(e["type"] == "progress" and e["data"].get("node") == "4" for e in res["events"])
    out = res["history"]["outputs"]["4"]
    assert out["inversion_chart"][0]["step"] == [1, 2, 3]
    assert os.path.isfile(os.path.join(server.base_dir, "models", "embeddings", "served-concept.safetensors"))
    print(f"server startup {server.startup_s:.1f} s, 3-step training workflow {time.time() - start:.1f} s")


def test_cancel_over_http_keeps_the_last_good_vectors(comfyui, server):
    res = asyncio.run(_run_prompt(server.url, _workflow(server.ckpt, "served-cancel", 200), interrupt_after_step=1))
    types_seen = [e["type"] for e in res["events"]]
    assert "execution_interrupted" in types_seen, (types_seen, server.log_tail())
    steps = [e["data"]["step"] for e in res["events"] if e["type"] == "inversion.progress"]
    path = os.path.join(server.base_dir, "models", "embeddings", "served-cancel.safetensors")
    saved = comfyui.mod("inversion.files.formats").load_embedding(path)
    # Cancel is honoured at the end of the step in progress: at most one step after the request.
    assert 1 <= int(saved.metadata["steps"]) == steps[-1] <= 3


def test_cancel_never_replaces_an_existing_embedding_and_no_side_file_is_listed(comfyui, server):
    """Issue 17, case 1 and the side files: Cancel in an overwrite run leaves the earlier file as it was;
    the run's state lives in models/inversion_runs and GET /embeddings lists only embeddings."""
    path = os.path.join(server.base_dir, "models", "embeddings", "served-kept.safetensors")
    res = asyncio.run(_run_prompt(server.url, _workflow(server.ckpt, "served-kept", 2, checkpoint_every=1)))
    assert "execution_success" in [e["type"] for e in res["events"]], server.log_tail()
    before = open(path, "rb").read()
    res = asyncio.run(_run_prompt(server.url, _workflow(server.ckpt, "served-kept", 200, "overwrite", 1),
                                  interrupt_after_step=1))
    assert "execution_interrupted" in [e["type"] for e in res["events"]], server.log_tail()
    assert open(path, "rb").read() == before  # the 2-step file, not the cancelled run's 1-step vectors
    warnings = [e["data"]["message"] for e in res["events"] if e["type"] == "inversion.warning"]
    assert any("unchanged" in w and "resume" in w for w in warnings), warnings
    run = os.path.join(server.base_dir, "models", "inversion_runs", "served-kept")
    formats = comfyui.mod("inversion.files.formats")
    assert int(formats.load_embedding(os.path.join(run, "served-kept.safetensors")).metadata["steps"]) >= 1
    assert os.path.isfile(os.path.join(run, "state.safetensors"))
    listed = server.get("/embeddings")
    assert "served-kept" in listed and not [e for e in listed if ".state" in e or "inversion_runs" in e], listed
    embeddings = os.listdir(os.path.dirname(path))
    assert not [f for f in embeddings if f.endswith(".state.safetensors")], embeddings
