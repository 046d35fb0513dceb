"""Registry and pyfunc: register a tiny model, load it back through models:/ URIs, bad requests in process."""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from medldm.io.volume import Volume
from tests.serving.conftest import CARD, METRICS


def _phantom(shape=(32, 32, 6), seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    clean = np.where(grids[0] ** 2 + grids[1] ** 2 < 0.6, 400.0, 50.0)
    noisy = np.abs(clean + rng.normal(0, 20, shape)).astype(np.float32)
    return Volume(noisy[None], np.diag([1.0, 1.0, 2.5, 1.0]), "MR")


def _nifti_b64(vol: Volume, tmp_path) -> str:
    from medldm.io import write_nifti

    return base64.b64encode(write_nifti(vol, tmp_path / "in.nii.gz").read_bytes()).decode()


def _decode(b64: str, tmp_path, name="out") -> Volume:
    from medldm.io import read_nifti

    p = tmp_path / f"{name}.nii.gz"
    p.write_bytes(base64.b64decode(b64))
    return read_nifti(p)


@pytest.mark.slow
def test_register_version_alias_card_tags(store, tiny_model):
    from mlflow import MlflowClient
    import mlflow

    from medldm.serving import register_model

    first = register_model(tiny_model, "tiny-denoise")  # with the validated input example
    assert first["version"] == 1 and first["alias"] == "champion"
    assert first["model_uri"] == "models:/tiny-denoise@champion"
    client = MlflowClient()
    mv = client.get_model_version_by_alias("tiny-denoise", "champion")
    assert str(mv.version) == "1" and mv.run_id == first["run_id"]
    assert mv.description == CARD
    assert float(mv.tags["metric.psnr"]) == METRICS["psnr"] and float(mv.tags["metric.ssim"]) == METRICS["ssim"]
    assert mv.tags["medldm.task"] == "denoise" and mv.tags["medldm.modality"] == "MR"
    assert mv.tags["medldm.training_run_id"] == "abc123"

    info = mlflow.models.get_model_info("models:/tiny-denoise@champion")
    assert info.signature is not None
    assert {"nifti_b64", "array", "steps", "samples"} <= set(info.signature.inputs.to_dict()[0]["properties"])
    assert info.saved_input_example_info is not None
    reqs = Path(mlflow.pyfunc.get_model_dependencies("models:/tiny-denoise@champion")).read_text()
    assert "medldm==" in reqs and "torch==" in reqs
    artifacts = Path.cwd() / "mlruns"
    assert not list(artifacts.rglob("*.pkl")), "no pickles in the logged model"
    assert list(artifacts.rglob("unet.safetensors")) and list(artifacts.rglob("medldm_pyfunc.py"))

    second = register_model(tiny_model, "tiny-denoise", alias="champion", input_example=False)
    assert second["version"] == 2 and second["log_seconds"] < 10
    assert str(client.get_model_version_by_alias("tiny-denoise", "champion").version) == "2"


@pytest.mark.slow
def test_registered_model_gives_identical_outputs(store, tiny_model, tmp_path):
    import mlflow

    from medldm.sampling.reconstructor import Reconstructor
    from medldm.serving import register_model

    register_model(tiny_model, "tiny-denoise", input_example=False)
    vol = _phantom()
    direct = Reconstructor.load(tiny_model, device="cpu")
    via_registry = Reconstructor.load("models:/tiny-denoise@champion", device="cpu")
    assert via_registry.origin["registered_name"] == "tiny-denoise" and via_registry.origin["version"] == 1
    assert via_registry.origin["run_id"]
    a, b = direct(vol, steps=2, seed=3), via_registry(vol, steps=2, seed=3)
    np.testing.assert_array_equal(a.volume.array, b.volume.array)
    assert b.provenance["model"]["registered_name"] == "tiny-denoise"
    # a second load hits the cache: same folder
    again = Reconstructor.load("models:/tiny-denoise/1", device="cpu")
    assert again.bundle.path == via_registry.bundle.path

    # the pyfunc (what the server runs) gives the same numbers, for both request kinds
    model = mlflow.pyfunc.load_model("models:/tiny-denoise@champion")
    out = model.predict([{"nifti_b64": _nifti_b64(vol, tmp_path), "steps": 2, "seed": 3}])[0]
    restored = _decode(out["nifti_b64"], tmp_path)
    np.testing.assert_array_equal(restored.array, a.volume.array)
    np.testing.assert_allclose(restored.affine, vol.affine)
    prov = json.loads(out["provenance"])
    assert prov["parameters"]["steps"] == 2 and prov["model"]["registered_name"] == "tiny-denoise"
    assert "uncertainty_b64" not in out

    out = model.predict([{"array": vol.array[0].tolist(), "spacing": [1.0, 1.0, 2.5], "steps": 2, "seed": 3}])[0]
    np.testing.assert_allclose(np.asarray(out["array"], dtype=np.float32), a.volume.array[0], rtol=1e-6)
    assert out["spacing"] == [1.0, 1.0, 2.5]

    k2 = direct(vol, steps=1, samples=2, seed=0)
    out = model.predict([{"nifti_b64": _nifti_b64(vol, tmp_path), "steps": 1, "samples": 2}])[0]
    np.testing.assert_array_equal(_decode(out["uncertainty_b64"], tmp_path, "unc").array, k2.uncertainty.array)


@pytest.mark.slow
def test_shipped_name_and_runs_uri(store, tiny_model, tmp_path, monkeypatch):
    import mlflow

    import medldm.sampling.reconstructor as rec
    from medldm.errors import ModelError
    from medldm.serving import download_model, register_model

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "tiny-mr-denoise").symlink_to(tiny_model, target_is_directory=True)
    monkeypatch.setattr(rec, "SHIPPED_DIR", shipped)
    out = register_model("tiny-mr-denoise", "shipped-one", alias=None, input_example=False)
    assert out["version"] == 1 and out["model_uri"] == "models:/shipped-one/1"
    folder, origin = download_model(out["logged_model_uri"])  # MLflow 3 logged-model URI, models:/m-...
    assert (folder / "model.json").is_file() and origin["uri"] == out["logged_model_uri"]

    with mlflow.start_run() as run:  # a raw model folder logged by training (Tracker.log_artifact)
        mlflow.log_artifacts(str(tiny_model), artifact_path="model")
    folder, origin = download_model(f"runs:/{run.info.run_id}/model")
    assert (folder / "unet.safetensors").is_file() and origin["run_id"] == run.info.run_id

    with pytest.raises(ModelError, match="no-such-model"):
        download_model("models:/no-such-model@champion")


