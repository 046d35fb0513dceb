"""MONAI dictionary transform that turns clean volumes into (clean, degraded-condition) training pairs."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from monai.utils import ensure_tuple_rep

from medldm.errors import ConfigError, InputError
from medldm.physics.base import RandomOperator


class DegradeD(MapTransform, Randomizable):
    """Per item: draw a seed, sample an operator, simulate y, write the naive inverse as the condition.

    Writes ``condition_key`` (same type, shape and metadata as the image: numpy, torch or MetaTensor,
    channel-first (C, X, Y[, Z])), ``params_key`` (the operator's params(), which rebuild it exactly through
    ``build_operator``) and ``noise_key`` (the operator's noise level, when it has one). ``measurement_key``
    also stores y itself (complex k-space, sinogram or coarse grid: not generally collatable).

    Seeds come from this transform's own RandomState (``set_random_state``), never the global RNG. With
    ``seed_key``: an item that already carries that key is degraded with its seed (fixed validation pairs),
    otherwise the drawn seed is stored under it. The RandomState advances once per item either way.
    """

    def __init__(self, keys: KeysCollection = "image", random_operator: RandomOperator | None = None,
                 condition_key: str | Sequence[str] = "condition", seed_key: str | None = None,
                 measurement_key: str | None = None, params_key: str = "degradation",
                 noise_key: str = "noise_level", allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        if not isinstance(random_operator, RandomOperator):
            raise ConfigError(f"random_operator must be a RandomOperator, got {type(random_operator).__name__}")
        self.random_operator = random_operator
        if isinstance(condition_key, str) and len(self.keys) > 1:
            raise ConfigError("with several keys, give one condition_key per key")
        self.condition_keys = ensure_tuple_rep(condition_key, len(self.keys))
        self.seed_key, self.measurement_key = seed_key, measurement_key
        self.params_key, self.noise_key = params_key, noise_key
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        self._seed = int(self.R.randint(0, 2**31 - 1))

    @staticmethod
    def _to_batch(img) -> torch.Tensor:
        if isinstance(img, MetaTensor):
            t = img.as_tensor()
        else:
            t = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
        if t.ndim not in (3, 4):
            raise InputError(None, f"DegradeD expects a channel-first (C, X, Y[, Z]) image, got shape {tuple(t.shape)}")
        return t.detach().to(torch.float32)[None]

    @staticmethod
    def _like(t: torch.Tensor, img):
        if isinstance(img, MetaTensor):
            out = MetaTensor(t.to(img.dtype if img.is_floating_point() else torch.float32))
            out.copy_meta_from(img)
            return out
        if isinstance(img, torch.Tensor):
            return t.to(img.dtype if img.is_floating_point() else torch.float32)
        a = np.asarray(img)
        return t.cpu().numpy().astype(a.dtype if np.issubdtype(a.dtype, np.floating) else np.float32)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        seed = self._seed
        if self.seed_key is not None:
            if self.seed_key in d:
                seed = int(np.asarray(d[self.seed_key]).item())
            else:
                d[self.seed_key] = seed
        for key, ckey in self.key_iterator(d, self.condition_keys):
            img = d[key]
            x = self._to_batch(img)
            op = self.random_operator.sample(seed, image=x)
            with torch.no_grad():
                y = op(x)
                cond = op.naive_inverse(y)
            if cond.shape != x.shape:
                raise InputError(None, f"naive inverse of {type(op).__name__} has shape {tuple(cond.shape[1:])}, "
                                       f"image {key!r} has {tuple(x.shape[1:])}")
            d[ckey] = self._like(cond[0], img)
            d[self.params_key] = op.params()
            level = getattr(op, "noise_level", None)
            if level is not None:
                d[self.noise_key] = float(level)
            if self.measurement_key is not None:
                d[self.measurement_key] = y[0]
        return d
