"""`medldm reconstruct` under torchrun: units split over 2 ranks, one merged manifest, one exit code."""

from __future__ import annotations

import pytest
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np

from tests.batch.conftest import noisy_mr, write_sr


@pytest.mark.slow
def test_torchrun_two_ranks_merge_one_manifest(bundles, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        nib.save(nib.Nifti1Image(noisy_mr((20, 16, 3), i), np.eye(4)), src / f"sub-0{i}_T1w.nii.gz")
    bad = noisy_mr((20, 16, 3), 2)
    bad[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(bad, np.eye(4)), src / "sub-02_T1w.nii.gz")
    write_sr(src / "report.dcm")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "medldm",
           "reconstruct", str(src), str(out), "--task", "denoise", "--model", str(bundles["denoise"]), "--steps", "1",
           "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr  # the Inf volume fails, on rank 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["summary"] == {"ok": 2, "failed": 1, "skipped": 1}
    names = [u["inputs"][0].rsplit("/", 1)[-1] for u in manifest["units"]]
    assert names == ["sub-00_T1w.nii.gz", "sub-01_T1w.nii.gz", "sub-02_T1w.nii.gz", "report.dcm"]  # discovery order
    assert not list(out.glob("manifest.rank*.json")) and not [p for p in os.listdir(out) if p.startswith(".")]
    assert result.stdout.count("1 failed") == 1  # only rank 0 prints the merged table
