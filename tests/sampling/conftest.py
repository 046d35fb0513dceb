"""Tiny untrained MR models, one per task, shared by the sampling tests (built once per module)."""

import pytest

from medldm.sampling.reconstructor import Reconstructor
from tests.helpers import make_tiny_bundle


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {t: Reconstructor.load(make_tiny_bundle(root / t, t, "MR"), device="cpu") for t in ("denoise", "recon", "sr")}
