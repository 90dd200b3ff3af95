"""Reduced precision through the real ComfyUI, on the CPU: ComfyUI's own precision flags, an fp16 / bf16
UNet, dynamic loss scaling, and UNet gradient checkpointing.

What ComfyUI 0.3.64 does with its precision flags on the CPU (``comfy/model_management.py``):
- ``--fp16-unet`` / ``--bf16-unet`` / ``--fp32-unet`` choose the UNet's *weight* dtype (``unet_dtype``),
  but ``unet_manual_cast`` then returns fp32, because ``should_use_fp16`` / ``should_use_bf16`` are
  False for a CPU device: every layer casts its weights to fp32 per forward, the UNet computes in fp32.
- ``--fp16-text-enc`` / ``--bf16-text-enc`` / ``--fp32-text-enc`` choose the text encoder's weight dtype
  (``text_encoder_dtype``; fp16 is already the CPU default); ``sd1_clip`` runs the CLIP transformer in
  fp32 (``dtype=torch.float32``) whatever the weights are, on every device.
So on the CPU the flags change storage, never compute. An fp16 / bf16 UNet *computes* on the CPU when
the MODEL's compute dtype is set (``ModelPatcher.set_model_compute_dtype``, what ComfyUI's LoRA trainer
does with its training dtype; ``nodes.comfy_host.with_compute_dtype``): fp16 / bf16 kernels then run
for real, which is what these tests exercise.
"""

from __future__ import annotations

import gc
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from devtools import harness

TIMESTEPS = (50, 400, 900)
SIZE = 64


def _mods(comfyui):
    return (comfyui.mod("nodes.comfy_host"), comfyui.mod("inversion.trainer"), comfyui.mod("inversion.methods.init"),
            comfyui.mod("inversion.methods.timesteps"))


@pytest.fixture(scope="module")
def fresh(comfyui):
    """Tiny SD2-v and SDXL objects of this module's own (compute-dtype clones patch the shared BaseModel)."""
    emb_dirs = comfyui.folder_paths.get_folder_paths("embeddings")
    return {"sd2": harness.tiny_sd2(emb_dirs, seed=11), "sdxl": harness.tiny_sdxl(emb_dirs, seed=12)}


def _images(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, SIZE, SIZE, generator=g)


class _DtypeSpy:
    """The input dtype of the first Linear a forward pass reaches in ``module``."""

    def __init__(self, module):
        self.seen = []
        self.layer = next(m for m in module.modules() if isinstance(m, torch.nn.Linear))
        self.handle = self.layer.register_forward_hook(lambda m, i, o: self.seen.append(i[0].dtype))

    def close(self):
        self.handle.remove()


def _trainer(comfyui, host, vae_model, vae, *, t=400, steps=1, loss_scale="none", autocast=None, seed=0):
    ch, tr_mod, init, timesteps = _mods(comfyui)
    emb = init.make_embedding(host.text_side, "toy", init_word="toy", k=2)
    concept = tr_mod.prepare_concept(ch.ComfyLatentEncoder(vae, vae_model), _images(), emb, flip=False)
    config = tr_mod.TrainConfig(steps=steps, batch_size=2, seed=seed, lr=1e-3, loss_scale=loss_scale,
                                autocast_dtype=autocast, norm_warn=0, norm_stop=0)
    return tr_mod.Trainer(host.text_side, host.denoiser, [concept], config,
                          timesteps=timesteps.Single(t, host.denoiser.num_timesteps))


