"""Fetching a logged or registered medldm model from the MLflow store: ``models:/NAME@alias``, ``models:/NAME/3``,
``models:/NAME/latest``, ``runs:/RUN_ID/path`` -> a local model folder, cached. Below sampling (what
``Reconstructor.load("models:/...")`` calls) and serving; registering models is ``medldm.serving``."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from medldm.errors import ModelError


def _cache_root() -> Path:
    root = os.environ.get("MEDLDM_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "medldm" / "mlflow"


def _name_filter(name: str) -> str:
    """An MLflow filter matching exactly this registered-model name: the name is quoted, never parsed as a clause.

    MLflow's filter parser has no escape inside a quoted string, so the name is wrapped in the quote it lacks."""
    if "'" not in name:
        return f"name = '{name}'"
    if '"' not in name:
        return f'name = "{name}"'
    raise ModelError(f"registered model name {name!r} holds both quote characters; MLflow cannot search for it")


def _resolve_version(client, rest: str):
    """'NAME@alias', 'NAME/3', 'NAME/latest' -> ModelVersion; other forms (a logged-model id) -> None."""
    if "@" in rest:
        reg_name, alias = rest.split("@", 1)
        return client.get_model_version_by_alias(reg_name, alias)
    parts = rest.split("/")
    if len(parts) == 2 and parts[1].isdigit():
        return client.get_model_version(parts[0], parts[1])
    if len(parts) == 2 and parts[1].lower() == "latest":
        versions = client.search_model_versions(_name_filter(parts[0]))
        if not versions:
            raise ModelError(f"registered model {parts[0]!r} has no versions")
        return max(versions, key=lambda v: int(v.version))
    return None


def _find_folder(root: Path) -> Path:
    if (root / "model.json").is_file():
        return root
    mlmodel = root / "MLmodel"
    if mlmodel.is_file():
        import yaml

        conf = yaml.safe_load(mlmodel.read_text()) or {}
        art = (((conf.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}).get("model") or {}
        if art.get("path") and (root / art["path"] / "model.json").is_file():
            return root / art["path"]
    hits = sorted(root.rglob("model.json"))
    if len(hits) == 1:
        return hits[0].parent
    raise ModelError(f"the downloaded artifacts hold {'no' if not hits else len(hits)} medldm model folder(s) "
                     "(model.json); register models with `medldm register`")


def _download(uri: str) -> tuple[Path, dict]:
    """A registered or logged model -> (its local MLflow model folder, origin). Registered versions are cached (``MEDLDM_CACHE_DIR``, default
    ~/.cache/medldm/mlflow) keyed by tracking URI, name, version and the version's run, logged model and
    artifact source: a version is immutable within its registry, but a new registry behind the same URI
    string (a fresh ``sqlite:///mlflow.db`` in another folder) numbers its versions from 1 again."""
    from mlflow import MlflowClient

    tracking = mlflow.get_tracking_uri()
    client = MlflowClient()
    origin: dict[str, Any] = {"source": "mlflow", "uri": uri, "tracking_uri": tracking}
    download_uri = uri
    identity = ""  # what makes this download unique beyond its URI (see the docstring)
    try:
        if uri.startswith("models:/"):
            mv = _resolve_version(client, uri[len("models:/"):].strip("/"))
            if mv is not None:
                origin.update(registered_name=mv.name, version=int(mv.version), run_id=mv.run_id,
                              model_id=getattr(mv, "model_id", None))
                download_uri = f"models:/{mv.name}/{mv.version}"
                identity = f"{mv.run_id}|{origin['model_id']}|{mv.source}"
        elif uri.startswith("runs:/"):
            origin["run_id"] = uri[len("runs:/"):].split("/", 1)[0]
            identity = origin["run_id"]
        key = hashlib.sha256(f"{tracking}|{download_uri}|{identity}".encode()).hexdigest()[:20]
        dest = _cache_root() / key
        if not (dest / ".complete").is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=dest.parent))
            try:
                mlflow.artifacts.download_artifacts(artifact_uri=download_uri, dst_path=str(tmp))
                (tmp / ".complete").write_text(download_uri)
                try:
                    tmp.rename(dest)
                except OSError:  # another process finished first (or a stale partial copy is in the way)
                    if not (dest / ".complete").is_file():
                        shutil.rmtree(dest, ignore_errors=True)
                        tmp.rename(dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except MlflowException as exc:
        raise ModelError(f"{uri}: {exc.message} (tracking URI {tracking})") from None
    return dest, origin


def download_model(uri: str) -> tuple[Path, dict]:
    """``models:/NAME@alias``, ``models:/NAME/VERSION``, ``models:/NAME/latest`` or ``runs:/RUN_ID/path`` ->
    (local medldm model folder, origin); see :func:`_download` for the cache."""
    root, origin = _download(uri)
    return _find_folder(root), origin
