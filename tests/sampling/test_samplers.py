import pytest
import torch

from medldm.config import SchedulerConfig
from medldm.models.builders import build_scheduler
from medldm.sampling.samplers import predict_x0, sample, training_target


def oracle(scheduler, x0):
    """A perfect denoiser for a single known clean sample x0."""

    def denoiser(z_t, t):
        if scheduler.__class__.__name__ == "RFlowScheduler":
            s = (t.float() / scheduler.num_train_timesteps).reshape(-1, 1, 1, 1)
            return (x0 - z_t) / s
        a = scheduler.alphas_cumprod[t.long()].reshape(-1, 1, 1, 1)
        eps = (z_t - a.sqrt() * x0) / (1 - a).sqrt()
        return training_target(scheduler, x0.expand_as(z_t), eps, t)

    return denoiser


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_ddim_with_oracle_returns_x0(pred):
    sched = build_scheduler(SchedulerConfig(prediction_type=pred), "ddim")
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = sample(oracle(sched, x0), z, sched, steps=10)
    torch.testing.assert_close(out, x0, atol=1e-3, rtol=1e-3)


def test_rflow_with_oracle_returns_x0():
    sched = build_scheduler(SchedulerConfig(kind="rflow"), spatial_dims=2)
    x0 = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    z = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sample(oracle(sched, x0), z, sched, steps=10), x0, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_inverts_training_target(pred):
    sched = build_scheduler(SchedulerConfig(prediction_type=pred), "ddpm")
    x0, n = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    t = torch.tensor([0, 10, 500, 999])
    z_t = sched.add_noise(x0, n, t)
    torch.testing.assert_close(predict_x0(sched, z_t, t, training_target(sched, x0, n, t)), x0, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("kind", ["ddim", "rflow"])
def test_corrector_steers_the_result(kind):
    sched = build_scheduler(SchedulerConfig(kind=kind), kind, spatial_dims=2)
    x0 = torch.zeros(1, 1, 8, 8)
    target = torch.full((1, 1, 8, 8), 0.5)
    out = sample(oracle(sched, x0), torch.randn(1, 1, 8, 8), sched, steps=8,
                 correct=lambda z0, i: target, correct_every=2)
    torch.testing.assert_close(out, target)


def test_stochastic_ddim_is_seeded():
    sched = build_scheduler(SchedulerConfig(), "ddim")
    x0 = torch.zeros(1, 1, 8, 8)
    den = lambda z, t: torch.zeros_like(z)  # noqa: E731 - an imperfect model, so eta matters
    z = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    a = sample(den, z, sched, steps=5, eta=1.0, generator=torch.Generator().manual_seed(7))
    b = sample(den, z, sched, steps=5, eta=1.0, generator=torch.Generator().manual_seed(7))
    c = sample(den, z, sched, steps=5, eta=1.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    del x0


def test_ddpm_scheduler_is_refused_for_sampling():
    sched = build_scheduler(SchedulerConfig(), "ddpm")
    with pytest.raises(TypeError, match="DDIM"):
        sample(lambda z, t: z, torch.zeros(1, 1, 4, 4), sched, steps=2)
