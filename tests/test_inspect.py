"""``inversion.methods.inspect`` on a tiny CLIP whose answers are known: a vector placed on a word's row reads
as that word; norms, percentiles and cosines match what is computed by hand; snapshots give the drift."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from inversion import charts
from inversion.methods import init
from inversion.methods import inspect as ins
from inversion.files.checkpoint import save_train_state
from inversion.embedding import LearnedEmbedding
from inversion.files.formats import save_embedding


def _vocabs(world):
    return [ins.Vocabulary(e.key, e.token_table(), ins.hf_decoder(e.tokenizer)) for e in world.text.encoders]


def _row(world, word: str, key: str = "clip_l") -> torch.Tensor:
    enc = next(e for e in world.text.encoders if e.key == key)
    (i,) = enc.tokenize(word)
    return enc.token_table().detach()[i].clone()


def _noisy(v: torch.Tensor, seed: int = 0, scale: float = 1e-3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return v + scale * v.norm() * torch.randn(v.shape, generator=g)


def test_a_vector_on_a_words_row_reads_as_that_word(tiny):
    vec = torch.stack([_noisy(_row(tiny, "dog")), _noisy(_row(tiny, "car"), seed=1)])
    emb = LearnedEmbedding("probe", {"clip_l": vec})
    reports = ins.inspect_embedding(emb, _vocabs(tiny), k=3)
    assert [(r.encoder, r.index) for r in reports] == [("clip_l", 0), ("clip_l", 1)]
    for r, word in zip(reports, ("dog", "car")):
        assert len(r.neighbours) == 3
        first = r.neighbours[0]
        assert first.word == word and first.token_id == tiny.encoder.tokenize(word)[0]
        assert first.cosine > 0.99 > r.neighbours[1].cosine
        assert [n.cosine for n in r.neighbours] == sorted((n.cosine for n in r.neighbours), reverse=True)


def test_norm_quantiles_and_percentile_match_a_hand_computation(tiny):
    table = tiny.encoder.token_table().detach().double().numpy()
    norms = np.linalg.norm(table, axis=1)
    target = float(np.quantile(norms, 0.3))
    direction = _row(tiny, "cat")
    vec = torch.stack([direction / direction.norm() * target, direction / direction.norm() * norms.max() * 3])
    (low, high) = ins.inspect_embedding(LearnedEmbedding("probe", {"clip_l": vec}), _vocabs(tiny))
    expected = dict(zip(["min", "5%", "median", "95%", "max"], np.quantile(norms, [0, 0.05, 0.5, 0.95, 1])))
    assert low.vocab.count == table.shape[0]
    for label, value in expected.items():
        assert low.vocab.quantiles[label] == pytest.approx(value, rel=1e-9)
    assert low.vocab.quantiles["min"] == pytest.approx(norms.min()) and low.vocab.band[-1] == pytest.approx(norms.max())
    assert low.norm == pytest.approx(target, rel=1e-6)
    assert low.percentile == pytest.approx(100.0 * np.mean(norms <= low.norm))
    assert 25 < low.percentile < 35
    assert high.percentile == 100.0
    text = ins.format_report([low, high])
    assert "3.0x the largest token's" in text and f"median {expected['median']:.4g}" in text


def test_cosine_to_the_initial_vectors_recomputed_from_init_text(tiny):
    emb = init.make_embedding(tiny.text, "probe", init_text="a red dog")
    start = emb.vectors["clip_l"].clone()
    g = torch.Generator().manual_seed(3)
    moved = start + 0.5 * start.norm(dim=-1, keepdim=True) * torch.randn(start.shape, generator=g) / start.shape[1] ** 0.5
    trained = LearnedEmbedding("probe", {"clip_l": moved}, metadata=emb.metadata)
    initial, how = ins.initial_vectors(trained, tiny.text)
    assert "a red dog" in how
    torch.testing.assert_close(initial["clip_l"], start)
    reports = ins.inspect_embedding(trained, _vocabs(tiny), initial)
    by_hand = torch.nn.functional.cosine_similarity(moved.double(), start.double(), dim=-1)
    assert [r.cosine_to_initial for r in reports] == pytest.approx(by_hand.tolist(), abs=1e-9)
    assert all(0.2 < r.cosine_to_initial < 0.99 for r in reports)


def test_initial_vectors_follow_the_init_mode_and_say_when_unknown(tiny):
    word = init.make_embedding(tiny.text, "w", init_word="dog", k=3)
    vectors, _ = ins.initial_vectors(word, tiny.text)
    torch.testing.assert_close(vectors["clip_l"], _row(tiny, "dog").float().expand(3, -1))
    foreign = LearnedEmbedding("a1111", {"clip_l": torch.randn(2, 32)})  # another trainer's file: no init_text
    assert ins.initial_vectors(foreign, tiny.text) == (None, "unknown (the file records no init_text)")
    random = init.make_embedding(tiny.text, "r", k=2)
    assert ins.initial_vectors(random, tiny.text)[0] is None
    other_k = LearnedEmbedding("k", {"clip_l": torch.randn(4, 32)}, metadata={"init_text": "a dog"})
    vectors, how = ins.initial_vectors(other_k, tiny.text)
    assert vectors is None and "2 vector(s)" in how and "4" in how
    (r, *_) = ins.inspect_embedding(foreign, _vocabs(tiny))
    assert r.cosine_to_initial is None and "cos to init unknown" in ins.format_report([r])


def test_drift_over_two_snapshots(tiny):
    final = torch.stack([_row(tiny, "dog"), _row(tiny, "toy")])
    earlier = torch.stack([_row(tiny, "cat"), _row(tiny, "toy") * 0.5])
    snapshots = [ins.Snapshot(200, {"clip_l": final * 2}), ins.Snapshot(100, {"clip_l": earlier}),
                 ins.Snapshot(150, {"clip_l": torch.randn(3, 32)})]  # another shape: skipped
    reports = ins.inspect_embedding(LearnedEmbedding("probe", {"clip_l": final}), _vocabs(tiny), snapshots=snapshots)
    dog, toy = reports
    assert [p.step for p in dog.drift] == [100, 200]
    cat_dog = torch.nn.functional.cosine_similarity(_row(tiny, "cat").double(), _row(tiny, "dog").double(), dim=0)
    assert dog.drift[0].cosine_to_final == pytest.approx(float(cat_dog), abs=1e-9)
    assert dog.drift[0].norm == pytest.approx(float(_row(tiny, "cat").norm()), rel=1e-6)
    assert dog.drift[1].cosine_to_final == pytest.approx(1.0) and dog.drift[1].norm == pytest.approx(2 * dog.norm)
    assert toy.drift[0].cosine_to_final == pytest.approx(1.0) and toy.drift[0].norm == pytest.approx(toy.norm / 2)
    line = ins.format_report(reports).splitlines()[-2]
    assert line.startswith("  v0:") and "drift (step: cos to final / norm) 100: " in line and "200: 1.000/" in line
    row = dog.chart_row()
    assert row["drift_step"] == [100, 200] and row["label"] == "clip_l v0" and len(row["band"]) == 5


def test_load_snapshots_reads_a_run_folder_sorted_by_step(tiny, tmp_path):
    vec = lambda s: torch.full((2, 32), float(s))  # noqa: E731
    run = tmp_path / "probe"
    (run / "snapshots").mkdir(parents=True)
    for step in (300, 100):
        save_embedding(LearnedEmbedding("probe", {"clip_l": vec(step)}), run / "snapshots" / f"step-{step:06d}")
    (run / "snapshots" / "step-000200.safetensors").write_bytes(b"not a safetensors file")
    (run / "snapshots" / "notes.txt").write_text("ignored")
    # the run's state: two concepts trained together, this one second (rows 1-2)
    tensors = {"vec.clip_l": torch.cat([torch.zeros(1, 32), vec(400)])}
    meta = {"step": "400", "history": "{}", "concepts": json.dumps([{"name": "other", "k": 1},
                                                                    {"name": "probe", "k": 2}])}
    save_train_state(run / "state.safetensors", tensors, meta)
    save_embedding(LearnedEmbedding("probe", {"clip_l": vec(250)}, metadata={"steps": "250"}), run / "probe")
    snapshots, notes = ins.load_snapshots(run, "probe")
    assert [s.step for s in snapshots] == [100, 250, 300, 400]
    assert [s.source for s in snapshots] == ["snapshots/step-000100.safetensors", "probe.safetensors",
                                             "snapshots/step-000300.safetensors", "state.safetensors"]
    for s in snapshots:
        torch.testing.assert_close(s.vectors["clip_l"], vec(s.step))
    assert len(notes) == 1 and notes[0].startswith("step-000200.safetensors: not read")
    assert ins.load_snapshots(tmp_path / "missing", "probe") == ([], [])


def test_one_block_per_encoder_one_line_per_vector(tiny_sdxl):
    emb = init.make_embedding(tiny_sdxl.text, "probe", init_text="a dog", method="vanilla", steps=500)
    initial, how = ins.initial_vectors(emb, tiny_sdxl.text)
    reports = ins.inspect_embedding(emb, _vocabs(tiny_sdxl), initial, k=2)
    assert [r.label for r in reports] == ["clip_l v0", "clip_l v1", "clip_g v0", "clip_g v1"]
    assert all(r.neighbours[0].cosine == pytest.approx(1.0) for r in reports)
    assert [r.neighbours[0].word for r in reports] == ["a", "dog", "a", "dog"]
    text = ins.format_report(reports, emb, [f"initial vectors: {how}"])
    lines = text.splitlines()
    assert lines[0] == "Embedding 'probe': 2 vector(s) for clip_l, clip_g (steps 500, method vanilla)"
    assert lines[1] == "initial vectors: recomputed from init text 'a dog'"
    assert lines[2] == lines[6] == "" and len(lines) == 10
    assert lines[3].startswith("[clip_l] 32-d;") and lines[7].startswith("[clip_g] 48-d;")
    assert [ln.split(":")[0] for ln in lines[4:6] + lines[8:10]] == ["  v0", "  v1", "  v0", "  v1"]
    assert "cos to init 1.000" in lines[4] and "nearest 'a' 1.000" in lines[4]


def test_hf_decoder_strips_the_end_of_word_marker(tiny):
    tok = tiny.tokenizer
    ids = tok.convert_tokens_to_ids(["dog</w>", "do", "<|endoftext|>", "x</w>"])
    assert ins.hf_decoder(tok)(ids) == ["dog", "do-", "<|endoftext|>", "x"]


def test_mismatches_are_errors_that_name_both(tiny, tiny_sdxl):
    sdxl = LearnedEmbedding("xl", {"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 48)})
    with pytest.raises(ValueError, match="clip_g.*no vocabulary.*encoders: clip_l"):
        ins.inspect_embedding(sdxl, _vocabs(tiny))
    wide = LearnedEmbedding("wide", {"clip_l": torch.randn(1, 768)})
    with pytest.raises(ValueError, match=r"768-d but the token table is \(\d+, 32\)"):
        ins.inspect_embedding(wide, _vocabs(tiny))
    with pytest.raises(ValueError, match="neighbours"):
        ins.inspect_embedding(LearnedEmbedding("a", {"clip_l": torch.randn(1, 32)}), _vocabs(tiny), k=0)


def test_inspect_chart_is_an_image_row(tiny):
    final = torch.stack([_row(tiny, "dog"), _row(tiny, "toy") * 5])
    snaps = [ins.Snapshot(s, {"clip_l": final * (1 + s / 100)}) for s in (100, 200)]
    plain = ins.inspect_embedding(LearnedEmbedding("p", {"clip_l": final}), _vocabs(tiny))
    drifted = ins.inspect_embedding(LearnedEmbedding("p", {"clip_l": final}), _vocabs(tiny), snapshots=snaps)
    a = charts.inspect_chart([r.chart_row() for r in plain])
    b = charts.inspect_chart([r.chart_row() for r in drifted], width=640)
    for img, w in ((a, 768), (b, 640)):
        assert img.ndim == 3 and img.shape[1] == w and img.shape[2] == 3 and img.dtype == torch.float32
        assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert b.shape[0] > a.shape[0]  # the drift panel
    red = np.all(np.abs(a.numpy() * 255 - np.array(charts.TARGET)) < 1, axis=-1)
    assert red.any()  # the second vector is far outside the vocabulary's 5-95 % band
    assert charts.inspect_chart([]).shape[2] == 3
