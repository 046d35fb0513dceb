"""The functions sent to joblib's worker processes come from a module that does not import torch."""

import subprocess
import sys

import numpy as np

from medldm.slice_filters import nlm_images, rician_unbias


def test_the_worker_module_imports_neither_torch_nor_monai():
    # a worker imports the module of each function it unpickles: torch + MONAI cost 7.5 s per worker here
    code = ("import sys, medldm.slice_filters; "
            "print(sorted(m for m in ('torch', 'monai', 'medldm.physics') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_nlm_images_filters_each_image_on_its_own():
    rng = np.random.default_rng(0)
    images = rng.random((3, 20, 18)).astype(np.float32)
    together = nlm_images(images, 0.1)
    np.testing.assert_array_equal(together[1], nlm_images(images[1:2], 0.1)[0])
    assert together.shape == images.shape and together.dtype == np.float32
    assert rician_unbias(np.array([0.0, -3.0], np.float32), 0.5).tolist() == [0.0, 0.0]
