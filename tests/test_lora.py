"""The library's LoRA group (peft) on a tiny diffusers UNet: trained beside the vectors, resumed exactly,
written in kohya's layout with the meaning loaders give it, and removable."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("peft")

from inversion.files.checkpoint import load_state, save_checkpoint  # noqa: E402
from inversion.host import SimpleTextSide  # noqa: E402
from inversion.hosts.hf import HFTextEncoder, ScheduledDenoiser, VAELatents, unet_fn  # noqa: E402
from inversion.lora import LoraGroup, LoraSpec, kohya_key, lora_targets  # noqa: E402
from inversion.methods.init import make_embedding  # noqa: E402
from inversion.schedule import DDPMSchedule  # noqa: E402
from inversion.trainer import TrainConfig, Trainer, prepare_concept  # noqa: E402
from tiny_models import tiny_sd_components  # noqa: E402


@pytest.fixture
def parts(tmp_path):
    p = tiny_sd_components(str(tmp_path / "tok"))
    p["text_encoder"].requires_grad_(False)
    return p


def _run(parts, steps, spec=LoraSpec(rank=2, alpha=2.0, lr=1e-2), resume=None, stop_after=None):
    unet = copy.deepcopy(parts["unet"]).requires_grad_(False)
    group = LoraGroup(unet, spec, steps, seed=3)
    text = SimpleTextSide([HFTextEncoder(parts["text_encoder"], parts["tokenizer"], "clip_l")])
    den = ScheduledDenoiser(unet_fn(unet), DDPMSchedule.make(1000))
    emb = make_embedding(text, "cat", init_word="cat", k=2)
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    concept = prepare_concept(VAELatents(parts["vae"]), images, emb)
    tr = Trainer(text, den, [concept], TrainConfig(steps=steps, batch_size=2, seed=4, lr=5e-2), groups=[group],
                 resume=resume)
    infos = []
    tr.run(lambda info: infos.append(info) or (stop_after is None or info.step < stop_after))
    return tr, group, unet, infos


def test_the_lora_trains_beside_the_vectors_and_nothing_else_moves(parts):
    base = {k: v.clone() for k, v in parts["unet"].state_dict().items()}
    table = parts["text_encoder"].get_input_embeddings().weight.detach().clone()
    tr, group, unet, infos = _run(parts, 6)
    assert all(i.groups["lora"]["lr"] == 1e-2 for i in infos) and infos[-1].groups["lora"]["delta_norm"] > 0
    ups = [p for n, p in group.parameters().items() if n.endswith(".lora_up")]
    assert ups and all(float(p.detach().abs().max()) > 0 for p in ups)  # B starts at zero and has moved
    for k, v in unet.state_dict().items():  # every base weight bit for bit (peft names them base_layer)
        if "lora_" not in k:
            assert torch.equal(v, base[k.replace(".base_layer", "")]), k
    assert all(p.grad is None or not p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    assert torch.equal(parts["text_encoder"].get_input_embeddings().weight, table)
    assert set(group.paths) == {n for n in lora_targets(parts["unet"], LoraSpec())}
    assert all(p.endswith(("to_q", "to_k", "to_v", "to_out.0")) for p in group.paths)


def test_the_lora_waits_for_its_start_and_the_vectors_train_alone_until_then(parts):
    _, group, _, infos = _run(parts, 6, LoraSpec(rank=2, lr=1e-2, start=0.5))
    assert [i.groups["lora"]["lr"] for i in infos] == [0.0, 0.0, 0.0, 1e-2, 1e-2, 1e-2]
    assert [i.groups["lora"]["delta_norm"] == 0.0 for i in infos] == [True, True, True, False, False, False]


def test_a_run_with_a_lora_resumes_exactly(parts, tmp_path):
    full, g_full, _, _ = _run(parts, 6)
    part, _, _, _ = _run(parts, 6, stop_after=3)
    assert part.step == 3
    save_checkpoint(part, [tmp_path / "cat.safetensors"], state_path=tmp_path / "state.safetensors")
    state = load_state(tmp_path / "state.safetensors")
    assert any(k.startswith("param.") and k.endswith(".lora_down") for k in state.groups["lora"])
    assert any(k.endswith(".exp_avg_sq") for k in state.groups["lora"])
    resumed, g_res, _, _ = _run(parts, 6, resume=state)
    assert resumed.step == 6
    for k, v in g_full.parameters().items():
        assert torch.allclose(g_res.parameters()[k], v, atol=1e-6), k
    assert torch.allclose(resumed.params["clip_l"], full.params["clip_l"], atol=1e-6)


def test_the_kohya_file_means_what_loaders_make_of_it(parts):
    """W + (alpha / rank) up @ down, as ComfyUI's and A1111's LoRA loaders apply it, gives the trained UNet."""
    _, group, unet, _ = _run(parts, 4, LoraSpec(rank=2, alpha=3.0, lr=1e-2))
    sd = group.kohya_state_dict()
    assert len(sd) == 3 * len(group.paths)
    merged = copy.deepcopy(parts["unet"])
    weights = dict(merged.named_parameters())
    for path in group.paths:
        key = kohya_key(path)
        assert key.startswith("lora_unet_") and "." not in key
        down, up, alpha = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], sd[f"{key}.alpha"]
        w = weights[f"{path}.weight"]
        assert down.shape == (2, w.shape[1]) and up.shape == (w.shape[0], 2) and float(alpha) == 3.0
        with torch.no_grad():
            w += float(alpha) / down.shape[0] * (up @ down)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    ctx = torch.randn(2, 77, 32)
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=ctx).sample
        got = merged(x, t, encoder_hidden_states=ctx).sample
        plain = parts["unet"](x, t, encoder_hidden_states=ctx).sample
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-4)  # the LoRA changed the UNet's output
    assert all(v.dtype == torch.float16 for k, v in group.kohya_state_dict(dtype=torch.float16).items()
               if k.endswith(".weight"))


def test_remove_leaves_the_model_as_it_was(parts):
    unet = copy.deepcopy(parts["unet"])
    keys = list(unet.state_dict())
    trainable = [p.requires_grad for p in unet.parameters()]
    group = LoraGroup(unet, LoraSpec(rank=2), 10)
    assert any(".base_layer." in k for k in unet.state_dict())
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    group.remove()
    assert list(unet.state_dict()) == keys and [p.requires_grad for p in unet.parameters()] == trainable
    assert any(trainable)  # diffusers' UNet comes trainable: the flags really were put back
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([7]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.equal(unet(x, t, encoder_hidden_states=ctx).sample,
                           parts["unet"](x, t, encoder_hidden_states=ctx).sample)


def test_lora_choices_are_checked_with_what_to_do(parts):
    with pytest.raises(ValueError, match="no linear layer matches LoRA targets \\['qkv'\\].*end in"):
        lora_targets(parts["unet"], LoraSpec(targets=("qkv",)))
    assert all("up_blocks" in p for p in lora_targets(parts["unet"], LoraSpec(blocks=("up_blocks",))))
    for bad, match in ((dict(rank=0), "rank"), (dict(alpha=0.0), "alpha"), (dict(lr=float("nan")), "learning rate"),
                       (dict(start=1.0), "start"), (dict(targets=()), "targets")):
        with pytest.raises(ValueError, match=match):
            LoraSpec(**bad).validate()


def test_the_lora_file_round_trips_refuses_to_overwrite_and_names_what_is_missing(parts, tmp_path):
    from inversion.files.lora_file import load_lora, lora_layers, save_lora

    group = LoraGroup(copy.deepcopy(parts["unet"]), LoraSpec(rank=2, alpha=3.0), 10)
    sd = group.kohya_state_dict()
    path = save_lora(sd, tmp_path / "loras" / "cat.safetensors", metadata={"inversion_steps": "10"})
    tensors, meta = load_lora(path)
    assert set(tensors) == set(sd) and all(torch.equal(tensors[k], sd[k]) for k in sd)
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "3" and meta["inversion_steps"] == "10"
    assert sorted(lora_layers(tensors)) == sorted(kohya_key(p) for p in group.paths)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_lora(sd, path)
    assert path.read_bytes() == before
    broken = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    with pytest.raises(ValueError, match="lacks .*\\.alpha"):
        save_lora(broken, tmp_path / "broken.safetensors")
    assert not (tmp_path / "broken.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="no LoRA file"):
        load_lora(tmp_path / "nothing.safetensors")


def test_a_lora_continues_from_its_file_and_a_different_one_is_refused(parts):
    _, trained, _, _ = _run(parts, 3)
    fresh = LoraGroup(copy.deepcopy(parts["unet"]), LoraSpec(rank=2, alpha=2.0, lr=1e-2), 3, seed=9)
    fresh.load_kohya(trained.kohya_state_dict())
    for k, v in trained.parameters().items():
        assert torch.equal(fresh.parameters()[k].detach(), v.detach()), k
    other = LoraGroup(copy.deepcopy(parts["unet"]), LoraSpec(rank=4, alpha=2.0), 3)
    with pytest.raises(ValueError, match="rank 2 and alpha 2; this run trains rank 4"):
        other.load_kohya(trained.kohya_state_dict())
    fewer = LoraGroup(copy.deepcopy(parts["unet"]), LoraSpec(rank=2, alpha=2.0, blocks=("up_blocks",)), 3)
    with pytest.raises(ValueError, match="same blocks and layers"):
        fewer.load_kohya(trained.kohya_state_dict())
