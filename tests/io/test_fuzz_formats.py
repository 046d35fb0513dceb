"""A small run of benchmarks/fuzz_formats.py per input kind: no crash, no hang, both outcomes seen."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_script

fuzz_formats = load_script("benchmarks", "fuzz_formats")
pytestmark = pytest.mark.slow  # ~10 s a kind on 2 busy cores: the full suite's, not the quick tier's


@pytest.mark.parametrize("kind", ["nifti", "fastmri", "sinogram"])
def test_file_inputs_small_run_no_crashes_no_hangs(kind, tmp_path):
    figures = fuzz_formats.fuzz_kind(kind, cases=120, seconds=120, seed=1, timeout=30, workdir=tmp_path)
    assert figures["cases"] == 120 and figures["hangs"] == 0
    assert figures["crashes"] == 0, json.dumps(figures["crash_classes"], indent=1)[:3000]
    assert figures["ok"] >= 1 and figures["failed"] >= 1


def test_serving_requests_small_run_no_crashes_no_hangs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from mlflow.pyfunc import scoring_server

    for name in ("MLFLOW_TRACKING_URI", "MEDLDM_CACHE_DIR", scoring_server._SERVER_MODEL_PATH):
        monkeypatch.setenv(name, "")  # set by the fuzzer for its throw-away store; restored afterwards
    figures = fuzz_formats.fuzz_kind("serving", cases=60, seconds=300, seed=1, timeout=60, workdir=tmp_path)
    assert figures["cases"] == 60 and figures["hangs"] == 0
    assert figures["crashes"] == 0, json.dumps(figures["crash_classes"], indent=1)[:3000]
    assert figures["ok"] >= 1 and figures["failed"] >= 1
