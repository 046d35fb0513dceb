"""Requests to the served medldm model: their schema, validation and the NIfTI <-> base64 codec.

Split from medldm.serving (which owns every MLflow registry and serving call) to keep files short; bad
requests raise MlflowException(INVALID_PARAMETER_VALUE) so ``mlflow models serve`` answers HTTP 400.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import zlib
from typing import Annotated, Optional
import numpy as np
import pydantic
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from medldm.errors import MedldmError
from medldm.io.nifti import nifti_bytes, nifti_from_bytes

DEFAULT_MAX_PAYLOAD_MB = 256.0
DECOMPRESSED_FACTOR = 4  # a gzip NIfTI may inflate to this many times the payload limit
PARAM_NAMES = ("steps", "samples", "seed", "factor", "sigma")
INPUT_NAMES = ("nifti_b64", "array", "spacing")
LIMITS = {"steps": (1, 1000), "samples": (1, 64), "seed": (0, 2**63 - 1), "factor": (1, 16)}


# ----------------------------------------------------------------------------------------------- request schema


def _keep_raw(value, handler):
    try:
        return handler(value)
    except pydantic.ValidationError:
        return value  # predict checks it and answers with a clear message


_Raw = pydantic.WrapValidator(_keep_raw)


class ReconstructionRequest(pydantic.BaseModel):
    """One volume to reconstruct. Exactly one of ``nifti_b64`` / ``array``.

    The field types give the model's MLflow signature. Validation itself happens in ``predict``: this model
    never fails (unknown fields are kept as extras, ill-typed values as they came), because MLflow turns a
    pydantic error into a message that quotes the whole request back (megabytes of base64 for a NIfTI),
    while ``predict`` answers with one clear line.
    """

    model_config = pydantic.ConfigDict(extra="allow")

    nifti_b64: Annotated[Optional[str], _Raw] = None
    array: Annotated[Optional[list[list[list[float]]]], _Raw] = None
    spacing: Annotated[Optional[list[float]], _Raw] = None
    steps: Annotated[Optional[int], _Raw] = None
    samples: Annotated[Optional[int], _Raw] = None
    seed: Annotated[Optional[int], _Raw] = None
    factor: Annotated[Optional[int], _Raw] = None
    sigma: Annotated[Optional[float], _Raw] = None


class ReconstructionResponse(pydantic.BaseModel):
    """One reconstructed volume: the NIfTI fields answer ``nifti_b64`` requests, the array fields ``array`` ones."""

    nifti_b64: Optional[str] = None
    uncertainty_b64: Optional[str] = None
    array: Optional[list[list[list[float]]]] = None
    uncertainty: Optional[list[list[list[float]]]] = None
    spacing: Optional[list[float]] = None
    provenance: str


class RequestError(MlflowException):
    """A bad request: ``mlflow models serve`` answers it with HTTP 400 and this message.

    The scoring server rewrites ``e.message`` to ``"Failed to predict data '<repr of the whole input>' ..."``
    before answering; for a NIfTI request that echoes megabytes of base64 (patient data) back in the error.
    This class keeps its own message instead. (MLflow's own type-validation errors still echo the input.)
    """

    @property
    def message(self) -> str:
        return self.__dict__.get("_medldm_message", "")

    @message.setter
    def message(self, value: str) -> None:
        if "_medldm_message" not in self.__dict__:
            self.__dict__["_medldm_message"] = value


def bad_request(message: str) -> MlflowException:
    return RequestError(message, error_code=INVALID_PARAMETER_VALUE)


def max_payload_bytes() -> int:
    raw = os.environ.get("MEDLDM_MAX_PAYLOAD_MB", "")
    try:
        mb = float(raw) if raw.strip() else DEFAULT_MAX_PAYLOAD_MB
    except ValueError:
        mb = DEFAULT_MAX_PAYLOAD_MB
    return int(mb * 1024 * 1024)


def _mb(n: int) -> str:
    return f"{n / 1024 / 1024:.3g} MB"


def _is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _records(model_input) -> list[dict]:
    """MLflow hands predict a list of ReconstructionRequest (converted from a DataFrame or list of dicts)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, (dict, ReconstructionRequest)):
        rows = [model_input]
    elif isinstance(model_input, list):
        rows = model_input
    else:
        raise bad_request(f"expected records (a DataFrame or a list of objects), got {type(model_input).__name__}")
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, ReconstructionRequest):  # raw attributes: the values may be ill-typed (see the class)
            d = {k: v for k, v in {**row.__dict__, **(row.__pydantic_extra__ or {})}.items() if not _is_missing(v)}
        elif isinstance(row, dict):
            d = {k: v for k, v in row.items() if not _is_missing(v)}
        else:
            raise bad_request(f"record {i}: expected an object, got {type(row).__name__}")
        out.append(d)
    if not out:
        raise bad_request("no records in the request")
    return out


