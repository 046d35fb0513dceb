"""Fixtures for registry/serving tests: an isolated MLflow store and model cache per test."""

from __future__ import annotations

import json

import pytest


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """sqlite store + ./mlruns in tmp_path (cwd), MLflow's global URIs restored afterwards."""
    import mlflow
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MEDLDM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDLDM_MAX_PAYLOAD_MB", raising=False)
    monkeypatch.chdir(tmp_path)
    # other tests may have pinned a global URI (Tracker does); monkeypatch puts the old values back
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    mlflow.set_tracking_uri(uri)
    return uri


CARD = "# tiny-mr-denoise\n\nRandom weights, for tests only.\n"
METRICS = {"psnr": 31.5, "ssim": 0.91}


@pytest.fixture()
def tiny_model(tmp_path):
    """A tiny random-weight denoising model folder with a card and validation metrics."""
    from tests.helpers import make_tiny_bundle

    folder = make_tiny_bundle(tmp_path / "tiny-model", task="denoise", modality="MR")
    record = json.loads((folder / "training.json").read_text())
    record["metrics"] = METRICS
    record["training"] = {"mlflow_run_id": "abc123"}
    (folder / "training.json").write_text(json.dumps(record))
    (folder / "README.md").write_text(CARD)
    return folder
