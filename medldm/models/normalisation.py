"""Intensity normalisation that travels with every saved model.

MR: divide by a high percentile of the *degraded* input (what exists at inference). Scale only, no
offset, so the map stays linear and measured k-space can be scaled by the same factor for data
consistency. CT: a fixed HU window mapped to [0, 1], invertible, so outputs return to HU exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from medldm.errors import ConfigError


@dataclass
class Normalisation:
    kind: str = "percentile"  # "percentile" (MR) | "window" (CT)
    percentile: float = 99.5
    low: float = -1024.0
    high: float = 2000.0
    scale: float | None = None  # the fitted percentile value, for kind "percentile"

    def __post_init__(self):
        if self.kind not in ("percentile", "window"):
            raise ConfigError(f"normalisation kind must be 'percentile' or 'window', got {self.kind!r}")
        if self.kind == "window" and not self.high > self.low:
            raise ConfigError("normalisation window needs high > low")

    def fit(self, array) -> "Normalisation":
        """Return a copy fitted to ``array`` (percentile kind); window kind needs no fitting."""
        if self.kind == "window":
            return self
        a = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
        value = float(np.percentile(a, self.percentile))
        if not value > 0:
            value = float(np.abs(a).max()) or 1.0
        return Normalisation(kind=self.kind, percentile=self.percentile, low=self.low, high=self.high, scale=value)

    def _check(self):
        if self.kind == "percentile" and self.scale is None:
            raise ValueError("percentile normalisation used before fit()")

    def forward(self, x):
        self._check()
        if self.kind == "percentile":
            return x / self.scale
        return (x - self.low) / (self.high - self.low)

    def inverse(self, x):
        self._check()
        if self.kind == "percentile":
            return x * self.scale
        return x * (self.high - self.low) + self.low

    @property
    def linear_scale(self) -> float:
        """Factor by which a linear measurement of the normalised image shrinks (used to scale y)."""
        self._check()
        return 1.0 / self.scale if self.kind == "percentile" else 1.0 / (self.high - self.low)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("scale")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Normalisation":
        unknown = set(d) - {"kind", "percentile", "low", "high", "scale"}
        if unknown:
            raise ConfigError(f"unknown normalisation fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def for_modality(cls, modality: str) -> "Normalisation":
        mod = str(modality).upper()
        if mod not in ("MR", "CT"):  # a typo must not silently get MR's normalisation
            raise ConfigError(f"modality must be 'MR' or 'CT', got {modality!r}")
        return cls(kind="window") if mod == "CT" else cls(kind="percentile")