def _step_grads(comfyui, model, clip, vae, precision, t):
    """The learned vectors' (unscaled) gradients of one training step at timestep ``t``, the UNet in
    ``precision``, with the loss scaling ``training_precision`` picks for it; same draws every call."""
    ch = comfyui.mod("nodes.comfy_host")
    m = ch.with_compute_dtype(model, precision)
    with ch.training_host(m, clip) as host:
        autocast, loss_scale = ch.training_precision(host, "auto")
        spy = _DtypeSpy(m.model.diffusion_model)
        tr = _trainer(comfyui, host, m, vae, t=t, loss_scale=loss_scale, autocast=autocast)
        info = tr.train_step()
        spy.close()
        return host.dtype, spy.seen[0], loss_scale, info, {k: p.grad.detach().clone() for k, p in tr.params.items()}


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_comfy_precision_flags_on_cpu_set_storage_not_compute(comfyui, monkeypatch):
    """--fp16-unet and --bf16-text-enc on a fresh SD1.5 load: fp16 UNet weights, bf16 text-encoder
    weights, both computing in fp32 on the CPU; then an fp16 compute dtype makes the UNet run fp16."""
    import comfy.cli_args
    import comfy.model_management

    ch = comfyui.mod("nodes.comfy_host")
    Conditioning = comfyui.mod("inversion.host").Conditioning

    monkeypatch.setattr(comfy.cli_args.args, "fp16_unet", True)  # restored after the test
    monkeypatch.setattr(comfy.cli_args.args, "bf16_text_enc", True)
    name = harness.install_checkpoint(comfyui, harness.sd15_checkpoint())
    model, clip, vae = harness.load_checkpoint(comfyui, name)
    try:
        unet = model.model.diffusion_model
        assert model.model.get_dtype() == torch.float16
        assert {p.dtype for p in unet.parameters()} == {torch.float16}
        assert model.model.manual_cast_dtype == torch.float32  # ComfyUI's manual cast: fp32 compute on the CPU
        te_linear = next(m for m in clip.cond_stage_model.modules() if isinstance(m, torch.nn.Linear))
        assert te_linear.weight.dtype == torch.bfloat16
        for m, expect in ((model, torch.float32), (ch.with_compute_dtype(model, "fp16"), torch.float16)):
            unet_spy, te_spy = _DtypeSpy(m.model.diffusion_model), _DtypeSpy(clip.cond_stage_model)
            with ch.training_host(m, clip) as host, torch.no_grad():
                assert host.dtype == expect
                assert ch.training_precision(host, "auto") == (("fp16", "dynamic") if expect == torch.float16
                                                               else (None, "none"))
                enc = host.text_side.encoders[0]
                ids = torch.tensor([[enc.bos_id, 320, enc.eos_id] + [enc.pad_id] * (enc.max_length - 3)])
                out = enc.encode(ids, torch.full_like(ids, -1), torch.zeros(1, enc.width))
                t = torch.tensor([400])
                x = host.denoiser.add_noise(torch.zeros(1, 4, 8, 8), torch.randn(1, 4, 8, 8), t)
                eps = host.denoiser.predict_eps(x, t, Conditioning(out.hidden, out.pooled))
            unet_spy.close()
            te_spy.close()
            assert torch.isfinite(eps).all() and eps.dtype == torch.float32
            assert unet_spy.seen[0] == expect  # what the UNet's layers really computed in
            assert te_spy.seen[0] == torch.float32  # the CLIP transformer: fp32 whatever its weights
    finally:
        comfy.model_management.unload_all_models()
        del model, clip, vae
        gc.collect()


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_fp16_and_bf16_gradients_match_fp32(comfyui, fresh, family):
    model, clip, vae = fresh[family]
    for t in TIMESTEPS:
        dt32, seen32, _, _, ref = _step_grads(comfyui, model, clip, vae, "fp32", t)
        assert dt32 == seen32 == torch.float32
        for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            dt, seen, loss_scale, info, grads = _step_grads(comfyui, model, clip, vae, precision, t)
            assert dt == seen == dtype, (precision, dt, seen)
            assert loss_scale == ("dynamic" if precision == "fp16" else "none")
            assert not info.skipped and info.timesteps == [t, t]
            for k, g in grads.items():
                assert torch.isfinite(g).all()
                cos = _cos(g, ref[k])
                assert cos >= 0.99, (family, precision, t, k, cos)


def test_fp16_overflow_skips_steps_halves_then_trains_and_grows(comfyui, fresh):
    """An absurd initial scale overflows the fp16 UNet's backward for real: those steps change nothing
    and halve the scale until it fits, then training proceeds and the scale grows back by the rule."""
    ch = comfyui.mod("nodes.comfy_host")
    model, clip, vae = fresh["sd2"]
    m = ch.with_compute_dtype(model, "fp16")
    with ch.training_host(m, clip) as host:
        assert host.dtype == torch.float16
        tr = _trainer(comfyui, host, m, vae, steps=14, loss_scale="dynamic", autocast="fp16")
        tr.scaler.scale = 2.0 ** 30  # fp16's largest value is 65504: the scaled gradients cannot fit
        tr.scaler.growth_interval = 2
        infos, vectors = [], [tr.params["clip_h"].detach().clone()]

        def cb(info):
            infos.append(info)
            vectors.append(tr.params["clip_h"].detach().clone())

        tr.run(cb)
    skipped = [i.skipped for i in infos]
    assert skipped[0] and not all(skipped), skipped
    first_good = skipped.index(False)
    scale, good = 2.0 ** 30, 0
    for i, info in enumerate(infos):  # the rule, step by step
        if info.skipped:
            scale, good = scale / 2, 0
            assert torch.equal(vectors[i + 1], vectors[i])  # nothing changed
        else:
            good += 1
            if good == 2:
                scale, good = scale * 2, 0
            assert not torch.equal(vectors[i + 1], vectors[i])
        assert info.loss_scale == scale and math.isfinite(info.loss)
    assert any(b.loss_scale > a.loss_scale for a, b in zip(infos[first_good:], infos[first_good + 1:]))  # it grew
    assert sum(len(i.warnings) for i in infos) == 1 and "skipped" in infos[0].warnings[0]
    assert all(torch.isfinite(v).all() for v in vectors)


