"""The papers' methods: timestep strategies, the g(t) profiler, DTI, regularisers, SLERP, presets."""

from __future__ import annotations

import pytest
import torch

from inversion.embedding import LearnedEmbedding
from inversion.host import Conditioning
from inversion.methods.init import make_embedding, vocab_mean_norm
from inversion.methods.interpolate import slerp, slerp_embeddings
from inversion.methods.optim import ProjectedAdamW, RiemannianSGD, tangent_project
from inversion.methods.presets import PRESETS, MethodParams, build_method
from inversion.methods.loss import grad_norms_at
from inversion.methods.profiler import GradProfile, profile_gradients
from inversion.methods.regularizers import L2Norm, NearestNeighborContrastive, RegContext
from inversion.methods.timesteps import Adaptive, Interval, Single, Uniform, high_grad
from inversion.trainer import TrainConfig, Trainer, prepare_concept
from tiny_models import concept_images


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- timestep strategies ----------------------------------------------------------------------

@pytest.mark.parametrize("a, b", [(900, 1000), (0, 100), (350, 450)])
def test_interval_never_leaves_its_bounds(a, b):
    t = Interval(a, b, 1000).sample(20000, gen())
    assert int(t.min()) == a and int(t.max()) == min(b, 999)
    assert len(t.unique()) == min(b, 999) - a + 1


def test_single_and_uniform():
    assert Single(400).sample(100, gen()).unique().tolist() == [400]
    t = Uniform(1000).sample(50000, gen())
    assert t.min() == 0 and t.max() == 999
    assert abs(float((t < 500).float().mean()) - 0.5) < 0.02


def test_bad_intervals_are_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        Interval(500, 400)
    with pytest.raises(ValueError, match="outside"):
        Single(1000)


def test_adaptive_puts_mass_where_g_is_large():
    s = Adaptive(1000, bins=10, explore=0.1)
    g_true = torch.tensor([0.1, 0.1, 0.2, 1.0, 0.8, 0.3, 0.1, 0.1, 0.1, 0.1])
    # Before every bin is measured the draws are uniform.
    assert torch.allclose(s.probabilities(), torch.full((10,), 0.1, dtype=torch.float64))
    g = gen(1)
    for _ in range(300):  # feed back the known g(t) of whatever was sampled, as training does
        t = s.sample(4, g)
        s.observe(t, g_true[s.bin_of(t)] * (1 + 0.05 * torch.randn(4, generator=g)))
    p = s.probabilities()
    expected = 0.9 * g_true / g_true.sum() + 0.01
    assert torch.allclose(p, expected.double(), atol=0.02)
    hist = torch.bincount(s.bin_of(s.sample(20000, gen(2))), minlength=10).double() / 20000
    assert int(hist.argmax()) == 3 and hist[3] > 2 * hist[5] > 0
    assert hist.min() >= 0.01 * 0.5  # exploration keeps every bin sampled


def test_adaptive_state_roundtrip_and_profile_seed():
    prof = GradProfile.from_samples(torch.tensor([50, 550, 950]), torch.tensor([1.0, 5.0, 1.0]),
                                    torch.tensor([0, 100, 500, 600, 1000]), 1000)
    s = Adaptive(1000, bins=10, profile=prof)
    p = s.probabilities()
    assert int(p.argmax()) == 5  # seeded from the profile: mass at [500, 600) at once
    s2 = Adaptive(1000, bins=10)
    s2.load_state_dict(s.state_dict())
    assert torch.equal(s2.probabilities(), p)


# ---- the profiler -----------------------------------------------------------------------------