@pytest.fixture()
def pyfunc(tiny_model):
    """The pyfunc class on a loaded Reconstructor, no MLflow store involved."""
    from medldm.sampling.reconstructor import Reconstructor
    from medldm.serving import MedldmPyfunc

    m = MedldmPyfunc()
    m.reconstructor = Reconstructor.load(tiny_model, device="cpu")
    return m


@pytest.mark.parametrize("record, message", [
    ({"nifti_b64": "%%% not base64 %%%"}, "not valid base64"),
    ({"nifti_b64": base64.b64encode(b"hello" * 100).decode()}, "does not hold a NIfTI"),
    ({"nifti_b64": base64.b64encode(gzip.compress(b"hello" * 100)).decode()}, "does not hold a NIfTI"),
    ({"nifti_b64": base64.b64encode(b"\x1f\x8b garbage").decode()}, "cannot be decompressed"),
    ({"array": [[1.0, 2.0]], "steps": 1}, "3D volume"),
    ({"array": [[[1.0, 2.0], [3.0]]], "steps": 1}, "regular nested list"),
    ({"array": [[[1.0]]], "stpes": 1}, r"unknown field\(s\) \['stpes'\]"),
    ({"array": [[[1.0]]], "steps": 0}, r"steps must be in \[1, 1000\]"),
    ({"array": [[[1.0]]], "steps": "ten"}, "steps must be an integer"),
    ({"array": [[[1.0]]], "sigma": -1}, "sigma must be"),
    ({"array": [[[1.0]]], "spacing": [1, 1]}, "spacing must be 3"),
    ({"array": [[[float("inf")]]]}, "NaN/Inf"),
    ({"steps": 2}, "exactly one of nifti_b64"),
    ({"array": [[[5.0]]]}, r"shape \[1, 1, 1\]: .*at least 2 voxels along two of its axes"),
])
def test_bad_requests_are_invalid_parameter_value(pyfunc, record, message):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=message) as info:
        pyfunc.predict(None, [record])
    assert info.value.error_code == "INVALID_PARAMETER_VALUE" and info.value.get_http_status_code() == 400


