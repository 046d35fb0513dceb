"""The request guard in front of MLflow's scoring app: size checked before the body is read, clear 400s."""

from __future__ import annotations

import asyncio
import json

from medldm.serving.app import RequestGuard


class _App:
    """Stands in for MLflow's app: records the body it was handed."""

    def __init__(self):
        self.body = None

    async def __call__(self, scope, receive, send):
        message = await receive()
        self.body = message["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _run(guard, chunks, headers=(), path="/invocations"):
    """Drive the guard with a POST whose body arrives in ``chunks``; returns (status, body, chunks read)."""
    read, sent = [], []
    pending = list(chunks) or [b""]

    async def receive():
        chunk = pending.pop(0)
        read.append(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers)}
    asyncio.run(guard(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body, len(read)


def test_a_declared_length_over_the_limit_is_refused_before_any_byte_is_read():
    app = _App()
    status, body, n_read = _run(RequestGuard(app, limit=1000), [b"x" * 10] * 5,
                                headers=[(b"content-length", b"1000000000")])
    assert status == 413 and n_read == 0 and app.body is None
    info = json.loads(body)
    assert info["error_code"] == "REQUEST_LIMIT_EXCEEDED" and "limit is" in info["message"]


def test_a_streamed_body_stops_being_read_once_past_the_limit():
    app = _App()
    status, _, n_read = _run(RequestGuard(app, limit=1000), [b"x" * 400] * 10)  # chunked: no content-length
    assert status == 413 and n_read == 3 and app.body is None


def test_a_request_without_inputs_gets_the_shape_of_a_valid_one():
    status, body, _ = _run(RequestGuard(_App(), limit=10_000), [b'{"foo": 1}'])
    message = json.loads(body)["message"]
    assert status == 400 and "keys ['foo']" in message and '{"inputs": [{"nifti_b64"' in message


def test_a_valid_request_reaches_the_app_unchanged():
    app = _App()
    payload = b'{"inputs": [{"array": [[[1.0, 2.0]]]}]}'
    status, body, _ = _run(RequestGuard(app, limit=10_000), [payload[:10], payload[10:]])
    assert status == 200 and body == b"ok" and app.body == payload
    status, _, _ = _run(RequestGuard(app, limit=10_000), [b"anything"], path="/other")  # only /invocations needs inputs
    assert status == 200


def test_params_beside_inputs_are_refused_not_silently_dropped():
    app = _App()
    body = json.dumps({"inputs": [{"array": [[[1.0]]]}], "params": {"steps": 3}}).encode()
    status, answer, _ = _run(RequestGuard(app, limit=10_000), [body])
    assert status == 400 and app.body is None and "put steps" in json.loads(answer)["message"]
    ok = json.dumps({"inputs": [{"array": [[[1.0]]], "steps": 3}], "params": {}}).encode()
    assert _run(RequestGuard(app, limit=10_000), [ok])[0] == 200 and app.body == ok
