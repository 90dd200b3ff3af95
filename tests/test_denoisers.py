"""The denoiser protocol's objectives (issue 24): epsilon, v and rectified flow in sigma space, each on a tiny model."""

from __future__ import annotations

import pytest
import torch

from inversion.hosts.hf import FlowDenoiser, ScheduledDenoiser
from inversion.methods.init import make_embedding
from inversion.methods.loss import prediction_and_target
from inversion.schedule import DDPMSchedule, FlowMatchingSchedule
from inversion.trainer import TrainConfig, Trainer, prepare_concept
from tiny_models import concept_images


def test_flow_schedule_in_sigma_space():
    plain, shifted = FlowMatchingSchedule.make(1000), FlowMatchingSchedule.make(1000, shift=3.0)
    for s in (plain, shifted):
        assert s.num_timesteps == 1000 and bool((s.sigmas[1:] > s.sigmas[:-1]).all())
        assert float(s.sigmas[-1]) == pytest.approx(1.0) and 0 < float(s.sigmas[0]) < 0.01
    assert float(plain.sigmas[499]) == pytest.approx(0.5)
    assert float(shifted.sigmas[499]) == pytest.approx(0.75)  # SD3's shift: more of the steps at high noise
    with pytest.raises(ValueError, match="shift > 0"):
        FlowMatchingSchedule.make(1000, shift=0.0)


def test_targets_agree_with_the_forward_processes():
    """x_t = (1 - sigma) x0 + sigma eps moves along eps - x0; a v of eps and x0 converts back to eps."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 400, 999])
    flow = FlowMatchingSchedule.make(1000, shift=3.0)
    x_t = flow.add_noise(x0, eps, t)
    v = flow.velocity_target(x0, eps, t)
    torch.testing.assert_close(flow.eps_from_velocity(x_t, v, t), eps)
    h = 1e-3  # the velocity is the derivative of x_t along sigma
    sig = flow.sigmas[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(((1 - sig - h) * x0 + (sig + h) * eps - x_t) / h, v, rtol=1e-3, atol=1e-3)
    ddpm = DDPMSchedule.make(1000)
    x_t = ddpm.add_noise(x0, eps, t)
    vt = ddpm.v_target(x0, eps, t)
    torch.testing.assert_close(ddpm.eps_from_v(x_t, vt, t), eps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ddpm.v_from_eps(x_t, eps, t), vt, rtol=1e-4, atol=1e-4)


def _denoiser(tiny, objective: str):
    if objective == "flow":
        return FlowDenoiser(tiny.net, FlowMatchingSchedule.make(1000, shift=3.0))
    return ScheduledDenoiser(tiny.net, DDPMSchedule.make(1000), objective=objective)


@pytest.mark.parametrize("objective", ["eps", "v", "flow"])
def test_each_objective_trains_only_the_vectors_and_the_loss_falls(tiny, objective):
    den = _denoiser(tiny, objective)
    emb = make_embedding(tiny.text, "toy", init_word="toy", k=2)
    concept = prepare_concept(tiny.latents, concept_images(4), emb)
    table = tiny.encoder.token_table().detach().clone()
    net = {k: v.clone() for k, v in tiny.net.state_dict().items()}
    tr = Trainer(tiny.text, den, [concept], TrainConfig(steps=40, batch_size=4, lr=5e-2, seed=1))
    before = tr.evaluate()
    res = tr.run()
    after = tr.evaluate()
    assert after < before - 1e-3, (objective, before, after)
    assert not torch.equal(res.embedding.vectors["clip_l"], emb.vectors["clip_l"])
    assert torch.equal(tiny.encoder.token_table(), table)  # the token table never moves
    assert all(torch.equal(v, net[k]) for k, v in tiny.net.state_dict().items())


def test_the_loss_compares_each_objectives_own_target(tiny):
    """eps: eps_hat vs eps (as before the objectives existed); v: the v-prediction vs sqrt(abar) eps -
    sqrt(1 - abar) x0; flow: the velocity vs eps - x0."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([100, 700])
    enc = tiny.encoder
    ids = torch.tensor([[enc.bos_id] + enc.tokenize("a photo of a toy") + [enc.eos_id] * 10] * 2)
    cond = tiny.text.combine([enc.encode(ids, torch.full_like(ids, -1), torch.zeros(1, enc.width))])
    with torch.no_grad():
        p, target = prediction_and_target(_denoiser(tiny, "eps"), x0, eps, t, cond)
        assert target is eps
        torch.testing.assert_close(p, tiny.denoiser.predict_eps(tiny.denoiser.add_noise(x0, eps, t), t, cond))
        p, target = prediction_and_target(_denoiser(tiny, "v"), x0, eps, t, cond)
        torch.testing.assert_close(target, DDPMSchedule.make(1000).v_target(x0, eps, t))
        flow = _denoiser(tiny, "flow")
        p, target = prediction_and_target(flow, x0, eps, t, cond)
        torch.testing.assert_close(target, eps - x0)
        torch.testing.assert_close(p, tiny.net(flow.add_noise(x0, eps, t), t, cond.context, cond.pooled))
    with pytest.raises(ValueError, match="objective must be eps or v"):
        ScheduledDenoiser(tiny.net, DDPMSchedule.make(1000), objective="flow")
