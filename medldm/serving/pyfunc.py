"""The MLflow pyfunc around :class:`medldm.Reconstructor`: one request record per volume, validated here.

Parameters are record fields, not MLflow ``params`` (see :mod:`medldm.serving`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from medldm.errors import MedldmError
from medldm.serving.requests import (
    ReconstructionRequest, ReconstructionResponse, _array_volume, _check_params, _decode_nifti, _mb, _records,
    bad_request, max_payload_bytes, volume_to_nifti_b64,
)

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
        modality = rec_model.config.modality
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


def _example_record() -> dict:
    """A small valid input: a 32x32x2 disc volume, 1 step (MLflow runs it at log time to validate the model).

    32 voxels in-plane: the pixel refiner (BasicUNet) halves them 4 times and needs > 1 voxel left.
    """
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in (32, 32, 2)], indexing="ij"))
    vol = np.where((g[:2] ** 2).sum(0) < 0.5, 100.0, 10.0)
    return {"array": vol.tolist(), "spacing": [1.0, 1.0, 3.0], "steps": 1, "samples": 1, "seed": 0}
