"""Every MLflow registry, pyfunc and serving call of medldm lives here (training tracking: medldm.tracking).

    register_model(model, name, alias="champion")   log a medldm model folder as an MLflow pyfunc model and
                                                    register a new version (card -> description, metrics -> tags)
    download_model("models:/NAME@alias")            registry / run URI -> local model folder (what
                                                    ``Reconstructor.load("models:/...")`` calls)
    serve(model_uri, host, port)                    ``mlflow models serve`` as a subprocess; ``wait_until_ready``
                                                    pings /ping; ``stop`` ends its process group

The pyfunc model holds no pickles: MLflow "models from code" stores a three-line script that builds
:class:`MedldmPyfunc`, and ``artifacts/model`` is the medldm model folder itself (model.json + safetensors +
README.md). Loading it needs medldm installed (``env_manager="local"``).

Request format (one record per volume; over HTTP ``{"inputs": [record, ...]}``, see medldm.client):

    nifti_b64   base64 of a NIfTI file (.nii.gz, or uncompressed .nii)   -> nifti_b64 [+ uncertainty_b64]
    array       nested lists, a 3D volume X, Y, Z (quick tests)          -> array [+ uncertainty], spacing
    spacing     voxel size in mm for ``array`` (default 1, 1, 1)
    steps, samples, seed, factor, sigma   reconstruction parameters (optional)

In Python, ``predict`` takes a list of records or a DataFrame (MLflow's type-hint wrapper refuses a bare
dict). Every response record also has ``provenance`` (a JSON string). Bad requests raise MlflowException with
INVALID_PARAMETER_VALUE, which ``mlflow models serve`` answers with HTTP 400 and the message.

Parameters are record fields, not MLflow ``params``: MLflow 3.17 drops params missing from a ParamSchema
(and columns missing from a column signature) with only a log warning, so a misspelt ``stpes`` would
silently run with defaults. Here ``predict`` is type-hinted with the pydantic :class:`ReconstructionRequest`
(``extra="allow"``): MLflow derives the signature from it, passes unknown fields through, and predict rejects
them with a clear message. The price: type-hinted models only take ``{"inputs": [...]}`` over HTTP, not
``dataframe_records``.
"""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from medldm import __version__
from medldm.errors import MedldmError, ModelError
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


from medldm.serving_requests import (  # noqa: E402,F401 - re-exported for clients and tests
    ReconstructionRequest, ReconstructionResponse, _array_volume, _check_params, _decode_nifti, _records,
    _mb, bad_request, max_payload_bytes, volume_to_nifti_b64,
)


# --------------------------------------------------------------------------------------------------- the pyfunc


class MedldmPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc around :class:`medldm.Reconstructor`; the model folder is the ``model`` artifact."""

    def load_context(self, context):
        from medldm.sampling.reconstructor import Reconstructor

        folder = Path(context.artifacts["model"])
        cfg = dict(getattr(context, "model_config", None) or {})
        origin = {"source": "mlflow-pyfunc", "path": str(folder),
                  **{k: v for k, v in cfg.items() if k in ("registered_name", "run_id", "model_name")}}
        self.reconstructor = Reconstructor.load(folder, device=os.environ.get("MEDLDM_DEVICE") or None)
        self.reconstructor.origin = origin
        if os.environ.get("MEDLDM_WARMUP", "") not in ("", "0"):
            # the first call pays torch's one-off kernel set-up (seconds); serve() does it before /ping answers
            self._one(self.reconstructor, _example_record(), "warm-up", max_payload_bytes())

    def predict(self, context, model_input: list[ReconstructionRequest], params: Optional[dict[str, Any]] = None
                ) -> list[ReconstructionResponse]:
        if params:  # MLflow only passes params from a ParamSchema; this model has none, so this is a direct call
            raise bad_request(f"pass reconstruction parameters as record fields, not params: {sorted(params)}")
        rec_model = getattr(self, "reconstructor", None)
        if rec_model is None:
            raise MlflowException("model not loaded (load_context was not called)")
        limit = max_payload_bytes()
        records = _records(model_input)
        total = sum(len(r["nifti_b64"]) * 3 // 4 for r in records if isinstance(r.get("nifti_b64"), str))
        if total > limit:
            raise bad_request(f"request of {_mb(total)} exceeds the limit of {_mb(limit)} (MEDLDM_MAX_PAYLOAD_MB)")
        return [self._one(rec_model, rec, f"record {i}", limit) for i, rec in enumerate(records)]

    @staticmethod
    def _one(rec_model, rec: dict, where: str, limit: int) -> dict[str, Any]:
        params = _check_params(rec, where)
        has_nifti, has_array = "nifti_b64" in rec, "array" in rec
        if has_nifti == has_array:
            raise bad_request(f"{where}: give exactly one of nifti_b64 (base64 .nii.gz) or array (nested X, Y, Z lists)")
        if "spacing" in rec and not has_array:
            raise bad_request(f"{where}: spacing goes with array; a NIfTI carries its own geometry")
        modality = rec_model.meta.get("modality")
        if has_nifti:
            vol = _decode_nifti(rec["nifti_b64"], where, limit)
            vol.modality = modality
        else:
            vol = _array_volume(rec, where, limit, modality)
        if vol.array.ndim != 4 or vol.array.shape[0] != 1:
            raise bad_request(f"{where}: expected a single-channel 3D volume, got array shape {vol.array.shape}")
        try:
            res = rec_model(vol, **params)
        except (MedldmError, ValueError) as exc:
            shape = list(vol.spatial_shape)
            raise bad_request(f"{where}: cannot reconstruct a volume of shape {shape}: {exc}") from None
        prov = {**res.provenance, "timings": res.timings, "residual": res.residual,
                "input": {"shape": list(vol.spatial_shape), "spacing": list(vol.spacing),
                          "kind": "nifti" if has_nifti else "array"}}
        out: dict[str, Any] = {}
        if has_nifti:
            out["nifti_b64"] = volume_to_nifti_b64(res.volume)
            if res.uncertainty is not None:
                out["uncertainty_b64"] = volume_to_nifti_b64(res.uncertainty)
        else:
            out["array"] = res.volume.array[0].tolist()
            out["spacing"] = list(res.volume.spacing)
            if res.uncertainty is not None:
                out["uncertainty"] = res.uncertainty.array[0].tolist()
        out["provenance"] = json.dumps(prov, default=str)
        return out


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


def _example_record() -> dict:
    """A small valid input: a 32x32x2 disc volume, 1 step (MLflow runs it at log time to validate the model).

    32 voxels in-plane: the pixel refiner (BasicUNet) halves them 4 times and needs > 1 voxel left.
    """
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in (32, 32, 2)], indexing="ij"))
    vol = np.where((g[:2] ** 2).sum(0) < 0.5, 100.0, 10.0)
    return {"array": vol.tolist(), "spacing": [1.0, 1.0, 3.0], "steps": 1, "samples": 1, "seed": 0}


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

    from medldm.models.bundle import read_meta
    from medldm.sampling.reconstructor import resolve_model

    if not name or not str(name).strip():
        raise ModelError("a registered model name is required")
    t0 = time.time()
    folder, origin = resolve_model(model)
    folder = Path(folder).resolve()
    meta = read_meta(folder)
    card_path = folder / "README.md"
    card = card_path.read_text(encoding="utf-8", errors="replace") if card_path.is_file() else None
    uri = _use_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    training = meta.get("training") or {}
    info_tags = {
        "medldm.version": __version__, "medldm.format": str(meta.get("format")), "medldm.model": str(meta.get("name")),
        "medldm.task": str(meta.get("task")), "medldm.modality": str(meta.get("modality")),
        "medldm.kind": str(meta.get("kind")), "medldm.source": json.dumps(origin, default=str)[:5000],
    }
    if training.get("mlflow_run_id"):
        info_tags["medldm.training_run_id"] = str(training["mlflow_run_id"])
    with tempfile.TemporaryDirectory(prefix="medldm-register-") as tmp:
        entry = Path(tmp) / "medldm_pyfunc.py"
        entry.write_text(_ENTRY_POINT)
        with mlflow.start_run(experiment_id=exp_id, run_name=f"register-{name}", tags=info_tags) as run:
            mlflow.log_params({"model": str(meta.get("name")), "task": meta.get("task"), "modality": meta.get("modality"),
                               "registered_name": name})
            if meta.get("metrics"):
                numeric = {mlflow_name(k): float(v) for k, v in (meta["metrics"] or {}).items()
                           if isinstance(v, (int, float)) and math.isfinite(float(v))}
                if numeric:
                    mlflow.log_metrics(numeric)
            t_log = time.time()
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(entry), artifacts={"model": str(folder)},
                pip_requirements=_pip_requirements(), input_example=[_example_record()] if input_example else None,
                model_config={"registered_name": name, "run_id": run.info.run_id, "model_name": meta.get("name")},
                metadata={"medldm": {"format": meta.get("format"), "task": meta.get("task"),
                                     "modality": meta.get("modality"), "name": meta.get("name")}},
            )
            log_seconds = time.time() - t_log
    tags = {**info_tags, **_metric_tags(meta.get("metrics") or {})}
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


def download_model(uri: str) -> tuple[Path, dict]:
    """``models:/NAME@alias``, ``models:/NAME/VERSION``, ``models:/NAME/latest`` or ``runs:/RUN_ID/path`` ->
    (local medldm model folder, origin). Registered versions are cached (``MEDLDM_CACHE_DIR``, default
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
    folder = _find_folder(dest)
    return folder, origin


# ----------------------------------------------------------------------------------------------------- serving


def serve(model_uri: str, host: str = "127.0.0.1", port: int = 5000, env_manager: str = "local", *,
          workers: int | None = None, timeout_s: int | None = None, env: dict[str, str] | None = None,
          log_path: str | os.PathLike | None = None, tracking_uri: str | None = None) -> subprocess.Popen:
    """Start ``mlflow models serve -m URI --env-manager local -h HOST -p PORT`` in its own process group.

    ``env`` adds variables for the server (e.g. MEDLDM_MAX_PAYLOAD_MB, MEDLDM_DEVICE; MEDLDM_WARMUP=0 skips the
    warm-up reconstruction the model otherwise runs before /ping answers); ``timeout_s`` sets
    MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT (MLflow's default 60 s is short for full-size CPU sampling).
    The server's output goes to ``log_path`` (else it is inherited). Stop it with :func:`stop`.
    """
    _use_tracking_uri(tracking_uri)
    bin_dir = str(Path(sys.executable).parent)
    penv = {**os.environ, **(env or {})}
    penv["PATH"] = bin_dir + os.pathsep + penv.get("PATH", "")
    penv.setdefault("MEDLDM_WARMUP", "1")
    penv["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()  # resolved here: a relative sqlite path needs our cwd
    if timeout_s:
        penv["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(int(timeout_s))
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_uri), "--env-manager", env_manager,
           "-h", host, "-p", str(int(port))]
    if workers:
        cmd += ["-w", str(int(workers))]
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - the child keeps it
    try:
        return subprocess.Popen(cmd, env=penv, stdout=out, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)
    finally:
        if out:
            out.close()


def wait_until_ready(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> float:
    """Poll ``URL/ping`` until it answers 200; returns the seconds waited. Raises if ``proc`` exits first."""
    ping = url.rstrip("/") + "/ping"
    t0 = time.time()
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the model server exited with code {proc.returncode} before answering {ping}")
        try:
            with urllib.request.urlopen(ping, timeout=2) as resp:
                if resp.status == 200:
                    return time.time() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.time() - t0 > timeout:
            raise TimeoutError(f"{ping} did not answer within {timeout:.0f} s")
        time.sleep(0.5)


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in process group ``pgid``."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    for stat in proc_dir.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """End a server started by :func:`serve` and everything it spawned (uvicorn and its workers).

    SIGTERM to its process group, wait until the whole group is gone, SIGKILL whatever is left after
    ``timeout``. Returns the exit code of the ``mlflow models serve`` process.
    """
    pgid = proc.pid  # serve() starts it as a session (and group) leader
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.time() + timeout
    while time.time() < deadline:
        proc.poll()
        if proc.returncode is not None and not _group_alive(pgid):
            return proc.returncode
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(5)
    except subprocess.TimeoutExpired:
        return None


__all__ = ["MedldmPyfunc", "ReconstructionRequest", "register_model", "download_model", "serve", "wait_until_ready",
           "stop", "volume_to_nifti_b64", "max_payload_bytes"]


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
