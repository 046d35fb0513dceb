"""Every MLflow registry, pyfunc and serving call of medldm lives here (the tracking store: medldm.tracking).

    register_model(model, name, alias="champion")   log a medldm model folder as an MLflow pyfunc model and
                                                    register a new version (card -> description, metrics -> tags)
    download_model("models:/NAME@alias")            registry / run URI -> local model folder (what
                                                    ``Reconstructor.load("models:/...")`` calls)
    serve(model_uri, host, port)                    MLflow's scoring app under uvicorn, guarded; ``wait_until_ready``
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

from medldm.serving.pyfunc import MedldmPyfunc
from medldm.serving.registry import ensure_registered, register_model
from medldm.serving.requests import (
    ReconstructionRequest, ReconstructionResponse, bad_request, max_payload_bytes, volume_to_nifti_b64,
)
from medldm.serving.server import serve, stop, wait_until_ready
from medldm.tracking.download import download_model

__all__ = ["MedldmPyfunc", "ReconstructionRequest", "ReconstructionResponse", "register_model", "download_model",
           "ensure_registered", "serve", "wait_until_ready", "stop", "volume_to_nifti_b64", "max_payload_bytes",
           "bad_request"]
