"""A real ``mlflow models serve`` process on 127.0.0.1: good and bad requests, then stopped by process group."""

from __future__ import annotations

import base64
import os
import socket
import time
import urllib.request

import numpy as np
import pytest

from medldm.io.volume import Volume


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/ping", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_real_server_good_and_bad_requests(store, tiny_model, tmp_path):
    from medldm.client import RemoteError, post_json, reconstruct_remote
    from medldm.sampling.reconstructor import Reconstructor
    from medldm.serving import register_model, serve, stop, wait_until_ready

    reg = register_model(tiny_model, "tiny-served", input_example=False)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    proc = serve(reg["model_uri"], port=port, env={"MEDLDM_MAX_PAYLOAD_MB": "0.25"}, log_path=log)
    try:
        try:
            waited = wait_until_ready(url, timeout=120, proc=proc)
        except (RuntimeError, TimeoutError):
            pytest.fail(f"server did not start:\n{log.read_text()[-3000:]}")
        print(f"server ready after {waited:.1f} s")
        rng = np.random.default_rng(0)
        vol = Volume((rng.random((1, 32, 32, 32)) * 100).astype(np.float32), np.diag([1.0, 1.0, 1.5, 1.0]), "MR")

        # a NIfTI request, two samples -> reconstruction + uncertainty + provenance, same numbers as in process
        t0 = time.time()
        out, unc, prov = reconstruct_remote(url, vol, steps=2, samples=2, seed=1)
        print(f"NIfTI 32^3 request, steps=2, samples=2: {time.time() - t0:.2f} s")
        local = Reconstructor.load(tiny_model, device="cpu")(vol, steps=2, samples=2, seed=1)
        np.testing.assert_allclose(out.array, local.volume.array, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(out.affine, vol.affine)
        assert unc is not None and unc.array.shape == out.array.shape
        assert prov["parameters"]["samples"] == 2 and prov["model"]["registered_name"] == "tiny-served"

        # an array request
        ans = post_json(url + "/invocations", {"inputs": [{"array": vol.array[0].tolist(), "steps": 1}]})
        assert np.asarray(ans["predictions"][0]["array"]).shape == (32, 32, 32)

        bad = {
            "garbage base64": ({"nifti_b64": "@@@ not base64 @@@"}, "not valid base64"),
            "not a NIfTI": ({"nifti_b64": base64.b64encode(b"plain text " * 50).decode()}, "does not hold a NIfTI"),
            "unknown param": ({"array": vol.array[0].tolist(), "stpes": 2}, "unknown field(s) ['stpes']"),
            "wrong dims": ({"array": vol.array[0, 0].tolist(), "steps": 1}, "3D volume (X, Y, Z), got 2 dimension"),
            "oversize": ({"nifti_b64": base64.b64encode(os.urandom(400_000)).decode()}, "exceeds the limit"),
        }
        for what, (record, message) in bad.items():
            with pytest.raises(RemoteError) as info:
                post_json(url + "/invocations", {"inputs": [record]})
            err = info.value
            assert err.status == 400 and err.error_code == "INVALID_PARAMETER_VALUE", what
            assert message in str(err) and len(str(err)) < 500, (what, str(err)[:300])
        # the guard: no 'inputs' -> what a valid request looks like; a declared body over the limit -> 413 unread
        with pytest.raises(RemoteError) as info:
            post_json(url + "/invocations", {"foo": 1})
        assert info.value.status == 400 and "a valid request is" in str(info.value)
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.putrequest("POST", "/invocations")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(10**12))  # a terabyte announced, nothing sent
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413 and b"too large" in resp.read()
        conn.close()
        with pytest.raises(RemoteError) as info:  # the dataframe formats are refused for type-hinted models
            post_json(url + "/invocations", {"dataframe_records": [{"array": [[[1.0]]]}]})
        assert info.value.status == 400

        # still serving
        assert _ping(url)
        out2, unc2, _ = reconstruct_remote(url, vol, steps=2, samples=2, seed=1)
        np.testing.assert_array_equal(out2.array, out.array)
    finally:
        code = stop(proc)
    assert code is not None
    assert not _ping(url)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigterm_to_medldm_serve_stops_the_whole_server(store, tiny_model, tmp_path):
    import signal
    import subprocess
    import sys

    from medldm.serving import register_model, wait_until_ready

    reg = register_model(tiny_model, "tiny-sigterm", input_example=False)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "wb")
    cli = subprocess.Popen([sys.executable, "-m", "medldm", "serve", reg["model_uri"], "--port", str(port),
                            "--tracking-uri", store], stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "MEDLDM_WARMUP": "0"})
    try:
        try:
            wait_until_ready(url, timeout=120, proc=cli)
        except (RuntimeError, TimeoutError):
            pytest.fail(f"server did not start:\n{(tmp_path / 'serve.log').read_text()[-3000:]}")
        cli.send_signal(signal.SIGTERM)  # what `kill PID` and service managers send
        assert cli.wait(30) == 128 + signal.SIGTERM
        assert not _ping(url)
        with socket.socket() as s:  # nothing listens any more (TIME_WAIT connections may linger, as for any server)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
    finally:
        if cli.poll() is None:
            cli.kill()
        log.close()
