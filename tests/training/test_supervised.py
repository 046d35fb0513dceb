"""The supervised U-Net baseline: trains on the LDM config's stream, saves, reloads, restores any volume."""

from pathlib import Path

import numpy as np
from medldm.config import load_config
from medldm.evaluation.cases import make_cases
from medldm.io.volume import Volume
from medldm.models.normalisation import Normalisation
from medldm.evaluation.supervised import apply_supervised, build_supervised_unet, load_supervised
from medldm.training.supervised import train_supervised
from tests.conftest import phantom

CONFIGS = Path(__file__).parents[2] / "configs"


def test_untrained_baseline_is_the_naive_inverse():
    net = build_supervised_unet((4, 4, 8, 8, 16, 4)).eval()
    vol = Volume((phantom((20, 18, 5)) * 800)[None].astype(np.float32), np.eye(4), "MR")
    m = make_cases("denoise", "MR", {"p": vol})[0].measurement
    meta = {"normalisation": Normalisation.for_modality("MR").to_dict(), "slice_axis": 2}
    np.testing.assert_allclose(apply_supervised(net, meta, m), m.naive_inverse()[0, 0].numpy(), rtol=1e-5, atol=1e-3)


def test_trains_saves_and_restores_volumes(tiny_datalist, tmp_path):
    cfg = load_config(CONFIGS / "ldm-mr-denoise-tiny.yaml", "ldm", {"data.datalist": str(tiny_datalist)})
    folder = train_supervised(cfg, tmp_path / "sup", minutes=5, max_steps=25, features=(4, 4, 8, 8, 16, 4))
    net, meta = load_supervised(folder)
    assert meta["kind"] == "supervised" and meta["task"] == "denoise" and meta["training"]["steps"] == 25
    assert (folder / "unet.safetensors").is_file() and not list(folder.glob("*.pt"))
    vol = Volume((phantom((20, 18, 5)) * 800)[None].astype(np.float32), np.eye(4), "MR")
    case = make_cases("denoise", "MR", {"p": vol})[0]
    out = apply_supervised(net, meta, case.measurement)
    assert out.shape == (20, 18, 5) and np.all(np.isfinite(out))
    assert np.array_equal(out, apply_supervised(net, meta, case.measurement))  # deterministic
    naive = case.measurement.naive_inverse()[0, 0].numpy()
    assert not np.allclose(out, naive, atol=1e-3)  # trained: the residual is no longer the zero it starts from