def test_grad_norm_matches_direct_autograd_and_finite_differences(tiny):
    torch.manual_seed(0)
    enc = tiny.encoder
    from inversion.data.prompts import build_prompt_batch
    pb = build_prompt_batch(enc, ["a photo of a cat", "a red dog", "a toy"], {})
    ctx = enc.encode(pb.ids, pb.slots, torch.zeros(1, 32)).hidden.detach()
    x0 = concept_images(3) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([100, 400, 800])
    g = grad_norms_at(tiny.denoiser, Conditioning(ctx), x0, noise, t)
    for i in range(3):  # the paper's quantity for one sample: || grad_c || eps_hat - eps || ||
        c = ctx[i:i + 1].clone().requires_grad_(True)
        eps = tiny.denoiser.predict_eps(tiny.denoiser.add_noise(x0[i:i + 1], noise[i:i + 1], t[i:i + 1]), t[i:i + 1],
                                        Conditioning(c))
        direct, = torch.autograd.grad((eps - noise[i:i + 1]).norm(), c)
        assert float(g[i]) == pytest.approx(float(direct.norm()), rel=1e-4)
    # and a central finite difference (float64) along the gradient direction agrees
    tiny.net.double()
    x0, noise, ctx = x0.double(), noise.double(), ctx.double()
    for i in range(3):
        c = ctx[i:i + 1].clone().requires_grad_(True)

        def f(cc, i=i):
            eps = tiny.denoiser.predict_eps(tiny.denoiser.add_noise(x0[i:i + 1], noise[i:i + 1], t[i:i + 1]),
                                            t[i:i + 1], Conditioning(cc))
            return (eps - noise[i:i + 1]).norm()
        direct, = torch.autograd.grad(f(c), c)
        d, h = direct / direct.norm(), 1e-5
        with torch.no_grad():
            fd = float((f(ctx[i:i + 1] + h * d) - f(ctx[i:i + 1] - h * d)) / (2 * h))
        assert fd == pytest.approx(float(g[i]), rel=1e-3)


def test_profile_curve_spread_and_window(tiny):
    emb = make_embedding(tiny.text, "toy", init_word="toy")
    c = prepare_concept(tiny.latents, concept_images(2), emb)
    calls = []
    prof = profile_gradients(tiny.text, tiny.denoiser, [c], bins=5, samples_per_bin=3, batch_size=4,
                             callback=lambda p: calls.append((p.step, p.total)))
    assert prof.bins == 5 and prof.count.tolist() == [3] * 5
    assert (prof.mean > 0).all() and (prof.std >= 0).all()
    assert calls[-1] == (4, 4)  # 15 draws in batches of 4
    assert all(prof.edges[i] <= t < prof.edges[i + 1] for i, t in
               zip(torch.bucketize(prof.t, prof.edges[1:], right=True).tolist(), prof.t.tolist()))
    a, b = prof.best_window(200)
    assert b - a == 199 and 0 <= a and b < 1000
    assert GradProfile.from_dict(prof.to_dict()).best_window(200) == (a, b)
    hg = high_grad(prof, 200)
    assert (hg.a, hg.b) == (a, b)


def test_best_window_finds_the_peak():
    prof = GradProfile.from_samples(torch.arange(5, 1000, 10), torch.exp(-((torch.arange(5, 1000, 10) - 420.0) / 60) ** 2),
                                    torch.linspace(0, 1000, 21).long(), 1000)
    a, b = prof.best_window(100)
    assert 350 <= a <= 400 and b == a + 99


# ---- Directional TI ---------------------------------------------------------------------------

def test_dti_keeps_the_norm_and_steps_in_the_tangent_plane(tiny):
    emb = make_embedding(tiny.text, "toy", init_text="red toy")
    c = prepare_concept(tiny.latents, concept_images(2), emb)
    m = build_method("directional", tiny.text, 1000, MethodParams(class_word="toy"), init_vectors=emb.vectors)
    m_star = vocab_mean_norm(tiny.encoder)
    norms = []
    tr = Trainer(tiny.text, tiny.denoiser, [c], TrainConfig(steps=12, batch_size=2, lr=0.05),
                 timesteps=m.sampler, optimizer=m.optimizer)
    assert torch.allclose(tr.params["clip_l"].norm(dim=-1), torch.full((2,), m_star), atol=1e-5)
    prev = tr.params["clip_l"].detach().clone()
    turns = []
    for _ in range(12):
        info = tr.train_step()
        norms += info.vector_norms["clip_l"]
        cur = tr.params["clip_l"].detach().clone()
        turns.append(torch.nn.functional.cosine_similarity(prev, cur, dim=-1))
        prev = cur
    assert max(abs(n - m_star) for n in norms) < 1e-5
    assert info.target_norms == {"clip_l": pytest.approx(m_star)} and info.bin_edges is None
    # every step turns each vector by about lr radians (normalised Riemannian step)
    angles = torch.arccos(torch.stack(turns).clamp(-1, 1))
    assert torch.allclose(angles, torch.full_like(angles, 0.05), atol=2e-3)


