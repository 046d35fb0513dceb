"""Shared fixtures: tiny synthetic volumes and datalists, so tests never need downloaded data."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@pytest.fixture(autouse=True, scope="session")
def _own_cache_dir(tmp_path_factory):
    """Converted networks go to a folder of this run, never the user's ~/.cache (tests that need their own set
    MEDLDM_CACHE_DIR again); so a test run also starts from an empty cache, as CI's clean machine does."""
    saved = os.environ.get("MEDLDM_CACHE_DIR")
    os.environ["MEDLDM_CACHE_DIR"] = str(tmp_path_factory.mktemp("medldm-cache"))
    yield
    if saved is None:
        os.environ.pop("MEDLDM_CACHE_DIR", None)
    else:
        os.environ["MEDLDM_CACHE_DIR"] = saved


def phantom(shape=(40, 40, 24), seed=0) -> np.ndarray:
    """Smooth head-like phantom in [0, 1]: an ellipsoid with a few inner blobs of other intensities."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = sum((g / 0.8) ** 2 for g in grids)
    vol = (r < 1).astype(np.float32) * 0.6
    for _ in range(4):
        c = rng.uniform(-0.4, 0.4, size=3)
        rad = rng.uniform(0.1, 0.3)
        vol[sum((g - ci) ** 2 for g, ci in zip(grids, c)) < rad**2] = rng.uniform(0.2, 1.0)
    return vol


@pytest.fixture(scope="session")
def tiny_datalist(tmp_path_factory):
    import nibabel as nib

    root = tmp_path_factory.mktemp("data")
    entries = {"training": [], "validation": []}
    for i, split in enumerate(["training", "training", "validation"]):
        vol = phantom(seed=i) * 800.0  # MR-like arbitrary units
        name = f"mr_{i}.nii.gz"
        nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 1.5, 1.0])), root / name)
        entries[split].append({"image": name, "modality": "MR", "source": "phantom"})
    (root / "datalist.json").write_text(json.dumps(entries))
    return root / "datalist.json"


@pytest.fixture()
def mlflow_tmp(tmp_path, monkeypatch):
    """An isolated MLflow store per test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


def pytest_collection_modifyitems(config, items):
    """The OpenVINO tests run last. Once OpenVINO's CPU plugin has run in this process, a later test that forks
    DataLoader workers (tests/training/test_refiner.py's worker test) crashed the whole test process with a
    segfault (2026-12-07; not reproduced in a small script, and medldm itself never forks after running OpenVINO:
    training does not use it, and joblib's workers start fresh interpreters). Since 2026-12-08 the tests that
    compile networks run in a child interpreter (tests/models/test_runtime.py says why); the ones left here only
    ask OpenVINO what the CPU has."""
    items.sort(key=lambda item: item.path.name == "test_runtime.py")  # stable: the rest keep their order
