"""Logging a medldm model folder as an MLflow pyfunc, registering versions, and downloading them (cached)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from medldm import __version__
from medldm.errors import ModelError
from medldm.serving.pyfunc import _example_record
from medldm.tracking import flatten, mlflow_name

EXPERIMENT = "medldm-registry"
# The pinned environment of the model; medldm itself is the code (env_manager="local" uses the installed one).
CORE_PACKAGES = ("torch", "monai", "einops", "numpy", "scipy", "nibabel", "safetensors", "pydantic", "pandas", "mlflow")

_ENTRY_POINT = '''\
# medldm pyfunc entry point (MLflow "models from code"). The model is medldm.serving.MedldmPyfunc;
# its weights are the safetensors files in artifacts/model. Nothing here is pickled.
import mlflow

from medldm.serving import MedldmPyfunc

mlflow.models.set_model(MedldmPyfunc())
'''


# ------------------------------------------------------------------------------------------------ registration


def _use_tracking_uri(tracking_uri: str | None) -> str:
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    return mlflow.get_tracking_uri()


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = [f"medldm=={__version__}"]
    for pkg in CORE_PACKAGES:
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            pass
    return reqs


def _metric_tags(metrics: dict, prefix: str = "metric.") -> dict[str, str]:

    return {mlflow_name(f"{prefix}{k}")[:250]: str(v)[:5000] for k, v in flatten(metrics or {}).items()}


def register_model(model: str | os.PathLike, name: str, alias: str | None = "champion",
                   tracking_uri: str | None = None, *, experiment: str = EXPERIMENT, input_example: bool = True) -> dict:
    """Log a medldm model (folder, shipped name or MLflow URI) as a pyfunc and register a new version of ``name``.

    The version gets the model card (README.md) as its description, the validation metrics of model.json as
    ``metric.*`` tags, ``medldm.*`` tags (task, modality, format, training run), and ``alias`` if given.
    With ``input_example`` (default) MLflow stores a 32x32x2 example and runs it through the logged model
    (twice, ~1 s for a tiny model once torch is warm); MLflow only logs a warning if that fails.
    ``input_example=False`` logs in ~0.2 s.
    Returns name, version, alias, the ``models:/`` URIs, run and logged-model ids, and timings.
    """
    from mlflow import MlflowClient

    from medldm.models.model_config import read_model_files
    from medldm.sampling.reconstructor import resolve_model

    if not name or not str(name).strip():
        raise ModelError("a registered model name is required")
    t0 = time.time()
    folder, origin = resolve_model(model)
    folder = Path(folder).resolve()
    config, record = read_model_files(folder)
    card_path = folder / "README.md"
    card = card_path.read_text(encoding="utf-8", errors="replace") if card_path.is_file() else None
    uri = _use_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    training = record.training
    info_tags = {
        "medldm.version": __version__, "medldm.format": config.format, "medldm.model": config.name,
        "medldm.task": str(config.task), "medldm.modality": config.modality,
        "medldm.kind": config.kind, "medldm.source": json.dumps(origin, default=str)[:5000],
    }
    if training.get("mlflow_run_id"):
        info_tags["medldm.training_run_id"] = str(training["mlflow_run_id"])
    with tempfile.TemporaryDirectory(prefix="medldm-register-") as tmp:
        entry = Path(tmp) / "medldm_pyfunc.py"
        entry.write_text(_ENTRY_POINT)
        with mlflow.start_run(experiment_id=exp_id, run_name=f"register-{name}", tags=info_tags) as run:
            mlflow.log_params({"model": config.name, "task": config.task, "modality": config.modality,
                               "registered_name": name})
            if record.metrics:
                numeric = {mlflow_name(k): v for k, v in record.metrics.items() if math.isfinite(v)}
                if numeric:
                    mlflow.log_metrics(numeric)
            t_log = time.time()
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(entry), artifacts={"model": str(folder)},
                pip_requirements=_pip_requirements(), input_example=[_example_record()] if input_example else None,
                model_config={"registered_name": name, "run_id": run.info.run_id, "model_name": config.name},
                metadata={"medldm": {"format": config.format, "task": config.task,
                                     "modality": config.modality, "name": config.name}},
            )
            log_seconds = time.time() - t_log
    tags = {**info_tags, **_metric_tags(record.metrics)}
    mv = mlflow.register_model(info.model_uri, name, tags=tags)
    if card:
        client.update_model_version(name, mv.version, description=card)
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return {
        "name": name, "version": int(mv.version), "alias": alias,
        "model_uri": f"models:/{name}@{alias}" if alias else f"models:/{name}/{mv.version}",
        "version_uri": f"models:/{name}/{mv.version}", "logged_model_uri": info.model_uri,
        "model_id": getattr(info, "model_id", None), "run_id": run.info.run_id, "tracking_uri": uri,
        "folder": str(folder), "tags": tags, "description": card,
        "log_seconds": round(log_seconds, 3), "seconds": round(time.time() - t0, 3),
    }


# ------------------------------------------------------------------------------------------------- downloading


def ensure_registered(model: str | os.PathLike, name: str, alias: str = "champion", tracking_uri: str | None = None) -> dict:
    """Register ``model`` under ``name@alias`` unless that alias already points at a version whose weights
    are the same (compared by the model folder's content hash); returns {"uri", "version", "registered"}."""
    from medldm.sampling.reconstructor import resolve_model

    _use_tracking_uri(tracking_uri)
    folder, _ = resolve_model(model)
    digest = _folder_digest(folder)
    client = mlflow.MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias)
        if mv.tags.get("medldm.folder_sha256") == digest:
            return {"uri": f"models:/{name}@{alias}", "version": mv.version, "registered": False}
    except MlflowException:
        pass  # no such model or alias yet
    info = register_model(folder, name, alias=alias, tracking_uri=tracking_uri, input_example=False)
    client.set_model_version_tag(name, info["version"], "medldm.folder_sha256", digest)
    return {"uri": f"models:/{name}@{alias}", "version": info["version"], "registered": True}


def _folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(folder).glob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()