def test_tangent_projection_is_orthogonal_and_first_order_step_stays_on_sphere():
    v = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    g = torch.randn(3, 16)
    gt = tangent_project(g, v)
    assert torch.allclose((gt * v).sum(-1), torch.zeros(3), atol=1e-6)
    step = 1e-3 * gt / gt.norm(dim=-1, keepdim=True)
    assert torch.allclose((v - step).norm(dim=-1), torch.ones(3), atol=1e-6)  # off-sphere only at O(lr^2)


def test_vmf_prior_pulls_toward_mu_when_data_gradient_is_zero():
    mu = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1) * 2.0
    opt = RiemannianSGD({"clip_l": 2.0}, {"clip_l": mu}, kappa=1e-4)
    params = {"clip_l": p}
    opt.prepare(params)
    cos = [torch.nn.functional.cosine_similarity(p, mu, dim=-1)]
    for _ in range(20):
        p.grad = torch.zeros_like(p)
        opt.step(params, 0.05)
        cos.append(torch.nn.functional.cosine_similarity(p, mu, dim=-1))
    cos = torch.stack(cos)
    assert (cos[1:] > cos[:-1]).all()
    assert torch.allclose(p.norm(dim=-1), torch.full((2,), 2.0), atol=1e-5)


def test_projected_adamw_keeps_the_norm():
    p = torch.randn(2, 8)
    opt = ProjectedAdamW({"k": 3.0}, kappa=0.0)
    params = {"k": p}
    opt.prepare(params)
    for _ in range(5):
        p.grad = torch.randn_like(p)
        opt.step(params, 0.1)
    assert torch.allclose(p.norm(dim=-1), torch.full((2,), 3.0), atol=1e-5)


# ---- regularisers -----------------------------------------------------------------------------

def test_contrastive_is_lower_near_real_tokens(tiny):
    table = tiny.encoder.token_table().detach()
    reg = NearestNeighborContrastive(weight=1.0)
    ctx = RegContext({"clip_l": table})
    near = {"clip_l": table[[10, 20]] + 0.01 * torch.randn(2, 32)}
    far = {"clip_l": torch.randn(2, 32) * table.norm(dim=-1).mean()}
    assert float(reg(near, ctx)) < float(reg(far, ctx))


def test_contrastive_uses_other_concepts_as_negatives(tiny):
    table = tiny.encoder.token_table().detach()
    reg = NearestNeighborContrastive(weight=1.0, vocab_negatives=False, tau=1.0)
    v = table[[5, 6]].clone()
    alone = reg({"clip_l": v}, RegContext({"clip_l": table}, [range(0, 2)]))
    assert float(alone) == pytest.approx(0.0, abs=1e-6)  # Eq. 2 without negatives is constant
    together = reg({"clip_l": v}, RegContext({"clip_l": table}, [range(0, 1), range(1, 2)]))
    assert float(together) > 0.0


def test_regularisers_train_and_l2_shrinks_the_norm(tiny):
    emb = make_embedding(tiny.text, "toy", init_word="toy")
    c = prepare_concept(tiny.latents, concept_images(2), emb)
    norms = {}
    for w in (0.0, 50.0):
        tr = Trainer(tiny.text, tiny.denoiser, [c], TrainConfig(steps=10, batch_size=2, lr=5e-2),
                     regularizers=[L2Norm(w), NearestNeighborContrastive(1e-3)])
        res = tr.run()
        norms[w] = res.history.vector_norm[-1]
    assert norms[50.0] < norms[0.0]


# ---- SLERP ------------------------------------------------------------------------------------

def test_slerp_endpoints_norm_and_errors():
    a = LearnedEmbedding("a", {"clip_l": torch.nn.functional.normalize(torch.randn(2, 8), dim=-1) * 3})
    b = LearnedEmbedding("b", {"clip_l": torch.nn.functional.normalize(torch.randn(2, 8), dim=-1) * 3})
    assert torch.allclose(slerp_embeddings(a, b, 0.0).vectors["clip_l"], a.vectors["clip_l"], atol=1e-5)
    assert torch.allclose(slerp_embeddings(a, b, 1.0).vectors["clip_l"], b.vectors["clip_l"], atol=1e-5)
    mid = slerp_embeddings(a, b, 0.5, name="mid")
    assert mid.name == "mid" and torch.allclose(mid.vectors["clip_l"].norm(dim=-1), torch.full((2,), 3.0))
    ca = torch.nn.functional.cosine_similarity(mid.vectors["clip_l"], a.vectors["clip_l"], dim=-1)
    cb = torch.nn.functional.cosine_similarity(mid.vectors["clip_l"], b.vectors["clip_l"], dim=-1)
    assert torch.allclose(ca, cb, atol=1e-5)  # halfway along the great circle
    with pytest.raises(ValueError, match="same number of vectors"):
        slerp_embeddings(a, LearnedEmbedding("c", {"clip_l": torch.randn(3, 8)}), 0.5)
    assert torch.allclose(slerp(torch.ones(1, 4), torch.ones(1, 4), 0.3), torch.ones(1, 4))