def test_payload_limits(pyfunc, tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException

    from medldm.io import write_nifti

    monkeypatch.setenv("MEDLDM_MAX_PAYLOAD_MB", "0.05")  # 52 kB
    big = Volume(np.random.default_rng(0).random((1, 40, 40, 40), dtype=np.float32), np.eye(4), "MR")
    with pytest.raises(MlflowException, match="exceeds the limit"):
        pyfunc.predict(None, [{"nifti_b64": _nifti_b64(big, tmp_path)}])
    with pytest.raises(MlflowException, match="exceeds the limit"):
        pyfunc.predict(None, [{"array": big.array[0].tolist()}])
    # a gzip bomb: tiny on the wire, > 4 x limit inflated
    zeros = Volume(np.zeros((1, 80, 80, 80), np.float32), np.eye(4), "MR")
    bomb = base64.b64encode(write_nifti(zeros, tmp_path / "z.nii.gz").read_bytes()).decode()
    assert len(bomb) < 50_000
    with pytest.raises(MlflowException, match="inflates to more than"):
        pyfunc.predict(None, [{"nifti_b64": bomb}])
    # the message stays one line: MLflow's serving rewrite of e.message must not echo the request
    err = pytest.raises(MlflowException, pyfunc.predict, None, [{"array": [[[1.0]]], "bad": 1}]).value
    err.message = f"Failed to predict data '{'x' * 10_000}'. Error: {err.message}"
    assert len(err.message) < 300


def test_small_volume_through_pyfunc(pyfunc):
    """predict takes a list of records or a DataFrame (MLflow's type-hint wrapper refuses a bare dict)."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from medldm.serving import ReconstructionRequest

    arr = (np.random.default_rng(1).random((32, 32, 3)) * 100).tolist()
    with pytest.raises(MlflowException, match="Expected list"):
        pyfunc.predict(None, {"array": arr, "steps": 1})
    a = pyfunc.predict(None, [{"array": arr, "steps": 1}])[0]
    b = pyfunc.predict(None, pd.DataFrame([{"array": arr, "steps": 1}]))[0]
    c = pyfunc.predict(None, [ReconstructionRequest.model_validate({"array": arr, "steps": 1})])[0]
    assert a["array"] == b["array"] == c["array"] and np.asarray(a["array"]).shape == (32, 32, 3)


@pytest.mark.slow
def test_metric_names_outside_mlflow_charset_are_registered(store, tiny_model):
    import json

    from mlflow import MlflowClient

    from medldm.serving import ensure_registered

    record = json.loads((tiny_model / "training.json").read_text())
    record["metrics"] = {**record["metrics"], "val_itk_sigma5%_psnr": 30.4}
    (tiny_model / "training.json").write_text(json.dumps(record))
    first = ensure_registered(tiny_model, "tiny-pct")
    again = ensure_registered(tiny_model, "tiny-pct")  # same weights: reused, not registered twice
    assert first["registered"] and not again["registered"] and again["version"] == first["version"]
    mv = MlflowClient().get_model_version_by_alias("tiny-pct", "champion")
    assert float(mv.tags["metric.val_itk_sigma5__psnr"]) == 30.4  # '%' is not allowed in MLflow names


@pytest.mark.slow
def test_a_new_registry_behind_the_same_uri_is_not_served_from_the_cache(tmp_path, tiny_model):
    """The demo's case: each fresh clone has its own ./mlflow.db, so 'models:/NAME/1' under the same URI string
    names another model each time; the download cache must not hand back the first one's weights. One process
    per clone, as in real use (MLflow caches one store per URI string within a process)."""
    import json as _json
    import os
    import shutil
    import subprocess
    import sys

    script = (
        "import json, sys\n"
        "from medldm.serving import download_model, register_model\n"
        "out = register_model(sys.argv[1], 'same-name', alias=None, input_example=False)\n"
        "folder, _ = download_model('models:/same-name/1')\n"
        "print(out['model_uri'], json.loads((folder / 'model.json').read_text())['name'])\n"
    )
    env = {**os.environ, "MEDLDM_CACHE_DIR": str(tmp_path / "shared-cache"), "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db",
           "PYTHONPATH": str(Path(__file__).parents[2])}
    seen = []
    for i in range(2):
        work = tmp_path / f"clone{i}"
        model = shutil.copytree(tiny_model, work / "model")
        meta = _json.loads((model / "model.json").read_text())
        meta["name"] = f"clone-{i}"
        (model / "model.json").write_text(_json.dumps(meta))
        p = subprocess.run([sys.executable, "-c", script, str(model)], cwd=work, env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        seen.append(p.stdout.strip().splitlines()[-1])
    assert seen == ["models:/same-name/1 clone-0", "models:/same-name/1 clone-1"]


@pytest.mark.slow
def test_latest_version_lookup_quotes_the_name_and_cannot_be_injected(store):
    import mlflow

    from medldm.errors import ModelError
    from medldm.tracking.download import _resolve_version

    client = mlflow.MlflowClient()
    for name in ("it's mine", "plain"):
        client.create_registered_model(name)
        for _ in range(2):
            client.create_model_version(name, "file:///nonexistent")
    assert (v := _resolve_version(client, "it's mine/latest")).name == "it's mine" and str(v.version) == "2"
    assert _resolve_version(client, "plain/latest").name == "plain"
    # a clause smuggled into the name is matched as a literal name (none), not parsed as a filter
    with pytest.raises(ModelError, match="has no versions"):
        _resolve_version(client, "x' OR name LIKE '%/latest")
    with pytest.raises(ModelError, match="both quote characters"):
        _resolve_version(client, "a'b\"c/latest")
