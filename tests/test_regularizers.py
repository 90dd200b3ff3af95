"""The seeds/003 regularisers: L2 toward the init, the vocabulary contrast and Eq. 2 across concepts,
each checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from inversion.methods.init import make_embedding
from inversion.methods.regularizers import (ConceptContrast, L2ToInit, RegContext, VocabularyContrast, contrastive)
from inversion.trainer import TrainConfig, Trainer, prepare_concept
from tiny_models import concept_images

# Three 2-d "tokens": +x, +y, -x.
TABLE = {"e": torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])}


def test_l2_to_init_is_zero_at_init_and_its_gradient_is_2w_delta():
    v0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    reg = L2ToInit(0.3)
    ctx = RegContext(TABLE, [range(0, 3)], {"e": v0})
    assert float(reg({"e": v0.clone()}, ctx)) == 0.0
    v = (v0 + torch.tensor([[1.0, 0, 0, 0], [0, -2.0, 0, 0], [0, 0, 0.5, 0.5]])).requires_grad_(True)
    loss = reg({"e": v}, ctx)
    assert float(loss.detach()) == pytest.approx(0.3 * (1 + 4 + 0.5), rel=1e-5)
    loss.backward()
    assert torch.allclose(v.grad, 2 * 0.3 * (v - v0).detach(), atol=1e-6)
    with pytest.raises(ValueError, match="initial vectors"):
        reg({"e": v}, RegContext(TABLE))


def test_vocabulary_contrast_is_a_softmax_over_the_vocabulary():
    """v = (2, 0): cosines 1, 0, -1; its one nearest token is +x; tau = 1:
    L = -log(e / (e + 1 + 1/e)). Scale-free: v = (5, 0) gives the same."""
    reg = VocabularyContrast(weight=0.5, num_neighbors=1, tau=1.0)
    want = 0.5 * (math.log(math.e + 1 + 1 / math.e) - 1)
    for x in (2.0, 5.0):
        assert float(reg({"e": torch.tensor([[x, 0.0]])}, RegContext(TABLE, [range(0, 1)]))) == pytest.approx(want)


def test_eq2_across_concepts_uses_dot_products_and_the_other_concepts():
    """Two concepts, one vector each: v1 = (2, 0), v2 = (0.5, 1); tau = 0.5, one neighbour each.
    v1: nearest +x, v1.T = 2, v1.v2 = 1 -> -log(e^4 / (e^4 + e^2)) = log(1 + e^-2).
    v2: nearest +y, v2.T = 1, v2.v1 = 1 -> -log(e^2 / (e^2 + e^2)) = log 2. The loss is their mean."""
    v = {"e": torch.tensor([[2.0, 0.0], [0.5, 1.0]], requires_grad=True)}
    reg = ConceptContrast(weight=1.0, num_neighbors=1, tau=0.5)
    loss = reg(v, RegContext(TABLE, [range(0, 1), range(1, 2)]))
    assert float(loss.detach()) == pytest.approx((math.log(1 + math.exp(-2)) + math.log(2)) / 2, rel=1e-5)
    loss.backward()
    assert v["e"].grad.abs().sum(dim=-1).gt(0).all()  # both concepts are pushed apart
    with pytest.raises(ValueError, match="several concepts"):
        reg(v, RegContext(TABLE, [range(0, 2)]))


def test_contrastive_picks_eq2_only_with_several_concepts():
    assert type(contrastive(1e-3, 1)) is VocabularyContrast
    assert type(contrastive(1e-3, 2)) is ConceptContrast


def test_l2_to_init_keeps_the_run_near_its_init(tiny):
    emb = make_embedding(tiny.text, "toy", init_text="a red toy")
    c = prepare_concept(tiny.latents, concept_images(2), emb)
    dist = {}
    for w in (0.0, 10.0):
        tr = Trainer(tiny.text, tiny.denoiser, [c], TrainConfig(steps=10, batch_size=2, lr=5e-2),
                     regularizers=[L2ToInit(w)])
        tr.run()
        dist[w] = float((tr.params["clip_l"].detach() - emb.vectors["clip_l"]).norm())
    assert dist[10.0] < 0.5 * dist[0.0]
