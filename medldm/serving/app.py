"""The ASGI app ``medldm serve`` runs: MLflow's own scoring server for the model, behind a request guard.

``mlflow models serve`` reads a request's whole body before anything can look at its size, and answers a JSON
object without ``inputs`` with MLflow's internal wording. The guard sits in front of the same app (same routes,
same answers otherwise) and, before the body is read:
- refuses a declared ``Content-Length`` over the limit (HTTP 413) without reading a byte of it;
- stops reading a streamed body once it passes the limit (413);
- answers a JSON body without an ``inputs`` key with a 400 that shows what a valid request looks like;
- answers a body with ``params`` (which MLflow would drop with a log line) with a 400 saying where they go.

The body limit is ``MEDLDM_MAX_BODY_MB``, by default what a ``nifti_b64`` request of ``MEDLDM_MAX_PAYLOAD_MB``
takes (base64 is 4/3 of the bytes) plus 1 MiB for the JSON around it. uvicorn imports ``app`` from here with
the model path in MLflow's own variable, exactly as ``mlflow models serve`` does with its app.
"""

from __future__ import annotations

import json
import os

from medldm.serving.requests import max_payload_bytes

VALID_REQUEST = ('{"inputs": [{"nifti_b64": "<base64 of a .nii.gz>", "steps": 10, "samples": 2}]} or '
                 '{"inputs": [{"array": [[[...]]], "spacing": [1, 1, 1]}]} (a 3D volume, at least 2 voxels '
                 'along two axes; optional fields: steps, samples, seed, factor, sigma)')


def max_body_bytes() -> int:
    raw = os.environ.get("MEDLDM_MAX_BODY_MB", "").strip()
    try:
        if raw:
            return int(float(raw) * 1024 * 1024)
    except ValueError:
        pass
    return max_payload_bytes() * 4 // 3 + 1024 * 1024


class RequestGuard:
    """Pure ASGI middleware (no body is buffered before its size is known to be within ``limit``)."""

    def __init__(self, app, limit: int | None = None):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        limit = self.limit if self.limit is not None else max_body_bytes()
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _refuse(send, 413, "REQUEST_LIMIT_EXCEEDED", _too_large(int(declared), limit))
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _refuse(send, 413, "REQUEST_LIMIT_EXCEEDED", _too_large(size, limit, streamed=True))
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if scope.get("path", "").rstrip("/") == "/invocations":
            if b'"inputs"' not in body:
                return await _refuse(send, 400, "INVALID_PARAMETER_VALUE", _missing_inputs(body))
            if b'"params"' in body and _has_params(body):  # MLflow would ignore them with a log line only
                return await _refuse(send, 400, "INVALID_PARAMETER_VALUE", "'params' are not read by this model: "
                                     f"put steps, samples, seed, factor and sigma in each record; {VALID_REQUEST}")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def _too_large(size: int, limit: int, streamed: bool = False) -> str:
    got = f"more than {limit / 2**20:.3g} MB arrived" if streamed else f"the request declares {size / 2**20:.3g} MB"
    return (f"request body too large: {got}, the limit is {limit / 2**20:.3g} MB (MEDLDM_MAX_BODY_MB, or "
            "MEDLDM_MAX_PAYLOAD_MB on the server); send large volumes as gzipped NIfTI in nifti_b64")


def _has_params(body: bytes) -> bool:
    try:
        request = json.loads(body)
    except (ValueError, TypeError):
        return False
    return isinstance(request, dict) and request.get("params") not in (None, {})


def _missing_inputs(body: bytes) -> str:
    try:
        keys = sorted(json.loads(body)) if body.strip().startswith(b"{") else None
    except (ValueError, TypeError):
        keys = None
    what = f"a JSON object with keys {keys}" if keys is not None else "no JSON object with an 'inputs' key"
    return f"the request is {what}; a valid request is {VALID_REQUEST}"


async def _refuse(send, status: int, code: str, message: str) -> None:
    payload = json.dumps({"error_code": code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


def __getattr__(name: str):
    # built on first access (uvicorn's import of "medldm.serving.app:app"), so importing this module for the
    # guard alone (tests, the CLI) loads no model
    if name != "app":
        raise AttributeError(name)
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(os.environ[scoring_server._SERVER_MODEL_PATH])
    globals()["app"] = guarded = RequestGuard(scoring_server.init(model))
    return guarded
