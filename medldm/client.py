"""Call a served medldm model (``medldm serve`` / ``mlflow models serve``) over HTTP, stdlib only.

    from medldm.client import reconstruct_remote
    volume, uncertainty, provenance = reconstruct_remote("http://127.0.0.1:5000", "noisy.nii.gz", steps=20, samples=4)

The wire format (what the README's curl example sends): POST ``/invocations``, ``Content-Type: application/json``::

    {"inputs": [
        {"nifti_b64": "<base64 of a .nii.gz file>", "steps": 20, "samples": 4, "seed": 0}
    ]}

(``inputs`` is required: the model's signature comes from type hints, and MLflow then refuses
``dataframe_records``/``dataframe_split``.)

Optional record fields: ``steps`` (1-1000), ``samples`` (1-64; > 1 adds an uncertainty map), ``seed``,
``factor`` (super-resolution factor), ``sigma`` (noise level of a denoising input). For quick tests, instead of
``nifti_b64`` send ``"array": [[[...]]]`` (a 3D volume X, Y, Z as nested lists) and optionally
``"spacing": [1.0, 1.0, 1.0]``. The answer::

    {"predictions": [
        {"nifti_b64": "<base64 .nii.gz, the reconstruction>",
         "uncertainty_b64": "<base64 .nii.gz, per-voxel std over samples; only when samples > 1>",
         "provenance": "<JSON string: model, parameters, operator, input hash, timings>"}
    ]}

(an ``array`` request gets ``array``, ``spacing``, ``uncertainty`` when samples > 1, and ``provenance``).
A bad request (not a NIfTI, an unknown field, wrong dimensions, a payload over the server's
MEDLDM_MAX_PAYLOAD_MB) answers HTTP 400 with ``{"error_code": "INVALID_PARAMETER_VALUE", "message": "..."}``.

With curl::

    printf '{"inputs": [{"nifti_b64": "%s", "steps": 20}]}' "$(base64 -w0 noisy.nii.gz)" > request.json
    curl -s -X POST http://127.0.0.1:5000/invocations -H 'Content-Type: application/json' -d @request.json \\
        | python -c 'import sys,json,base64; p=json.load(sys.stdin)["predictions"][0]; \\
                     open("restored.nii.gz","wb").write(base64.b64decode(p["nifti_b64"])); print(p["provenance"])'
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from medldm.errors import MedldmError
from medldm.io.volume import Volume


class RemoteError(MedldmError):
    """The server refused the request (``status`` 4xx: a bad request; 5xx: a server fault) or was unreachable."""

    def __init__(self, status: int | None, message: str, error_code: str | None = None):
        self.status, self.error_code = status, error_code
        super().__init__(f"HTTP {status}: {message}" if status else message)


def _invocations_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/invocations") else url + "/invocations"


def _nifti_bytes(volume_or_path) -> tuple[bytes, str | None]:
    from medldm.io import read_volume
    from medldm.io.nifti import nifti_bytes

    if isinstance(volume_or_path, (str, os.PathLike)):
        path = Path(volume_or_path)
        if path.is_file() and path.name.lower().endswith(".nii.gz"):
            return path.read_bytes(), None  # as it is: no float round trip, header kept
        volume = read_volume(path)
    elif isinstance(volume_or_path, Volume):
        volume = volume_or_path
    else:
        raise TypeError(f"expected a Volume or a path, got {type(volume_or_path).__name__}")
    return nifti_bytes(volume), volume.modality


def _decode_volume(b64: str, modality: str | None, name: str) -> Volume:
    from medldm.io.nifti import nifti_from_bytes

    data = base64.b64decode(b64)
    return nifti_from_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data, f"remote:{name}", modality)


def post_json(url: str, payload: dict, timeout: float = 600.0) -> dict:
    """POST JSON, return the decoded JSON answer; HTTP errors become RemoteError with the server's message."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        body = err.read().decode("utf-8", "replace")
        try:
            info = json.loads(body)
            message, code = info.get("message", body), info.get("error_code")
        except ValueError:
            message, code = body, None
        raise RemoteError(err.code, message.strip()[:4000], code) from None
    except (urllib.error.URLError, OSError) as err:
        raise RemoteError(None, f"cannot reach {url}: {getattr(err, 'reason', err)}") from None


def reconstruct_remote(url: str, volume_or_path, *, timeout: float = 600.0, **params
                       ) -> tuple[Volume, Volume | None, dict]:
    """Send one volume (a Volume, or a path medldm.io can read) to a served model.

    ``params`` are the record fields (steps, samples, seed, factor, sigma). Returns (reconstruction,
    uncertainty or None, provenance dict). Raises RemoteError with the server's message on a 4xx/5xx.
    """
    data, modality = _nifti_bytes(volume_or_path)
    record = {"nifti_b64": base64.b64encode(data).decode("ascii"), **params}
    answer = post_json(_invocations_url(url), {"inputs": [record]}, timeout=timeout)
    try:
        pred = answer["predictions"][0]
        volume = _decode_volume(pred["nifti_b64"], modality, "reconstruction")
    except (KeyError, IndexError, TypeError) as exc:
        raise RemoteError(200, f"unexpected answer from {url}: missing {exc}") from None
    unc = _decode_volume(pred["uncertainty_b64"], modality, "uncertainty") if pred.get("uncertainty_b64") else None
    prov = pred.get("provenance")
    prov = json.loads(prov) if isinstance(prov, str) else (prov or {})
    if modality is None:
        modality = prov.get("modality")
        volume.modality = modality
        if unc is not None:
            unc.modality = modality
    return volume, unc, prov


__all__ = ["reconstruct_remote", "post_json", "RemoteError"]
