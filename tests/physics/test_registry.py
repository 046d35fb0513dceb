import json
import math

import pytest
import torch

from medldm.errors import ConfigError
from medldm.physics import build_operator, build_random_operator
from medldm.physics.ct import LowDoseCT
from medldm.physics.noise import RicianNoise
from tests.physics.conftest import phantom2d

RANDOM = [("recon", "MR", {"phase": True, "sigma": (0.0, 0.1)}),
          ("recon", "MR", {"mode": "3d", "mask_type": "equispaced", "accelerations": [4], "center_fractions": [0.1]}),
          ("denoise", "MR", {"sigma_range": (0.01, 0.05)}),
          ("denoise", "CT", {"I0_range": (1e3, 1e4), "views": 24}),
          ("recon", "CT", {"views": (20, 30)}),
          ("sr", "MR", {"factors": (2, 4), "profile": "gaussian"}),
          ("sr", "CT", {"operator": "InPlaneDownsample", "factors": (2,)})]


@pytest.mark.parametrize("task,modality,kw", RANDOM)
def test_params_round_trip_through_strict_json(task, modality, kw):
    op = build_random_operator(task, modality, **kw).sample(7)
    params = json.loads(json.dumps(op.params(), allow_nan=False))
    again = build_operator(task, modality, params)
    assert type(again) is type(op) and again.params() == op.params()
    x = phantom2d(16).reshape(1, 1, 16, 16, 1).expand(1, 1, 16, 16, 8).contiguous()
    if modality == "CT":
        x = 1000 * x - 1000
    assert torch.equal(again(x), op(x))


def test_defaults_and_explicit_operators():
    assert isinstance(build_operator("denoise", "mr", {"sigma": 0.1}), RicianNoise)
    ct = build_operator("denoise", "CT", {"views": 10})
    assert isinstance(ct, LowDoseCT) and ct.I0 == 1e4
    assert math.isinf(build_operator("recon", "CT", {}).I0)
    assert build_operator("sr", "MRI", {"operator": "InPlaneDownsample", "factor": 2}).params()["factor"] == 2


@pytest.mark.parametrize("task,modality,params", [
    ("deblur", "MR", {}), ("recon", "PET", {}), ("recon", "MR", {"operator": "Nope"}),
    ("denoise", "MR", {"operator": "ThickSlice"}), ("denoise", "CT", {"operator": "RicianNoise", "sigma": 1}),
    ("sr", "MR", {"factor": 2, "bogus": 1}), ("sr", "MR", {"factor": 0})])
def test_errors_are_config_errors(task, modality, params):
    with pytest.raises(ConfigError):
        build_operator(task, modality, params)


def test_random_kwargs_errors():
    with pytest.raises(ConfigError, match="accelerationz"):
        build_random_operator("recon", "MR", accelerationz=[4])
    with pytest.raises(ConfigError):
        build_random_operator("denoise", "CT", I0_range=(0, 10))