def test_slerp_between_opposite_vectors_stays_on_the_sphere():
    """Exactly opposite rows have no great circle between them: the path is the half circle through a
    fixed orthogonal direction (the linear fallback went through the zero vector at alpha 0.5)."""
    v0 = torch.tensor([[3.0, 1.0, -2.0, 0.5], [1.0, 0.0, 0.0, 0.0]])
    v1 = -2 * v0
    path = [slerp(v0, v1, a) for a in (0.0, 0.25, 0.5, 0.75, 1.0)]
    for a, v in zip((0.0, 0.25, 0.5, 0.75, 1.0), path):
        want = (1 - a) * v0.norm(dim=-1) + a * v1.norm(dim=-1)
        assert torch.isfinite(v).all() and torch.allclose(v.norm(dim=-1), want, atol=1e-5), (a, v)
    u0 = torch.nn.functional.normalize(v0, dim=-1)
    cos = [torch.nn.functional.cosine_similarity(v, u0, dim=-1) for v in path]
    assert torch.allclose(cos[2], torch.zeros(2), atol=1e-6)  # halfway: orthogonal to both ends
    assert all(bool((c1 < c0).all()) for c0, c1 in zip(cos, cos[1:]))  # monotone from v0 to v1
    torch.testing.assert_close(path[0], v0)
    torch.testing.assert_close(path[-1], v1, atol=1e-5, rtol=0)
    assert torch.equal(slerp(v0, v1, 0.5), slerp(v0, v1, 0.5))  # the same path every time


# ---- presets ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_trains_and_the_loss_falls(tiny, name):
    emb = make_embedding(tiny.text, "toy", init_word="toy", k=2)
    c = prepare_concept(tiny.latents, concept_images(4), emb)
    profile = None
    if "high_grad" in name:
        profile = profile_gradients(tiny.text, tiny.denoiser, [c], bins=10, samples_per_bin=2, batch_size=4)
    m = build_method(name, tiny.text, 1000, MethodParams(class_word="toy", window=200), profile=profile,
                     init_vectors=emb.vectors)
    lr = 5e-2 if m.lr < 1e-2 else 0.1
    tr = Trainer(tiny.text, tiny.denoiser, [c], TrainConfig(steps=25, batch_size=4, lr=lr),
                 timesteps=m.sampler, optimizer=m.optimizer)
    before = tr.evaluate()
    res = tr.run()
    assert res.steps_done == 25
    assert tr.evaluate() < before


def test_high_grad_without_profile_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="GradNormProfiler"):
        build_method("high_grad", tiny.text, 1000)
    with pytest.raises(ValueError, match="unknown method"):
        build_method("fastest", tiny.text, 1000)


# ---- DTI prior per vector (issue 13) ----------------------------------------------------------

def _mu(tiny, init_text=None, class_word="", **init):
    emb = make_embedding(tiny.text, "c", init_text=init_text, **init)
    m = build_method("directional", tiny.text, 1000, MethodParams(class_word=class_word),
                     init_vectors=emb.vectors, init_text=emb.metadata["init_text"] or None)
    return m.optimizer.mu["clip_l"]


def _dirs(tiny, words):
    table = tiny.encoder.token_table().detach().float()
    return torch.nn.functional.normalize(table[[tiny.encoder.tokenize(w)[0] for w in words]], dim=-1)


def test_dti_class_word_pulls_only_its_own_row(tiny):
    """'a red toy' + class word 'toy': only the row of 'toy' is pulled toward 'toy'; 'a' and 'red' toward
    themselves (seeds/002's per-token prior), not all three toward the class word."""
    mu = _mu(tiny, "a red toy", "toy")
    assert torch.allclose(mu, _dirs(tiny, ["a", "red", "toy"]), atol=1e-6)
    assert not torch.allclose(mu[0], _dirs(tiny, ["toy"])[0], atol=1e-3)


