"""Embedding files: round trips, the layouts other UIs write, safety, atomic writes, other loaders."""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from inversion.files import formats
from inversion.files.checkpoint import load_train_state, save_train_state
from inversion.embedding import LearnedEmbedding
from inversion.files.formats import detect_format, load_embedding, save_embedding
from inversion.files.safefile import atomic_save_safetensors

SDXL = ("clip_l", "clip_g")
META = {"method": "dti", "steps": "400", "seed": "7", "init_text": "a cat"}


def make_emb(keys=("clip_l",), k=2, widths=None, name="mycat", seed=0, dtype=torch.float32, **kw):
    widths = widths or {"clip_l": 768, "clip_h": 1024, "clip_g": 1280}
    g = torch.Generator().manual_seed(seed)
    vectors = {key: torch.randn(k, widths[key], generator=g).to(dtype) for key in keys}
    return LearnedEmbedding(name, vectors, metadata=dict(META), **kw)


def header(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})


def raw_keys(path) -> list[str]:
    return list(safetensors.torch.load_file(str(path)))


def assert_same(loaded: LearnedEmbedding, emb: LearnedEmbedding) -> None:
    assert loaded.keys == emb.keys
    for key in emb.keys:
        assert loaded.vectors[key].dtype == torch.float32
        assert torch.equal(loaded.vectors[key], emb.vectors[key].float())
    assert loaded.name == emb.name
    assert loaded.placeholder == emb.placeholder
    assert loaded.metadata == {**emb.metadata, "inversion_version": formats._library_version()}


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_single_round_trip_and_layout(tmp_path, k):
    emb = make_emb(k=k, placeholder="<my-cat>")
    path = save_embedding(emb, tmp_path / "mycat.safetensors", format="single")
    # A1111 refuses files with more than one tensor key: only emb_params may be there.
    assert raw_keys(path) == ["emb_params"]
    h = header(path)
    assert (h["format"], h["encoder_keys"], h["num_vectors"], h["name"]) == ("single", "clip_l", str(k), "mycat")
    assert h["placeholder"] == "<my-cat>" and h["method"] == "dti"
    assert_same(load_embedding(path), emb)


def test_sdxl_round_trip_and_layout(tmp_path):
    emb = make_emb(keys=("clip_l", "clip_g"), k=2)
    path = save_embedding(emb, tmp_path / "x.safetensors", format="sdxl")
    assert sorted(raw_keys(path)) == ["clip_g", "clip_l"]
    assert header(path)["encoder_keys"] == "clip_l,clip_g"
    assert_same(load_embedding(path), emb)


@pytest.mark.parametrize("k", [1, 2])
def test_diffusers_round_trip_and_layout(tmp_path, k):
    emb = make_emb(k=k, placeholder="<tok>")
    path = save_embedding(emb, tmp_path / "learned_embeds.safetensors", format="diffusers")
    tensors = safetensors.torch.load_file(str(path))
    assert list(tensors) == ["<tok>"] and tensors["<tok>"].shape == (k, 768)
    assert detect_format(path) == "diffusers"
    assert_same(load_embedding(path), emb)


def test_non_clip_width_keeps_its_key_through_the_header(tmp_path):
    emb = make_emb(keys=("clip_g",), widths={"clip_g": 32}, k=2)
    loaded = load_embedding(save_embedding(emb, tmp_path / "g.safetensors"))
    assert loaded.keys == ["clip_g"]
    assert "encoder_key_note" not in loaded.metadata


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_saved_as_float32(tmp_path, dtype):
    emb = make_emb(k=2, dtype=dtype)
    path = save_embedding(emb, tmp_path / "h.safetensors")
    assert safetensors.torch.load_file(str(path))["emb_params"].dtype == torch.float32
    loaded = load_embedding(path)
    assert torch.equal(loaded.vectors["clip_l"], emb.vectors["clip_l"].float())


def test_auto_format_choice(tmp_path):
    one = save_embedding(make_emb(keys=("clip_h",)), tmp_path / "a.safetensors")
    assert raw_keys(one) == ["emb_params"] and header(one)["format"] == "single"
    two = save_embedding(make_emb(keys=("clip_g", "clip_l")), tmp_path / "b.safetensors")
    assert sorted(raw_keys(two)) == ["clip_g", "clip_l"] and header(two)["format"] == "sdxl"
    assert load_embedding(two).keys == ["clip_g", "clip_l"]  # the header restores the key order
    with pytest.raises(ValueError, match="no standard file layout") as e:
        save_embedding(make_emb(keys=("clip_l", "clip_h")), tmp_path / "c.safetensors")
    assert "clip_l, clip_h" in str(e.value)
    assert not (tmp_path / "c.safetensors").exists()