def _check_params(rec: dict, where: str) -> dict:
    unknown = sorted(set(rec) - set(PARAM_NAMES) - set(INPUT_NAMES))
    if unknown:
        raise bad_request(f"{where}: unknown field(s) {unknown}; allowed: {list(INPUT_NAMES + PARAM_NAMES)}")
    params = {}
    for name in PARAM_NAMES:
        if name not in rec:
            continue
        v = rec[name]
        if name == "sigma":
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise bad_request(f"{where}: sigma must be a number, got {v!r}") from None
            if not (math.isfinite(v) and v >= 0):
                raise bad_request(f"{where}: sigma must be a finite number >= 0, got {v}")
        else:
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise bad_request(f"{where}: {name} must be an integer, got {v!r}")
            lo, hi = LIMITS[name]
            if not lo <= int(v) <= hi:
                raise bad_request(f"{where}: {name} must be in [{lo}, {hi}], got {v}")
            v = int(v)
        params[name] = v
    return params


# ------------------------------------------------------------------------------------------ NIfTI <-> base64


def _decode_nifti(b64: str, where: str, limit: int):
    if not isinstance(b64, str):
        raise bad_request(f"{where}: nifti_b64 must be a base64 string")
    if len(b64) * 3 // 4 > limit:
        raise bad_request(f"{where}: payload of {_mb(len(b64) * 3 // 4)} exceeds the limit of {_mb(limit)} "
                          "(MEDLDM_MAX_PAYLOAD_MB on the server)")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"{where}: nifti_b64 is not valid base64 ({exc})") from None
    gz = raw[:2] == b"\x1f\x8b"
    if gz:
        cap = limit * DECOMPRESSED_FACTOR
        try:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            data = d.decompress(raw, cap + 1)
        except zlib.error as exc:
            raise bad_request(f"{where}: nifti_b64 is gzip data but cannot be decompressed ({exc})") from None
        if len(data) > cap:
            raise bad_request(f"{where}: the NIfTI inflates to more than {_mb(cap)} "
                              f"({DECOMPRESSED_FACTOR} x MEDLDM_MAX_PAYLOAD_MB)")
    else:
        data = raw
    if not _looks_like_nifti(data):
        raise bad_request(f"{where}: nifti_b64 does not hold a NIfTI-1/NIfTI-2 image (.nii or .nii.gz bytes)")
    try:
        return nifti_from_bytes(data, where)
    except MedldmError as exc:
        raise bad_request(f"{where}: {getattr(exc, 'problem', exc)}") from None


def _looks_like_nifti(data: bytes) -> bool:
    if len(data) < 348:
        return False
    for order in ("<", ">"):
        size = int(np.frombuffer(data[:4], dtype=f"{order}i4")[0])
        if size == 348 and data[344:347] in (b"n+1", b"ni1"):
            return True
        if size == 540 and data[4:7] in (b"n+2", b"ni2"):
            return True
    return False


def volume_to_nifti_b64(volume) -> str:
    return base64.b64encode(nifti_bytes(volume)).decode("ascii")


def _array_volume(rec: dict, where: str, limit: int, modality: str | None):
    from medldm.io.volume import Volume

    try:
        arr = np.asarray(rec["array"], dtype=np.float32)
    except (ValueError, TypeError):
        raise bad_request(f"{where}: array must be a regular nested list of numbers with 3 levels (X, Y, Z)") from None
    if arr.ndim != 3:
        raise bad_request(f"{where}: array must be a 3D volume (X, Y, Z), got {arr.ndim} dimension(s) {arr.shape}")
    if min(arr.shape) < 1:
        raise bad_request(f"{where}: array has an empty axis {arr.shape}")
    if arr.nbytes > limit:
        raise bad_request(f"{where}: array of {_mb(arr.nbytes)} exceeds the limit of {_mb(limit)} "
                          "(MEDLDM_MAX_PAYLOAD_MB)")
    if not np.all(np.isfinite(arr)):
        raise bad_request(f"{where}: array contains NaN/Inf")
    spacing = rec.get("spacing") or [1.0, 1.0, 1.0]
    try:
        spacing = [float(s) for s in spacing]
    except (TypeError, ValueError):
        raise bad_request(f"{where}: spacing must be 3 numbers (mm)") from None
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise bad_request(f"{where}: spacing must be 3 positive numbers (mm), got {spacing}")
    return Volume(arr[None], np.diag([*spacing, 1.0]), modality, {"source": where})