def test_dti_without_class_word_every_row_keeps_its_own_direction(tiny):
    emb = make_embedding(tiny.text, "c", init_text="a red toy")
    assert torch.allclose(_mu(tiny, "a red toy"), torch.nn.functional.normalize(emb.vectors["clip_l"], dim=-1))


def test_dti_class_word_for_one_token_absent_and_repeated_inits(tiny):
    assert torch.allclose(_mu(tiny, "car", "dog"), _dirs(tiny, ["dog"]), atol=1e-6)  # k = 1: the class word
    # absent from the text: the last row (the head noun) takes it, the others keep their tokens
    assert torch.allclose(_mu(tiny, "a red car", "dog"), _dirs(tiny, ["a", "red", "dog"]), atol=1e-6)
    # a word repeated k times: every row stands for the concept
    assert torch.allclose(_mu(tiny, None, "dog", init_word="car", k=3), _dirs(tiny, ["dog"] * 3), atol=1e-6)


def test_dti_prior_rows_per_encoder_sdxl(tiny_sdxl):
    emb = make_embedding(tiny_sdxl.text, "c", init_text="a red toy")
    m = build_method("directional", tiny_sdxl.text, 1000, MethodParams(class_word="dog"), init_vectors=emb.vectors,
                     init_text="a red toy")
    for enc in tiny_sdxl.text.encoders:
        table = torch.nn.functional.normalize(enc.token_table().detach().float(), dim=-1)
        want = table[[enc.tokenize(w)[0] for w in ("a", "red", "dog")]]
        assert torch.allclose(m.optimizer.mu[enc.key], want, atol=1e-6)


# ---- the two readings of seeds/000 Eq. 4: g w.r.t. c ("context") or the learned rows ("tokens") ------

def _one_sample_g(text_data, den, vectors, prompt, x0, noise, t, mask, reading):
    """The paper's quantity for one sample alone, by direct autograd: || grad ||r|| || w.r.t. c or the rows."""
    x0, noise, t = x0[None], noise[None], t[None]
    mask = None if mask is None else mask[None]

    def rnorm(cond):
        r = tiny_eps(den, x0, noise, t, cond) - noise
        return (r if mask is None else r * mask.sqrt()).norm()
    if reading == "context":
        with torch.no_grad():
            cond = text_data.encode([prompt], vectors)
        c = cond.context.clone().requires_grad_(True)
        grads = torch.autograd.grad(rnorm(Conditioning(c, cond.pooled)), [c])
    else:
        v = {k: x.detach().clone().requires_grad_(True) for k, x in vectors.items()}
        grads = torch.autograd.grad(rnorm(text_data.encode([prompt], v)), list(v.values()))
    return float(sum(g.pow(2).sum() for g in grads).sqrt())


def tiny_eps(den, x0, noise, t, cond):
    return den.predict_eps(den.add_noise(x0, noise, t), t, cond)


