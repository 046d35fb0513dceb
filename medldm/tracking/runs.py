"""Logging training and evaluation runs to MLflow (``Tracker``); the package docstring says what else lives here.

``Tracker`` is a small facade: training code calls ``log_metrics`` etc. without knowing whether
tracking is on, which store is used, or which DDP rank it runs on (only rank 0 logs).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def mlflow_name(key: str) -> str:
    """MLflow metric and tag names allow alphanumerics and _-. :/ only; map anything else (e.g. the '%' of
    a case named 'sigma5%', the '=' of 'I0=1e4') to '_'."""
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in str(key))


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class Tracker:
    """MLflow run wrapper; with ``enabled=False`` every call is a no-op (training works without MLflow)."""

    def __init__(self, enabled: bool = True, experiment: str = "medldm", tracking_uri: str | None = None):
        self.enabled = enabled
        self.run_id: str | None = None
        if not enabled:
            return
        import mlflow

        self._mlflow = mlflow
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)

    def start(self, run_name: str, params: dict | None = None, tags: dict | None = None, run_id: str | None = None) -> "Tracker":
        if not self.enabled:
            return self
        run = self._mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
        self.run_id = run.info.run_id
        if params and run_id is None:
            # MLflow caps param values at 6000 chars; configs are far smaller.
            self._mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
        all_tags = {"medldm.git_commit": git_commit() or "unknown", **(tags or {})}
        self._mlflow.set_tags(all_tags)
        return self

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            self._mlflow.log_metrics({mlflow_name(k): float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            p = Path(path)
            if p.is_dir():
                self._mlflow.log_artifacts(str(p), artifact_path=artifact_path)
            else:
                self._mlflow.log_artifact(str(p), artifact_path=artifact_path)

    def log_figure(self, figure, name: str) -> None:
        if self.enabled:
            self._mlflow.log_figure(figure, name)

    def log_dict(self, data: dict, name: str) -> None:
        if self.enabled:
            self._mlflow.log_dict(data, name)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id is not None:
            self._mlflow.end_run(status=status)
            self.run_id = None
