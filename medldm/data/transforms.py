"""MONAI dictionary pipelines that turn the prepared NIfTI datalist into training patches.

Intensity normalisation is a first-class, serialisable object (:class:`Normalisation`) rather than a bare
MONAI transform because a trained model must carry it: inference has to apply the same mapping to its
input and map its output back to scanner units (HU for CT, the input's own scale for MR).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from monai import transforms as mt
from monai.config import KeysCollection
from monai.data import CacheDataset, Dataset, PersistentDataset, load_decathlon_datalist

from medldm.errors import ConfigError, InputError

# CT window: -1024 HU (air, the scanner floor) .. 2000 HU (dense cortical bone). Anything above (dental
# metal, the densest petrous bone) is clipped, so inverse() is exact only inside the window.
CT_WINDOW = (-1024.0, 2000.0)
MR_PERCENTILES = (0.5, 99.5)
# Normalised value above which a voxel counts as foreground for cropping and slice picking: far above the
# background of MR (0) and CT air (0), below every tissue.
FOREGROUND_FLOOR = 0.02


@dataclass(frozen=True)
class Normalisation:
    """Linear map ``[lower, upper] -> [0, 1]`` (optionally clipped) and its inverse.

    ``kind="window"``: fixed data values (CT Hounsfield window). ``kind="percentile"``: lower/upper are the
    ``p_low``/``p_high`` percentiles *of each volume*; :meth:`fit` computes them, and the fitted object
    (returned by the MONAI transform under ``"<key>_norm"``) is what inference needs to map outputs back.
    """

    kind: Literal["percentile", "window"]
    lower: float | None = None
    upper: float | None = None
    p_low: float = MR_PERCENTILES[0]
    p_high: float = MR_PERCENTILES[1]
    clip: bool = True

    def __post_init__(self):
        if self.kind not in ("percentile", "window"):
            raise ConfigError(f"normalisation kind must be 'percentile' or 'window', got {self.kind!r}")
        if self.kind == "window" and (self.lower is None or self.upper is None):
            raise ConfigError("window normalisation needs lower and upper")
        if not 0.0 <= self.p_low < self.p_high <= 100.0:
            raise ConfigError(f"percentiles must satisfy 0 <= p_low < p_high <= 100, got {self.p_low}, {self.p_high}")

    @classmethod
    def percentile(cls, p_low: float = MR_PERCENTILES[0], p_high: float = MR_PERCENTILES[1], clip: bool = True):
        return cls("percentile", p_low=p_low, p_high=p_high, clip=clip)

    @classmethod
    def window(cls, lower: float = CT_WINDOW[0], upper: float = CT_WINDOW[1], clip: bool = True):
        return cls("window", lower=float(lower), upper=float(upper), clip=clip)

    @property
    def fitted(self) -> bool:
        return self.lower is not None and self.upper is not None

    def fit(self, array) -> "Normalisation":
        """Percentile kind: a copy with this volume's lower/upper. Window kind: itself."""
        if self.kind == "window":
            return self
        a = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
        lo, hi = np.percentile(a, [self.p_low, self.p_high])
        return replace(self, lower=float(lo), upper=float(hi))

    def _scale(self) -> tuple[float, float]:
        if not self.fitted:
            raise ConfigError("percentile normalisation is not fitted: call fit(volume) first (or use fit_forward)")
        width = self.upper - self.lower
        # A constant image has no range; width 1 keeps forward/inverse finite and still inverse-exact.
        return self.lower, (width if width > 0 else 1.0)

    def forward(self, array):
        lo, width = self._scale()
        y = (array - lo) / width
        if self.clip:
            y = y.clamp(0.0, 1.0) if isinstance(y, torch.Tensor) else np.clip(y, 0.0, 1.0)
        return y

    def inverse(self, array):
        lo, width = self._scale()
        return array * width + lo

    def fit_forward(self, array):
        """(normalised array, fitted Normalisation): keep the second to map outputs back."""
        fitted = self.fit(array)
        return fitted.forward(array), fitted

    def to_dict(self) -> dict[str, Any]:
        # None is omitted so the dict survives torch's default collate (it cannot batch None).
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Normalisation":
        known = {"kind", "lower", "upper", "p_low", "p_high", "clip"}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown normalisation fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def for_modality(cls, modality: str) -> "Normalisation":
        m = modality.upper()
        if m == "CT":
            return cls.window()
        if m == "MR":
            return cls.percentile()
        raise ConfigError(f"modality must be 'MR' or 'CT', got {modality!r}")


