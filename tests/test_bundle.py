"""LoRA files with embeddings inside (issue 25): A1111's bundle as this pack writes it, checked against A1111's
reading rules, and the layouts other trainers write, read back with each concept as its own word."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from inversion.embedding import LearnedEmbedding
from inversion.files.bundle import a1111_bundle_words, bundle_tensors, save_bundle, split_bundle
from inversion.files.safefile import read_safetensors


def _lora(prefix="lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", rank=2):
    g = torch.Generator().manual_seed(0)
    return {f"{prefix}.lora_down.weight": torch.randn(rank, 8, generator=g),
            f"{prefix}.lora_up.weight": torch.randn(8, rank, generator=g), f"{prefix}.alpha": torch.tensor(float(rank))}


def _emb(name, **widths):
    g = torch.Generator().manual_seed(len(name))
    return LearnedEmbedding(name, {k: torch.randn(2, w, generator=g) for k, w in widths.items()})


def test_the_bundle_is_what_a1111_reads_as_one_word_per_concept(tmp_path):
    cat, dog = _emb("cat", clip_l=768), _emb("dog-2", clip_l=768)
    xl = _emb("toyxl", clip_l=768, clip_g=1280)
    path = save_bundle(_lora(), [cat, dog], tmp_path / "pair.safetensors")
    tensors, meta = read_safetensors(path)
    assert set(tensors) >= {"bundle_emb.cat.string_to_param.*", "bundle_emb.dog-2.string_to_param.*"}
    words = a1111_bundle_words(tensors)
    assert sorted(words) == ["cat", "dog-2"] and list(words["cat"]) == ["string_to_param.*"]
    torch.testing.assert_close(words["cat"]["string_to_param.*"], cat.vectors["clip_l"])
    assert meta["bundle_words"] == "cat,dog-2"
    sdxl = bundle_tensors([xl])
    assert sorted(sdxl) == ["bundle_emb.toyxl.clip_g", "bundle_emb.toyxl.clip_l"]
    assert sorted(a1111_bundle_words(sdxl)["toyxl"]) == ["clip_g", "clip_l"]


def test_a_bundle_reads_back_as_the_lora_and_each_concept_as_its_own_word(tmp_path):
    lora = _lora()
    cat, xl = _emb("cat", clip_h=1024), _emb("toyxl", clip_l=768, clip_g=1280)
    for embs in ([cat], [xl]):
        path = save_bundle(lora, embs, tmp_path / f"{embs[0].name}.safetensors")
        got_lora, got = split_bundle(*read_safetensors(path))
        assert set(got_lora) == set(lora) and all(torch.equal(got_lora[k], lora[k]) for k in lora)
        assert [e.name for e in got] == [embs[0].name]
        assert set(got[0].keys) == set(embs[0].keys)  # clip_h from the width of string_to_param.*
        for k in embs[0].keys:
            torch.testing.assert_close(got[0].vectors[k], embs[0].vectors[k])


def test_names_a1111_would_cut_and_clashing_words_are_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="cannot hold a '.'.*'cat_v2'"):
        save_bundle(_lora(), [_emb("cat.v2", clip_l=768)], tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="each bundled concept needs its own word"):
        bundle_tensors([_emb("cat", clip_l=768), _emb("cat", clip_l=768)])
    with pytest.raises(ValueError, match="needs the LoRA's tensors"):
        save_bundle({}, [_emb("cat", clip_l=768)], tmp_path / "y.safetensors")
    assert not list(tmp_path.iterdir())


def test_an_existing_file_is_not_replaced_without_overwrite(tmp_path):
    path = tmp_path / "pair.safetensors"
    path.write_bytes(b"someone's LoRA")
    with pytest.raises(FileExistsError):
        save_bundle(_lora(), [_emb("cat", clip_l=768)], path)
    assert path.read_bytes() == b"someone's LoRA"


def test_a1111_rules_refuse_what_a1111_cannot_load():
    two_terms = {"bundle_emb.cat.string_to_param.*": torch.zeros(1, 768),
                 "bundle_emb.cat.string_to_param.x": torch.zeros(1, 768)}
    with pytest.raises(ValueError, match="more than one string_to_param"):
        a1111_bundle_words(two_terms)
    with pytest.raises(ValueError, match="clip_l \\+ clip_g, or one tensor"):
        a1111_bundle_words({"bundle_emb.cat.clip_l": torch.zeros(1, 768), "bundle_emb.cat.clip_h": torch.zeros(1, 1024)})
    with pytest.raises(ValueError, match="bundle_emb.<word>.<part>"):
        a1111_bundle_words({"bundle_emb.cat": torch.zeros(1, 768)})


# Files laid out as each tool writes them (the layouts as issue 25 describes them: A1111 and OneTrainer's
# bundle_emb.<word>.string_to_param.* / .clip_l / .clip_g, a kohya LoRA with text-encoder layers and a bundled
# emb_params, ai-toolkit's unprefixed emb_params or clip_l / clip_g).
LAYOUTS = {
    "a1111 sd1": ({"bundle_emb.sks.string_to_param.*": (3, 768)}, {"sks": {"clip_l": 3}}),
    "onetrainer sdxl, two concepts": (
        {"bundle_emb.ohwx.clip_l": (2, 768), "bundle_emb.ohwx.clip_g": (2, 1280), "bundle_emb.zwx.clip_l": (1, 768),
         "bundle_emb.zwx.clip_g": (1, 1280)}, {"ohwx": {"clip_l": 2, "clip_g": 2}, "zwx": {"clip_l": 1, "clip_g": 1}}),
    "kohya with text-encoder layers": ({"bundle_emb.tok.emb_params": (2, 1024)}, {"tok": {"clip_h": 2}}),
    "ai-toolkit sd1": ({"emb_params": (4, 768)}, {"mystyle": {"clip_l": 4}}),
    "ai-toolkit sdxl": ({"clip_l": (2, 768), "clip_g": (2, 1280)}, {"mystyle": {"clip_l": 2, "clip_g": 2}}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_other_tools_bundles_read_as_their_words(tmp_path, layout):
    emb_keys, expect = LAYOUTS[layout]
    lora = {**_lora(), **(_lora("lora_te_text_model_encoder_layers_0_self_attn_q_proj") if "kohya" in layout else {})}
    tensors = {**lora, **{k: torch.randn(*shape) for k, shape in emb_keys.items()}}
    path = tmp_path / "mystyle.safetensors"
    save_file(tensors, str(path))
    got_lora, got = split_bundle(*read_safetensors(path), stem=path.stem)
    assert set(got_lora) == set(lora)
    assert {e.name: {k: v.shape[0] for k, v in e.vectors.items()} for e in got} == expect


def test_t5_parts_read_as_t5xxl_and_unknown_parts_say_what_is_missing():
    _, (emb,) = split_bundle({**_lora(), "bundle_emb.fx.clip_l": torch.ones(1, 768), "bundle_emb.fx.t5": torch.zeros(1, 4096)})
    assert emb.keys == ["clip_l", "t5xxl"] and emb.vectors["t5xxl"].shape == (1, 4096)  # Flux: diffusers' "t5"
    with pytest.raises(ValueError, match="part 'weird' this pack does not know"):
        split_bundle({**_lora(), "bundle_emb.fx.weird": torch.zeros(1, 768)})
