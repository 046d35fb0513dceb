from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from medldm.config import load_config
from medldm.models.bundle import load_bundle
from medldm.training.vae import train_vae

CONFIGS = Path(__file__).parents[2] / "configs"


def tiny_cfg(datalist, **over):
    over = {"data.datalist": str(datalist), **over}
    return load_config(CONFIGS / "vae-mr-tiny.yaml", "vae", over)


@pytest.mark.slow  # 4.5 s, the quick tier's longest; test_resume_continues_the_same_curve still trains a VAE there
def test_tiny_vae_trains_logs_and_loads(tiny_datalist, mlflow_tmp, tmp_path):
    folder = train_vae(tiny_cfg(tiny_datalist), tmp_path / "run")
    bundle = load_bundle(folder)
    assert bundle.latent_scale > 0
    assert bundle.config.normalisation.kind == "percentile"
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        mu, _ = bundle.vae.encode(x)
    assert mu.shape == (1, 2, 16, 16)
    runs = mlflow.search_runs(experiment_names=["medldm"])
    assert len(runs) == 1
    run = mlflow.get_run(runs.run_id[0])
    assert "val/psnr" in run.data.metrics and "train/loss" in run.data.metrics
    assert run.data.params["vae.latent_channels"] == "2"
    assert run.data.tags["medldm.data_cards"] == "phantom"  # the datalist entries name their source
    assert (tmp_path / "run" / "figures").is_dir()


def test_resume_continues_the_same_curve(tiny_datalist, tmp_path):
    off = {"tracking.enabled": False}
    full = train_vae(tiny_cfg(tiny_datalist, **off), tmp_path / "full")
    first_leg = train_vae(tiny_cfg(tiny_datalist, **off, **{"train.steps": 3}), tmp_path / "part")
    assert first_leg.parent == tmp_path / "part"
    # the first leg's training seconds as checkpointed (its model's figure also holds calibration time)
    first_seconds = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)["seconds"]
    resumed = train_vae(tiny_cfg(tiny_datalist, **off), tmp_path / "part", resume=True)
    assert load_bundle(resumed).record.training["seconds"] > first_seconds  # both legs counted
    a, b = load_file(str(full / "vae.safetensors")), load_file(str(resumed / "vae.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_tiny_3d_vae(tiny_datalist, tmp_path):
    cfg = tiny_cfg(tiny_datalist, **{"tracking.enabled": False, "data.spatial_dims": 3, "data.patch_size": [16, 16, 16],
                                     "train.steps": 2})
    bundle = load_bundle(train_vae(cfg, tmp_path / "r3"))
    assert bundle.spatial_dims == 3


@pytest.mark.parametrize("dims,patch,axis", [(2, [24, 20], 2), (2, [24, 16], 0), (3, [16, 16, 12], 2)])
def test_train_batches_shape_and_seeded_by_step(tiny_datalist, dims, patch, axis):
    from itertools import islice

    from medldm.config import DataConfig
    from medldm.training.data import train_batches

    cfg = DataConfig(datalist=str(tiny_datalist), spatial_dims=dims, patch_size=patch, batch_size=3, slice_axis=axis)
    a = list(islice(train_batches(cfg, seed=1), 3))
    assert all(tuple(b.shape) == (3, 1, *patch) for b in a)
    assert float(a[0].max()) > 0  # patches are centred on foreground
    resumed = next(train_batches(cfg, seed=1, start_step=2))
    torch.testing.assert_close(resumed, a[2], rtol=0, atol=0)
    assert not torch.equal(a[0], a[1])


def test_worker_processes_draw_the_same_batches_and_pairs(tiny_datalist):
    """data.num_workers only moves patch drawing and degradation ahead of the step: not one value changes."""
    from itertools import islice

    from medldm.config import DataConfig
    from medldm.models.normalisation import Normalisation
    from medldm.physics.registry import build_random_operator
    from medldm.training.data import PatchBatches, step_stream, train_batches
    from medldm.training.ldm import DegradedPairs

    cfg = DataConfig(datalist=str(tiny_datalist), patch_size=[24, 20], batch_size=2)
    one = list(islice(train_batches(cfg, seed=3, start_step=1), 5))
    two = list(islice(train_batches(cfg.model_copy(update={"num_workers": 2}), seed=3, start_step=1), 5))
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    op = build_random_operator("recon", "MR", accelerations=[4], center_fractions=[0.08])
    make = DegradedPairs(PatchBatches(cfg, seed=3), op, Normalisation(kind="percentile", scale=1.0), seed=0)
    serial = list(islice(step_stream(make, 0, 0), 3))
    parallel = list(islice(step_stream(make, 0, 2), 3))
    for (xa, ca), (xb, cb) in zip(serial, parallel):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        torch.testing.assert_close(ca, cb, rtol=0, atol=0)
    assert not torch.equal(serial[0][1], serial[1][1])  # each step its own degradation


def test_augmentation_is_a_seeded_symmetry_of_each_patch(tiny_datalist):
    """data.augment: every patch is one of its 8 square symmetries (4 axis flips when not square), drawn
    from the step's generator, and the same step gives the same batch."""
    import numpy as np

    from medldm.config import DataConfig
    from medldm.training.data import PatchBatches, flip_and_transpose

    p = torch.arange(12.0).reshape(1, 3, 4)
    seen = {tuple(flip_and_transpose(p, np.random.default_rng(s)).flatten().tolist()) for s in range(64)}
    assert len(seen) == 4 and all(sorted(v) == list(range(12)) for v in seen)
    q = torch.arange(9.0).reshape(1, 3, 3)
    assert len({tuple(flip_and_transpose(q, np.random.default_rng(s)).flatten().tolist()) for s in range(200)}) == 8
    cfg = DataConfig(datalist=str(tiny_datalist), patch_size=[24, 24], batch_size=4)
    plain, aug = PatchBatches(cfg, seed=5)(3), PatchBatches(cfg.model_copy(update={"augment": True}), seed=5)(3)
    torch.testing.assert_close(aug, PatchBatches(cfg.model_copy(update={"augment": True}), seed=5)(3), rtol=0, atol=0)
    assert not torch.equal(plain, aug)
