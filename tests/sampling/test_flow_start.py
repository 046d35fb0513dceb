"""Flow models that start from a guide's latent (scheduler.start): where sampling starts, that seeds differ, and
that "no diffusion" is the start image's VAE reconstruction."""

import numpy as np
import pytest
import torch

from medldm.config import SchedulerConfig
from medldm.errors import ConfigError
from medldm.config import parse_config
from medldm.io.volume import Volume
from medldm.models.builders import build_scheduler
from medldm.models.bundle import load_bundle
from medldm.sampling.measurement import simulate
from medldm.sampling.reconstructor import Reconstructor
from medldm.sampling.slicewise import restore_slices
from medldm.training.bridge import flow_inputs
from tests.conftest import phantom
from tests.helpers import make_tiny_bundle


class ZeroVelocity(torch.nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x[:, :2])


def test_a_flow_with_zero_velocity_stays_at_its_start(tmp_path):
    bundle = load_bundle(make_tiny_bundle(tmp_path / "m", "recon", "MR", flow_start="naive"))
    bundle.config.scheduler.start_noise = 1e-6
    bundle.unet = ZeroVelocity()
    cond = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(samples=1, steps=4, seed=0, batch_size=2, refine=False, start=cond)
    flowed = restore_slices(bundle, cond, **kw)["decoded"]
    vae_only = restore_slices(bundle, cond, use_diffusion=False, **kw)["decoded"]
    torch.testing.assert_close(flowed, vae_only, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="starts from its naive image"):
        restore_slices(bundle, cond, samples=1, steps=2, seed=0, batch_size=2)


@pytest.mark.slow
def test_seeds_give_different_samples_and_an_uncertainty_map(tmp_path):
    rec = Reconstructor.load(make_tiny_bundle(tmp_path / "m", "recon", "MR", flow_start="tv-pocs"), device="cpu")
    vol = Volume((phantom((32, 32, 3)) * 100)[None].astype(np.float32), np.eye(4), "MR")
    m = simulate(vol, "recon", seed=0, accelerations=[4], center_fractions=[0.08])
    # refine=False: the tiny model's untrained refiner (zero last layer) returns its guide whatever the sample
    a = rec(m, steps=3, seed=0, refine=False).volume.array
    b = rec(m, steps=3, seed=1, refine=False).volume.array
    assert np.isfinite(a).all() and np.abs(a - b).max() > 1e-3 * np.abs(a).max()
    res = rec(m, steps=3, samples=2, seed=0, refine=False)
    assert res.uncertainty is not None and res.uncertainty.array.max() > 0
    assert res.provenance["parameters"]["use_diffusion"] is True


def test_flow_training_inputs_run_from_source_to_truth():
    sched = build_scheduler(SchedulerConfig(kind="rflow", start="naive"), spatial_dims=2)
    truth, start = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    inp, t, target = flow_inputs(sched, truth, start, 0.3, torch.Generator().manual_seed(0))
    s = (t / sched.num_train_timesteps).reshape(-1, 1, 1, 1)
    x_t, source = inp[:, :2], truth - target
    torch.testing.assert_close(x_t, (1 - s) * truth + s * source)  # the straight path, velocity truth - source
    torch.testing.assert_close(inp[:, 2:4], start)  # conditioned on the start latent
    assert ((source - start).std() - 0.3).abs() < 0.2


def test_a_flow_start_needs_rflow():
    with pytest.raises(ConfigError, match="needs kind: rflow"):
        parse_config({"kind": "ddpm", "start": "naive"}, SchedulerConfig)


def test_shrunk_starts_lie_between_the_start_and_the_truth():
    sched = build_scheduler(SchedulerConfig(kind="rflow", start="naive"), spatial_dims=2)
    truth, start = torch.randn(64, 2, 4, 4), torch.randn(64, 2, 4, 4)
    inp, _, _ = flow_inputs(sched, truth, start, 0.3, torch.Generator().manual_seed(0), shrink_min=0.25)
    shrunk = inp[:, 2:4]  # the condition is the shrunk start
    a = ((shrunk - truth) / (start - truth)).flatten(1)
    torch.testing.assert_close(a.min(1).values, a.max(1).values, atol=1e-3, rtol=1e-3)  # one factor per pair
    assert a.min() >= 0.25 - 1e-5 and a.max() <= 1 + 1e-5 and a.std() > 0.1
    same, _, _ = flow_inputs(sched, truth, start, 0.3, torch.Generator().manual_seed(0), shrink_min=1.0)
    torch.testing.assert_close(same[:, 2:4], start)  # 1 = off