def test_format_mismatches_are_explained(tmp_path):
    both = make_emb(keys=("clip_l", "clip_g"))
    for fmt in ("single", "diffusers"):
        with pytest.raises(ValueError, match="holds one encoder.*format='sdxl'"):
            save_embedding(both, tmp_path / "x.safetensors", format=fmt)
    with pytest.raises(ValueError, match="exactly the encoders clip_l and clip_g.*format='single'"):
        save_embedding(make_emb(), tmp_path / "x.safetensors", format="sdxl")
    with pytest.raises(ValueError, match="not known; use one of auto, single, sdxl, keyed, diffusers"):
        save_embedding(make_emb(), tmp_path / "x.safetensors", format="a1111")
    assert list(tmp_path.iterdir()) == []


def test_save_path_suffix(tmp_path):
    assert save_embedding(make_emb(), tmp_path / "cat.v2").name == "cat.v2.safetensors"
    with pytest.raises(ValueError, match="safetensors only.*ending in .safetensors"):
        save_embedding(make_emb(), tmp_path / "cat.pt")
    folder = tmp_path / "concept"
    folder.mkdir()
    path = save_embedding(make_emb(placeholder="<c>"), folder, format="diffusers")
    assert path == folder / "learned_embeds.safetensors"


def test_save_refuses_diverged_vectors(tmp_path):
    emb = make_emb()
    emb.vectors["clip_l"][0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf.*learning rate"):
        save_embedding(emb, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


# --- overwrite protection and atomicity -----------------------------------------------------


def test_overwrite_protection(tmp_path):
    path = save_embedding(make_emb(seed=1), tmp_path / "cat.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError) as e:
        save_embedding(make_emb(seed=2), path)
    assert str(path) in str(e.value) and "overwrite=True" in str(e.value) and "another name" in str(e.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["cat.safetensors"]

    new = make_emb(seed=2)
    save_embedding(new, path, overwrite=True)
    assert path.read_bytes() != before
    assert torch.equal(load_embedding(path).vectors["clip_l"], new.vectors["clip_l"])
    assert os.listdir(tmp_path) == ["cat.safetensors"]


def test_existing_target_is_refused_before_writing(tmp_path, monkeypatch):
    path = save_embedding(make_emb(), tmp_path / "cat.safetensors")
    calls = []
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **kw: calls.append(a))
    with pytest.raises(FileExistsError):
        save_embedding(make_emb(seed=3), path)
    assert calls == []


def test_target_created_during_the_write_is_not_clobbered(tmp_path, monkeypatch):
    path = tmp_path / "cat.safetensors"
    real = safetensors.torch.save_file

    def racing_writer(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        path.write_bytes(b"another writer got there first")

    monkeypatch.setattr(safetensors.torch, "save_file", racing_writer)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_embedding(make_emb(), path)
    assert path.read_bytes() == b"another writer got there first"
    assert os.listdir(tmp_path) == ["cat.safetensors"]


def test_atomic_save_creates_parent_and_keeps_dtype(tmp_path):
    path = atomic_save_safetensors({"a": torch.arange(6).view(2, 3).t()}, tmp_path / "d" / "e" / "s.safetensors",
                                   {"k": "v"})
    assert torch.equal(safetensors.torch.load_file(str(path))["a"], torch.arange(6).view(2, 3).t())
    assert header(path) == {"k": "v"}


def _failing_writer(tensors, filename, metadata=None):
    with open(filename, "wb") as f:  # a partial file, as a crash mid-write would leave
        f.write(b"\x10\x00\x00\x00partial")
    raise OSError("disk full (simulated)")


def test_failed_write_leaves_original_and_no_temp(tmp_path, monkeypatch):
    path = save_embedding(make_emb(seed=1), tmp_path / "cat.safetensors")
    before = path.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_writer)
    with pytest.raises(OSError, match="simulated"):
        save_embedding(make_emb(seed=2), path, overwrite=True)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["cat.safetensors"]
    with pytest.raises(OSError, match="simulated"):
        save_embedding(make_emb(seed=2), tmp_path / "new.safetensors")
    assert os.listdir(tmp_path) == ["cat.safetensors"]


# --- files written by other tools -----------------------------------------------------------


def test_a1111_pt_is_read(tmp_path):
    vec = torch.randn(3, 768).requires_grad_()
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vec},
        "name": "mycat",
        "step": 1500,
        "sd_checkpoint": "cc6cb27103",
        "sd_checkpoint_name": "v1-5-pruned-emaonly",
    }
    path = tmp_path / "My Cat (v2).pt"
    torch.save(data, path)
    assert detect_format(path) == "a1111"
    emb = load_embedding(path)
    assert emb.name == "My_Cat_v2" and emb.placeholder == "<My_Cat_v2>"
    assert emb.keys == ["clip_l"] and not emb.vectors["clip_l"].requires_grad
    assert torch.equal(emb.vectors["clip_l"], vec.detach())
    assert emb.metadata == {"a1111_name": "mycat", "step": "1500", "sd_checkpoint": "cc6cb27103",
                            "sd_checkpoint_name": "v1-5-pruned-emaonly"}
    assert load_embedding(path, name="other").name == "other"


def test_diffusers_bin_1d_is_read(tmp_path):
    vec = torch.randn(1024)
    path = tmp_path / "learned_embeds.bin"
    torch.save({"<cat-toy>": vec}, path)
    emb = load_embedding(path)
    assert emb.vectors["clip_h"].shape == (1, 1024) and torch.equal(emb.vectors["clip_h"][0], vec)
    assert emb.placeholder == "<cat-toy>" and emb.name == "cat-toy"


def test_sdxl_pt_dict_and_clip_h_alone(tmp_path):
    l, g = torch.randn(2, 768), torch.randn(2, 1280)
    torch.save({"clip_l": l, "clip_g": g}, tmp_path / "x.pt")
    emb = load_embedding(tmp_path / "x.pt")
    assert torch.equal(emb.vectors["clip_l"], l) and torch.equal(emb.vectors["clip_g"], g)
    safetensors.torch.save_file({"clip_h": torch.randn(1, 1024)}, str(tmp_path / "h.safetensors"))
    assert load_embedding(tmp_path / "h.safetensors").keys == ["clip_h"]
    assert detect_format(tmp_path / "h.safetensors") == "sdxl"


@pytest.mark.parametrize("width,key", [(768, "clip_l"), (1024, "clip_h"), (1280, "clip_g")])
def test_foreign_emb_params_key_from_width(tmp_path, width, key):
    safetensors.torch.save_file({"emb_params": torch.randn(2, width)}, str(tmp_path / "f.safetensors"))
    emb = load_embedding(tmp_path / "f.safetensors")
    assert emb.keys == [key] and emb.name == "f" and emb.metadata == {}


def test_foreign_emb_params_key_from_argument_and_header(tmp_path):
    path = tmp_path / "odd.safetensors"
    safetensors.torch.save_file({"emb_params": torch.randn(2, 40)}, str(path))
    guessed = load_embedding(path)
    assert guessed.keys == ["clip_l"] and "not a standard CLIP width" in guessed.metadata["encoder_key_note"]
    assert load_embedding(path, encoder_key="clip_g").keys == ["clip_g"]
    # A header written by this library wins over the argument (it records the training encoder).
    ours = save_embedding(make_emb(keys=("clip_h",), widths={"clip_h": 40}), tmp_path / "ours.safetensors")
    assert load_embedding(ours, encoder_key="clip_g").keys == ["clip_h"]


def test_detect_format(tmp_path):
    assert detect_format(save_embedding(make_emb(), tmp_path / "s.safetensors")) == "single"
    assert detect_format(save_embedding(make_emb(keys=SDXL), tmp_path / "x.safetensors")) == "sdxl"
    torch.save(torch.randn(2, 768), tmp_path / "bare.pt")
    assert detect_format(tmp_path / "bare.pt") == "single"



# --- safety -----------------------------------------------------------------------------------


class _Payload:
    """Unpickling this calls open(marker, "w"): it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": _Payload(marker)}, "name": "evil"}, path)
    with pytest.raises(ValueError) as e:
        load_embedding(path)
    msg = str(e.value)
    assert "not a plain tensor file" in msg and "NOT loaded" in msg and "safetensors" in msg
    assert not marker.exists()
    with pytest.raises(ValueError, match="NOT loaded"):
        detect_format(path)
    assert not marker.exists()
    # Control: the payload is live, so the assertions above can fail.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_garbage_pt_is_refused(tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(b"this is not a torch file at all")
    with pytest.raises(ValueError, match="could not be read as a plain PyTorch tensor file"):
        load_embedding(path)


# --- bad input --------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_embedding(tmp_path / "nope.safetensors")


def test_three_d_tensor(tmp_path):
    safetensors.torch.save_file({"emb_params": torch.randn(1, 2, 768)}, str(tmp_path / "t.safetensors"))
    with pytest.raises(ValueError, match=r"shape \(1, 2, 768\).*2-D tensor \[k, d\].*re-export it as \[k, d\]"):
        load_embedding(tmp_path / "t.safetensors")


def test_mismatched_k(tmp_path):
    safetensors.torch.save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(3, 1280)},
                                str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="clip_l=2, clip_g=3.*same k.*re-export"):
        load_embedding(tmp_path / "m.safetensors")


def test_unknown_layout(tmp_path):
    safetensors.torch.save_file({"foo": torch.randn(2, 8), "bar": torch.randn(2, 8)}, str(tmp_path / "u.safetensors"))
    with pytest.raises(ValueError) as e:
        load_embedding(tmp_path / "u.safetensors")
    msg = str(e.value)
    assert "'foo'" in msg and "'bar'" in msg and "emb_params" in msg and "clip_g" in msg and "diffusers" in msg


@pytest.mark.parametrize("tensor,words", [
    (torch.tensor([[0.0, float("nan")]]), "NaN or inf.*corrupt"),
    (torch.tensor([[0.0, float("inf")]]), "NaN or inf.*corrupt"),
    (torch.zeros(0, 768), "0 vectors"),
    (torch.zeros(2, 768, dtype=torch.int32), "must be floating point"),
])
def test_corrupt_values(tmp_path, tensor, words):
    safetensors.torch.save_file({"emb_params": tensor}, str(tmp_path / "c.safetensors"))
    with pytest.raises(ValueError, match=words):
        load_embedding(tmp_path / "c.safetensors")


def test_unsupported_and_truncated_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported file type '.txt'.*use .safetensors"):
        load_embedding(tmp_path / "a.txt")
    good = save_embedding(make_emb(), tmp_path / "t.safetensors")
    good.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_embedding(good)


def test_invalid_name_argument(tmp_path):
    path = save_embedding(make_emb(), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not usable"):
        load_embedding(path, name="has space")


def test_name_from_file_keeps_renamed_copies_apart(tmp_path):
    import shutil

    a = save_embedding(make_emb(), tmp_path / "a.safetensors")
    (tmp_path / "sub").mkdir()
    b = shutil.copy(a, tmp_path / "sub" / "my copy (2).safetensors")
    custom = save_embedding(make_emb(name="own", placeholder="<sks>"), tmp_path / "c.safetensors")
    assert load_embedding(b).name == "mycat"  # by default the header's name, as saved
    ea, eb = load_embedding(a, name_from_file=True), load_embedding(b, name_from_file=True)
    assert (ea.name, ea.placeholder, "stored_name" in ea.metadata) == ("a", "<a>", True)
    assert (eb.name, eb.placeholder, eb.metadata["stored_name"]) == ("my_copy_2", "<my_copy_2>", "mycat")
    assert torch.equal(ea.vectors["clip_l"], eb.vectors["clip_l"])
    same = load_embedding(tmp_path / "sub" / "my copy (2).safetensors", name="mycat")
    assert "stored_name" not in same.metadata and same.placeholder == "<mycat>"
    assert load_embedding(custom, name_from_file=True).placeholder == "<sks>"  # a chosen placeholder stays


# --- trainer side files -----------------------------------------------------------------------


def test_train_state_round_trip(tmp_path):
    tensors = {"vectors.clip_l": torch.randn(2, 32), "adam.exp_avg": torch.randn(2, 32).half()}
    meta = {"step": "12", "settings": json.dumps({"lr": 0.005, "steps": [1, 2]})}
    path = save_train_state(tmp_path / "state.safetensors", tensors, meta)
    got, got_meta = load_train_state(path)
    assert got_meta == meta and set(got) == set(tensors)
    assert all(torch.equal(got[k], tensors[k]) and got[k].dtype == tensors[k].dtype for k in tensors)
    save_train_state(path, {"x": torch.ones(1)}, {})  # overwrites by default
    assert set(load_train_state(path)[0]) == {"x"}
    with pytest.raises(FileExistsError):
        save_train_state(path, {"x": torch.ones(1)}, {}, overwrite=False)
    with pytest.raises(FileNotFoundError):
        load_train_state(tmp_path / "missing.safetensors")


# --- other UIs' own loaders -------------------------------------------------------------------


class _TinyPipe:
    """What diffusers' TextualInversionLoaderMixin.load_textual_inversion needs from a pipeline."""

    hf_device_map = None
    components: dict = {}

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder


@pytest.mark.parametrize("k,as_folder", [(1, False), (3, True)])
def test_diffusers_load_textual_inversion(tmp_path, k, as_folder):
    loaders = pytest.importorskip("diffusers.loaders", reason="diffusers is not importable")
    from transformers import CLIPTextConfig, CLIPTextModel

    from inversion.hosts.hf import make_clip_tokenizer

    tokenizer = make_clip_tokenizer(["a", "photo", "of", "cat"], folder=tmp_path / "tok")
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(config).eval()
    emb = make_emb(k=k, widths={"clip_l": 32}, placeholder="<sks>")
    target = tmp_path / "ti"
    target.mkdir()
    path = save_embedding(emb, target if as_folder else target / "sks.safetensors", format="diffusers")

    pipe_cls = type("Pipe", (_TinyPipe, loaders.TextualInversionLoaderMixin), {})
    pipe = pipe_cls(tokenizer, text_encoder)
    before = len(tokenizer)
    pipe.load_textual_inversion(str(target if as_folder else path))

    tokens = ["<sks>"] + [f"<sks>_{i}" for i in range(1, k)]
    ids = tokenizer.convert_tokens_to_ids(tokens)
    assert sorted(ids) == list(range(before, before + k))
    prompt = pipe.maybe_convert_prompt("a photo of <sks>", tokenizer)
    assert tokenizer(prompt, add_special_tokens=False)["input_ids"][-k:] == ids
    table = text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(table[ids], emb.vectors["clip_l"])


_COMFY_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # CUDA builds without a GPU crash at import otherwise
    import comfy.sd1_clip
    out = {}
    for name, size, key in json.loads(sys.argv[3]):
        t = comfy.sd1_clip.load_embed(name, [sys.argv[2]], size, key)
        out[f"{name}/{key}"] = None if t is None else [str(t.dtype), t.tolist()]
    print("RESULT" + json.dumps(out))
""")


def test_comfyui_load_embed_accepts_our_files(tmp_path):
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        pytest.skip("COMFYUI_PATH not set")
    single = make_emb(k=2, name="single")
    sdxl = make_emb(keys=SDXL, k=3, name="dual", seed=1)
    diff = make_emb(k=1, name="diff", seed=2, placeholder="<d>")
    save_embedding(single, tmp_path / "single.safetensors")
    save_embedding(sdxl, tmp_path / "dual.safetensors")
    save_embedding(diff, tmp_path / "diff.safetensors", format="diffusers")
    queries = [("single", 768, "clip_l"), ("dual", 768, "clip_l"), ("dual", 1280, "clip_g"), ("diff", 768, "clip_l")]
    # A separate process: importing comfy here would leak it into sys.modules for other tests.
    proc = subprocess.run([sys.executable, "-c", _COMFY_SCRIPT, comfy_path, str(tmp_path), json.dumps(queries)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    got = json.loads(line[len("RESULT"):])
    expected = {"single/clip_l": single.vectors["clip_l"], "dual/clip_l": sdxl.vectors["clip_l"],
                "dual/clip_g": sdxl.vectors["clip_g"], "diff/clip_l": diff.vectors["clip_l"]}
    for key, want in expected.items():
        assert got[key] is not None, f"ComfyUI did not load {key}"
        dtype, values = got[key]
        assert dtype == "torch.float32"
        assert torch.equal(torch.tensor(values, dtype=torch.float32), want), key


def test_sd3_and_flux_files_are_keyed_by_encoder_and_read_other_tools_t5(tmp_path):
    widths = {"clip_l": 768, "clip_g": 1280, "t5xxl": 4096}
    sd3 = make_emb(keys=("clip_l", "clip_g", "t5xxl"), widths=widths)
    path = save_embedding(sd3, tmp_path / "sd3.safetensors")
    assert sorted(raw_keys(path)) == ["clip_g", "clip_l", "t5xxl"] and header(path)["format"] == "keyed"
    back = load_embedding(path)
    assert back.keys == ["clip_l", "clip_g", "t5xxl"] and all(torch.equal(back.vectors[k], sd3.vectors[k]) for k in widths)
    # diffusers' / OneTrainer's Flux layout says "t5"; read as ComfyUI's t5xxl
    safetensors.torch.save_file({"clip_l": torch.ones(2, 768), "t5": torch.zeros(2, 4096)}, str(tmp_path / "fx.safetensors"))
    flux = load_embedding(tmp_path / "fx.safetensors")
    assert flux.keys == ["clip_l", "t5xxl"] and flux.vectors["t5xxl"].shape == (2, 4096)
    again = save_embedding(flux, tmp_path / "fx2.safetensors")
    assert sorted(raw_keys(again)) == ["clip_l", "t5xxl"]
    safetensors.torch.save_file({"t5": torch.zeros(1, 4096), "t5xxl": torch.zeros(1, 4096)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match="unrecognised embedding layout"):
        load_embedding(tmp_path / "two.safetensors")  # both names of one encoder: ambiguous