class NormaliseIntensityd(mt.MapTransform):
    """Apply a :class:`Normalisation` (fitted per volume when it is a percentile one); store the fitted
    parameters under ``"<key>_norm"`` so they travel with the sample."""

    def __init__(self, keys: KeysCollection, normalisation: Normalisation, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.normalisation = normalisation

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            out, fitted = self.normalisation.fit_forward(d[key])
            d[key] = out.to(torch.float32) if isinstance(out, torch.Tensor) else out.astype(np.float32)
            d[f"{key}_norm"] = fitted.to_dict()
        return d


def mr_normalise(keys: KeysCollection = "image", p_low: float = MR_PERCENTILES[0], p_high: float = MR_PERCENTILES[1]):
    """Per-volume percentile scaling: the ``p_low``..``p_high`` percentiles -> 0..1, clipped."""
    return NormaliseIntensityd(keys, Normalisation.percentile(p_low, p_high))


def ct_normalise(keys: KeysCollection = "image", lower: float = CT_WINDOW[0], upper: float = CT_WINDOW[1]):
    """Fixed HU window ``lower``..``upper`` -> 0..1, clipped (same mapping for every volume)."""
    return NormaliseIntensityd(keys, Normalisation.window(lower, upper))


def _is_foreground(x):
    # Module-level (not a lambda) so pipelines pickle into DataLoader workers.
    return x > FOREGROUND_FLOOR


class RandSlicesd(mt.MapTransform, mt.Randomizable):
    """Draw ``num_samples`` 2D slices from a ``(C, X, Y, Z)`` volume; returns a list of samples.

    Slicing after the (cacheable) load/normalise steps lets one NIfTI read feed many 2D samples. The plane
    axis is drawn from ``axes`` (2 = axial in RAS). Slices whose foreground (> FOREGROUND_FLOOR) covers less
    than ``min_foreground`` of the plane are skipped when any slice qualifies, so batches are not mostly
    empty air above the vertex. Randomness comes from MONAI's per-transform state (``set_random_state``).
    """

    def __init__(self, keys: KeysCollection, num_samples: int = 8, axes: Sequence[int] = (2,),
                 min_foreground: float = 0.02, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
        if not axes or any(a not in (0, 1, 2) for a in axes):
            raise ConfigError(f"slice axes must be a non-empty subset of (0, 1, 2), got {axes}")
        self.num_samples = int(num_samples)
        self.axes = tuple(int(a) for a in axes)
        self.min_foreground = float(min_foreground)

    def randomize(self, data=None):
        pass

    def __call__(self, data):
        d = dict(data)
        first = next(iter(self.key_iterator(d)))
        ref = torch.as_tensor(d[first])
        fg = ref > FOREGROUND_FLOOR
        candidates = {}
        for ax in self.axes:
            other = tuple(a + 1 for a in (0, 1, 2) if a != ax)
            frac = fg.float().mean(dim=(0, *other)).cpu().numpy()
            ok = np.flatnonzero(frac >= self.min_foreground)
            candidates[ax] = ok if ok.size else np.arange(ref.shape[ax + 1])
        out = []
        for _ in range(self.num_samples):
            ax = self.axes[self.R.randint(len(self.axes))]
            idx = int(candidates[ax][self.R.randint(len(candidates[ax]))])
            s = {k: v for k, v in d.items() if k not in self.keys}
            for key in self.key_iterator(d):
                # Plain tensors: a 2D slice cannot keep the 3D affine meaningfully.
                s[key] = torch.as_tensor(d[key]).select(ax + 1, idx).clone()
            s["slice_axis"], s["slice_index"] = ax, idx
            out.append(s)
        return out


def build_train_transforms(
    spatial_dims: int,
    patch_size: Sequence[int] | int,
    modality: str,
    *,
    key: str = "image",
    target_spacing: Sequence[float] | None = None,
    num_samples: int | None = None,
    slice_axes: Sequence[int] = (2,),
    crop_foreground: bool = True,
    normalisation: Normalisation | None = None,
) -> mt.Compose:
    """Load -> RAS -> (resample) -> normalise -> (crop to foreground) -> patches of ``patch_size``.

    2D: ``num_samples`` (default 8) random slices per loaded volume (plane axis drawn from ``slice_axes``),
    each padded then randomly cropped to ``patch_size``. 3D: ``num_samples`` (default 2) random
    ``patch_size`` crops per volume, after padding volumes smaller than the patch.
    Each output sample is a dict with ``key`` -> tensor ``(1, *patch_size)`` and ``"<key>_norm"``.
    """
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    patch = (patch_size,) * spatial_dims if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
    if len(patch) != spatial_dims or any(p < 1 for p in patch):
        raise ConfigError(f"patch_size {patch_size} does not fit spatial_dims={spatial_dims}")
    norm = normalisation or Normalisation.for_modality(modality)
    steps: list = [
        mt.LoadImaged(key, reader="NibabelReader", image_only=True),
        mt.EnsureChannelFirstd(key),
        mt.Orientationd(key, axcodes="RAS", labels=None),
    ]
    if target_spacing is not None:
        steps.append(mt.Spacingd(key, pixdim=tuple(target_spacing), mode="bilinear", dtype=np.float32))
    steps.append(NormaliseIntensityd(key, norm))
    if crop_foreground:
        steps.append(mt.CropForegroundd(key, source_key=key, select_fn=_is_foreground, margin=2, allow_smaller=True))
    if spatial_dims == 2:
        steps += [
            RandSlicesd(key, num_samples=num_samples or 8, axes=slice_axes),
            mt.SpatialPadd(key, spatial_size=patch),
            mt.RandSpatialCropd(key, roi_size=patch, random_size=False),
        ]
    else:
        steps += [
            mt.SpatialPadd(key, spatial_size=patch),
            mt.RandSpatialCropSamplesd(key, roi_size=patch, num_samples=num_samples or 2, random_size=False),
        ]
    steps.append(mt.EnsureTyped(key, dtype=torch.float32, track_meta=False))
    return mt.Compose(steps)


def build_eval_transforms(modality: str, *, key: str = "image", target_spacing: Sequence[float] | None = None,
                          normalisation: Normalisation | None = None) -> mt.Compose:
    """Whole volumes for validation: load -> RAS -> (resample) -> normalise; no cropping."""
    steps: list = [
        mt.LoadImaged(key, reader="NibabelReader", image_only=True),
        mt.EnsureChannelFirstd(key),
        mt.Orientationd(key, axcodes="RAS", labels=None),
    ]
    if target_spacing is not None:
        steps.append(mt.Spacingd(key, pixdim=tuple(target_spacing), mode="bilinear", dtype=np.float32))
    steps.append(NormaliseIntensityd(key, normalisation or Normalisation.for_modality(modality)))
    return mt.Compose(steps)


def load_datalist(datalist_path: str | Path, split: str, modality: str | None = None) -> list[dict]:
    """Entries of one split with absolute image paths, keeping only ``image``, ``modality``, ``source``
    (extra bookkeeping keys differ between entries and would break batch collation)."""
    path = Path(datalist_path)
    if not path.is_file():
        raise InputError(path, "datalist not found; create it with medldm.data.prepare.prepare_data")
    try:
        keys = json.loads(path.read_text()).keys()
    except json.JSONDecodeError as e:
        raise InputError(path, f"datalist is not valid JSON: {e}") from e
    if split not in keys:
        raise InputError(path, f"datalist has no split {split!r} (has {sorted(keys)})")
    items = load_decathlon_datalist(path, is_segmentation=False, data_list_key=split, base_dir=path.parent)
    out = [{k: it[k] for k in ("image", "modality", "source") if k in it} for it in items]
    if modality is not None:
        out = [it for it in out if it.get("modality", "").upper() == modality.upper()]
    return out


def build_dataset(
    datalist_path: str | Path,
    split: str,
    transforms,
    cache: Literal["none", "memory", "disk"] = "none",
    cache_dir: str | Path | None = None,
    *,
    modality: str | None = None,
    num_workers: int = 1,
):
    """MONAI Dataset over one split (optionally one modality).

    ``cache="memory"`` (CacheDataset) and ``"disk"`` (PersistentDataset under ``cache_dir``) store the
    output of the deterministic prefix of ``transforms`` (load ... normalise/crop), so each epoch only
    pays for the random slicing/cropping.
    """
    data = load_datalist(datalist_path, split, modality)
    if not data:
        raise InputError(datalist_path, f"split {split!r} has no entries" + (f" of modality {modality}" if modality else ""))
    if cache == "none":
        return Dataset(data, transform=transforms)
    if cache == "memory":
        return CacheDataset(data, transform=transforms, cache_rate=1.0, num_workers=num_workers, progress=False)
    if cache == "disk":
        if cache_dir is None:
            raise ConfigError("cache='disk' needs cache_dir")
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        return PersistentDataset(data, transform=transforms, cache_dir=cache_dir)
    raise ConfigError(f"cache must be 'none', 'memory' or 'disk', got {cache!r}")
