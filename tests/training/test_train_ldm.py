import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from medldm.config import load_config
from medldm.io.volume import Volume
from medldm.models.bundle import load_bundle
from medldm.sampling.reconstructor import Reconstructor
from medldm.training.ldm import train_ldm
from medldm.training.vae import train_vae
from tests.conftest import phantom

ROOT = Path(__file__).parents[2]
CONFIGS = ROOT / "configs"


@pytest.fixture(scope="module")
def tiny_vae(tiny_datalist, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    cfg = load_config(CONFIGS / "vae-mr-tiny.yaml", "vae", {"data.datalist": str(tiny_datalist), "tracking.enabled": False})
    return train_vae(cfg, out)


@pytest.mark.slow
def test_tiny_ldm_trains_and_reconstructs(tiny_datalist, tiny_vae, mlflow_tmp, tmp_path):
    cfg = load_config(CONFIGS / "ldm-mr-denoise-tiny.yaml", "ldm",
                      {"data.datalist": str(tiny_datalist), "vae_path": str(tiny_vae)})
    folder = train_ldm(cfg, tmp_path / "ldm")
    bundle = load_bundle(folder)
    assert bundle.config.task == "denoise" and bundle.unet is not None and bundle.refiner is not None
    assert bundle.config.latent_scale == load_bundle(tiny_vae).config.latent_scale
    run = mlflow.get_run(bundle.record.training["mlflow_run_id"])
    assert "train/diff" in run.data.metrics and run.data.tags["medldm.task"] == "denoise"
    assert "val/psnr" in run.data.metrics and "val/naive_psnr" in run.data.metrics
    assert (tmp_path / "ldm" / "figures" / "ldm_step000004.png").is_file()
    # the trained model restores a (noisy) volume of odd size with its geometry intact
    affine = np.diag([1.0, 1.2, 2.0, 1.0])
    affine[:3, 3] = [5, -3, 7]
    vol = Volume((phantom((23, 19, 7)) * 500 + 20)[None], affine, "MR")
    res = Reconstructor(bundle)(vol, steps=2, samples=2, seed=0)
    assert res.volume.array.shape == (1, 23, 19, 7)
    np.testing.assert_array_equal(res.volume.affine, affine)
    assert res.uncertainty is not None and np.isfinite(res.uncertainty.array).all()


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_end_identical(tiny_datalist, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "medldm", "train", "vae", "--config", str(CONFIGS / "vae-mr-tiny.yaml"), "--out", str(tmp_path / "ddp"),
           "--set", f"data.datalist={tiny_datalist}", "--set", "tracking.enabled=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "ddp" / "model" / "training.json").read_text())
    assert meta["training"]["world_size"] == 2
    assert meta["training"]["ranks_identical"] is True


@pytest.mark.slow
def test_tiny_3d_vae_then_ldm(tiny_datalist, tmp_path):
    over = {"data.datalist": str(tiny_datalist), "tracking.enabled": False, "data.spatial_dims": 3,
            "data.patch_size": [32, 32, 16], "train.steps": 2}  # the refiner needs > 16 voxels per axis somewhere
    vae = train_vae(load_config(CONFIGS / "vae-mr-tiny.yaml", "vae", over), tmp_path / "vae3d")
    cfg = load_config(CONFIGS / "ldm-mr-denoise-tiny.yaml", "ldm", {**over, "vae_path": str(vae)})
    bundle = load_bundle(train_ldm(cfg, tmp_path / "ldm3d"))
    assert bundle.spatial_dims == 3 and bundle.unet is not None
    vol = Volume((phantom((36, 30, 18)) * 500 + 20)[None], np.eye(4), "MR")
    res = Reconstructor(bundle)(vol, steps=2)  # sliding windows: the volume is larger than the 32x32x16 patch
    assert res.volume.array.shape == vol.array.shape


def test_ema_warm_up_forgets_the_initial_weights():
    """With warm-up, 100 updates towards new weights leave under 1% of the initialisation in the average;
    a plain 0.999 EMA would still hold 0.999^99 = 91% of it."""
    import torch

    from medldm.training.common import ema_decay_at, make_ema

    net = torch.nn.Linear(3, 1)
    torch.nn.init.zeros_(net.weight)
    ema = make_ema(net, 0.999)
    ema.update_parameters(net)  # first update copies: the average starts at the initial (zero) weights
    with torch.no_grad():
        net.weight.fill_(1.0)
    for _ in range(99):
        ema.update_parameters(net)
    assert 0.99 < float(ema.module.weight.detach().mean()) <= 1.0
    assert ema_decay_at(10**6, 0.999) == 0.999 and ema_decay_at(0, 0.999) == 0.1