@pytest.mark.parametrize("world", ["tiny", "tiny_sdxl"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("reading", ["context", "tokens"])
def test_each_reading_matches_direct_autograd_with_repeated_prompts(request, world, masked, reading):
    from inversion.data.batch import ConceptSet
    from inversion.methods.loss import token_grad_norms_at
    w = request.getfixturevalue(world)
    c1 = prepare_concept(w.latents, concept_images(2), make_embedding(w.text, "toy", init_word="toy", k=2))
    c2 = prepare_concept(w.latents, concept_images(2, seed=1), make_embedding(w.text, "cat", init_word="cat"))
    data = ConceptSet(w.text, [c1, c2], ("a photo of {}", "a red {}"))
    p1, p2 = c1.embedding.placeholder, c2.embedding.placeholder
    # the dedup case: samples 0, 1 and 3 share one prompt (ConceptSet.encode encodes it once)
    prompts = [f"a photo of {p1}", f"a photo of {p1}", f"a red {p2}", f"a photo of {p1}", f"a red {p1}"]
    torch.manual_seed(1)
    x0 = concept_images(5) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([100, 400, 400, 800, 600])
    mask = torch.rand(5, 1, 16, 16) if masked else None
    vectors = data.initial_vectors()
    if reading == "context":
        with torch.no_grad():
            cond = data.encode(prompts, vectors)
        g = grad_norms_at(w.denoiser, cond, x0, noise, t, mask)
    else:
        v = {k: x.requires_grad_(True) for k, x in vectors.items()}
        cond, rows = data.encode_per_sample(prompts, v)
        assert all(r.shape == (5, 3, x.shape[1]) for r, x in zip(rows.values(), v.values()))
        g = token_grad_norms_at(w.denoiser, cond, rows, x0, noise, t, mask)
    direct = [_one_sample_g(data, w.denoiser, vectors, prompts[i], x0[i], noise[i], t[i],
                            None if mask is None else mask[i], reading) for i in range(5)]
    assert g.tolist() == pytest.approx(direct, rel=1e-4)
    assert len({round(float(x), 6) for x in g[[0, 1, 3]]}) == 3  # per sample, never the shared prompt's sum


@pytest.mark.parametrize("reading", ["context", "tokens"])
def test_trainer_g_is_each_samples_own_for_each_reading(tiny, reading):
    from inversion.data.batch import step_generator
    c = prepare_concept(tiny.latents, concept_images(2), make_embedding(tiny.text, "toy", init_word="toy", k=2))
    cfg = TrainConfig(steps=3, batch_size=4, grad_accum=2, lr=5e-2, templates=("a photo of {}", "a red {}"),
                      g_reading=reading)
    tr = Trainer(tiny.text, tiny.denoiser, [c], cfg, timesteps=Adaptive(1000, bins=5))  # a sampler that reads g
    v0 = {k: p.detach().clone() for k, p in tr.params.items()}
    expected = []
    for micro in range(cfg.grad_accum):  # the draws train_step will make, replayed
        d = tr.data.draw(step_generator(cfg.seed, 0, micro), cfg.batch_size, tr.sampler.sample)
        assert len(set(d.prompts)) < len(d.prompts)  # two templates, four samples: prompts repeat
        expected += [_one_sample_g(tr.data, tiny.denoiser, v0, d.prompts[i], d.x0[i], d.noise[i], d.t[i], None,
                                   reading) for i in range(cfg.batch_size)]
    info = tr.train_step()
    assert info.grad_norms == pytest.approx(expected, rel=1e-4)


def test_the_reading_changes_g_but_not_the_vectors_step(tiny):
    """With a sampler that reads g; a fixed range always records the context reading (free)."""
    c = prepare_concept(tiny.latents, concept_images(2), make_embedding(tiny.text, "toy", init_word="toy", k=2))
    runs = {}
    for reading in ("context", "tokens"):  # one step: the adaptive sampler's first draws do not depend on g
        tr = Trainer(tiny.text, tiny.denoiser, [c], TrainConfig(steps=1, batch_size=4, lr=5e-2, g_reading=reading),
                     timesteps=Adaptive(1000, bins=5))
        runs[reading] = tr.run()
    h_c, h_t = runs["context"].history, runs["tokens"].history
    assert h_c.timesteps == h_t.timesteps  # the same draws
    # per-sample copies sum to the shared rows' gradient: the same steps (up to summation order)
    assert torch.allclose(runs["context"].embedding.vectors["clip_l"], runs["tokens"].embedding.vectors["clip_l"],
                          rtol=1e-4, atol=1e-6)
    assert not torch.allclose(torch.tensor(h_c.sample_grad_norms), torch.tensor(h_t.sample_grad_norms))


def test_adaptive_sampler_learns_from_the_tokens_reading(tiny):
    c = prepare_concept(tiny.latents, concept_images(2), make_embedding(tiny.text, "toy", init_word="toy", k=2))
    s = Adaptive(1000, bins=5)
    res = Trainer(tiny.text, tiny.denoiser, [c], TrainConfig(steps=6, batch_size=4, lr=5e-2, g_reading="tokens"),
                  timesteps=s).run()
    assert int(s.count.sum()) == 24
    assert torch.isfinite(s.estimate).all() and (s.estimate[s.count > 0] > 0).all()
    replay = Adaptive(1000, bins=5)  # what it observed is the history's g: the tokens reading's
    for t, g in zip(res.history.timesteps, res.history.sample_grad_norms):
        replay.observe(torch.tensor(t), torch.tensor(g))
    assert torch.equal(replay.estimate, s.estimate)
    s_ctx = Adaptive(1000, bins=5)
    ctx = Trainer(tiny.text, tiny.denoiser, [c], TrainConfig(steps=1, batch_size=4, lr=5e-2, g_reading="context"),
                  timesteps=s_ctx).run()
    assert ctx.history.timesteps[0] == res.history.timesteps[0]  # the first step's draws do not depend on g
    assert ctx.history.sample_grad_norms[0] != pytest.approx(res.history.sample_grad_norms[0], rel=1e-3)


def test_profile_tokens_reading_and_bad_readings(tiny):
    from inversion.options import TrainingOptions
    c = prepare_concept(tiny.latents, concept_images(2), make_embedding(tiny.text, "toy", init_word="toy"))
    kw = dict(bins=4, samples_per_bin=2, batch_size=4)
    p_c = profile_gradients(tiny.text, tiny.denoiser, [c], reading="context", **kw)
    p_t = profile_gradients(tiny.text, tiny.denoiser, [c], **kw)  # tokens: the default
    assert (p_c.reading, p_t.reading) == ("context", "tokens")
    assert torch.equal(p_c.t, p_t.t) and (p_t.g > 0).all() and not torch.allclose(p_c.g, p_t.g)
    assert "reading" not in p_c.to_dict() and GradProfile.from_dict(p_t.to_dict()).reading == "tokens"
    with pytest.raises(ValueError, match="reading must be one of context, tokens"):
        profile_gradients(tiny.text, tiny.denoiser, [c], reading="rows", **kw)
    with pytest.raises(ValueError, match="g_reading must be one of context, tokens, got 'rows'"):
        TrainConfig(g_reading="rows").validate()
    with pytest.raises(ValueError, match="g_reading must be one of"):
        TrainingOptions(g_reading="rows").validate()
    assert TrainConfig().g_reading == TrainingOptions().g_reading == "tokens"  # the better reading on world v2


def test_a_sampler_that_ignores_g_never_pays_for_the_tokens_reading(tiny, monkeypatch):
    c = prepare_concept(tiny.latents, concept_images(2), make_embedding(tiny.text, "toy", init_word="toy"))
    cfg = TrainConfig(steps=1, batch_size=4, lr=5e-2, templates=("a photo of {}",), g_reading="tokens")
    per_sample = []
    tr = Trainer(tiny.text, tiny.denoiser, [c], cfg)  # uniform timesteps
    monkeypatch.setattr(tr.data, "encode_per_sample", lambda *a, **k: per_sample.append(1))
    tr.run()
    assert per_sample == []


def test_logit_normal_draws_the_middle_and_intervals_scale_to_the_table():
    from inversion.methods.timesteps import LogitNormal, scaled

    t = LogitNormal(1000).sample(20000, torch.Generator().manual_seed(0)).double()
    assert 0 <= t.min() and t.max() <= 999
    assert abs(float(t.mean()) - 500) < 10  # symmetric about the middle (m = 0)
    middle = float(((t >= 250) & (t < 750)).double().mean())
    assert 0.70 < middle < 0.76  # P(|logit u| < ln 3) for s = 1: 0.727; uniform would give 0.5
    assert scaled(350, 10000) == 3500 and scaled(350, 1000) == 350
    m = build_method("interval", None, 10000)
    assert (m.sampler.a, m.sampler.b) == (3500, 4500)


class _NoStartEncoder:
    """A T5-like encoder for the prompt builder: no start token, EOS 1, pad 0, words split into other pieces."""

    key, width, max_length, bos_id, eos_id, pad_id = "t5xxl", 4, 8, None, 1, 0

    def tokenize(self, text):
        return [len(w) + 1 for w in text.split() for _ in range(2)]  # two pieces per word

    def token_table(self):
        return torch.arange(40.0).view(10, 4)


def test_prompts_without_a_start_token_and_init_rows_for_another_tokenizer(tiny):
    from inversion.data.prompts import build_prompt_batch
    from inversion.methods.init import from_text

    pb = build_prompt_batch(_NoStartEncoder(), ["a <c> x"], {"<c>": (0, 2)})
    assert pb.ids.tolist() == [[2, 2, 0, 0, 2, 2, 1, 0]] and pb.slots.tolist() == [[-1, -1, 0, 1, -1, -1, -1, -1]]
    rows = from_text([tiny.encoder, _NoStartEncoder()], "red toy")
    k = rows[tiny.encoder.key].shape[0]  # the CLIP's count decides k
    t5 = rows["t5xxl"]
    assert t5.shape == (k, 4) and torch.equal(t5[0], t5[-1])  # T5's pieces averaged, k times
    assert torch.allclose(t5[0], torch.arange(40.0).view(10, 4)[[4, 4, 4, 4]].mean(0))
