"""Resume checkpoints: every RNG comes back exactly, and loading runs no pickled code."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from medldm.errors import ConfigError
from medldm.training import common


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    np.random.seed(3); torch.manual_seed(3); random.seed(3)
    np.random.normal()  # a cached Gaussian is part of numpy's state
    path = tmp_path / "ck.pt"
    common.save_checkpoint(path, {"rng": common.rng_state(), "step": 7})
    expected = (np.random.random(4), torch.rand(4), [random.random() for _ in range(4)], np.random.normal())
    np.random.seed(99); torch.manual_seed(99); random.seed(99)
    loaded = common.load_checkpoint(path)
    common.set_rng_state(loaded["rng"])
    np.testing.assert_array_equal(np.random.random(4), expected[0])
    torch.testing.assert_close(torch.rand(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]
    assert np.random.normal() == expected[3] and loaded["step"] == 7


class _Payload:
    def __reduce__(self):
        return (print, ("this would run at load time",))


def test_a_checkpoint_holding_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"step": 1, "x": _Payload()}, path)
    with pytest.raises(ConfigError, match="cannot resume safely|resume safely"):
        common.load_checkpoint(path)