def test_fp32_never_overflows_at_the_same_scale(comfyui, fresh):
    """The control: in fp32 the same absurd scale fits, so the skips above are fp16's range."""
    ch = comfyui.mod("nodes.comfy_host")
    model, clip, vae = fresh["sd2"]
    with ch.training_host(model, clip) as host:
        assert host.dtype == torch.float32
        tr = _trainer(comfyui, host, model, vae, steps=2, loss_scale="dynamic")
        tr.scaler.scale = 2.0 ** 30
        infos = []
        tr.run(infos.append)
    assert [i.skipped for i in infos] == [False, False]


def test_node_run_with_skipped_fp16_steps_writes_finite_vectors(comfyui, fresh, monkeypatch, toasts):
    """Train Textual Inversion on an fp16 MODEL ("auto" precision: dynamic loss scaling) whose first steps
    overflow: the run finishes, the user is told once, and the file holds finite vectors."""
    ch = comfyui.mod("nodes.comfy_host")
    nodes = {n.__name__: n for n in comfyui.mod("nodes").NODES}
    monkeypatch.setattr(comfyui.mod("inversion.trainer").DynamicLossScale, "INIT_SCALE", 2.0 ** 26)
    model, clip, vae = fresh["sd2"]
    init = harness.run_node(nodes["CaptionInit"], clip=clip, mode="manual", text="a toy")[0]
    name = "fp16-skips"
    images = _images().movedim(1, -1)
    out = harness.run_node(nodes["TrainTextualInversion"], **harness.train_inputs(
        model=ch.with_compute_dtype(model, "fp16"), clip=clip, vae=vae, init=init, name=name, method="vanilla",
        steps=8, learning_rate=5e-3, batch_size=1, seed=0, if_exists="overwrite", images=images,
        checkpoint_every=0, precision="auto"))
    warned = [p["message"] for e, p in toasts if "skipped" in str(p.get("message", ""))]
    assert len(warned) == 1 and "fp16" in warned[0]
    emb = out.args[0]
    assert all(torch.isfinite(v).all() for v in emb.vectors.values())
    saved = load_file(os.path.join(comfyui.embeddings_dir, f"{name}.safetensors"))
    assert saved and all(torch.isfinite(v).all() for v in saved.values())


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_gradient_checkpointing_keeps_gradients_and_is_removed(comfyui, fresh, family):
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    ch = comfyui.mod("nodes.comfy_host")
    model, clip, vae = fresh[family]
    unet = model.model.diffusion_model
    block = next(m for m in unet.modules() if isinstance(m, BasicTransformerBlock))
    calls = []
    hook = block.attn2.register_forward_hook(lambda *a: calls.append(1))  # counts recomputations too
    try:
        with ch.training_host(model, clip) as host:
            plain = _trainer(comfyui, host, model, vae, t=400)
            plain.train_step()
            n_plain = len(calls)
            with ch.gradient_checkpointing(model) as n:
                assert n == sum(isinstance(m, (ResBlock, BasicTransformerBlock)) for m in unet.modules()) > 0
                ckpt = _trainer(comfyui, host, model, vae, t=400)
                calls.clear()
                ckpt.train_step()
                n_ckpt = len(calls)
            restored = not any("forward" in m.__dict__ for m in unet.modules())
    finally:
        hook.remove()
    assert restored
    assert n_plain == 1 and n_ckpt == 2  # one forward, plus its recomputation in backward
    for k, p in plain.params.items():
        torch.testing.assert_close(ckpt.params[k].grad, p.grad, rtol=1e-5, atol=1e-5)
