"""MONAI dictionary pipelines that turn the prepared NIfTI datalist into volumes and training patches.

Intensity normalisation is :class:`medldm.models.normalisation.Normalisation`, the object saved with every
model, so data seen in training is mapped exactly as the Reconstructor maps its input at inference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from monai import transforms as mt
from monai.config import KeysCollection
from monai.data import CacheDataset, Dataset, PersistentDataset, load_decathlon_datalist
from monai.data.utils import pickle_hashing

from medldm.errors import ConfigError, InputError
from medldm.models.normalisation import Normalisation

# Normalised value above which a voxel counts as foreground for cropping and slice picking: far above the
# background of MR (0) and CT air (0), below every tissue.
FOREGROUND_FLOOR = 0.02


def normalisation_for(modality: str) -> Normalisation:
    # Normalisation.for_modality maps anything that is not CT to MR; a typo must not silently do that here.
    if modality.upper() not in ("MR", "CT"):
        raise ConfigError(f"modality must be 'MR' or 'CT', got {modality!r}")
    return Normalisation.for_modality(modality)


class NormaliseIntensityd(mt.MapTransform):
    """Apply a :class:`Normalisation`, fitted per volume when it is a percentile one; store the fitted
    parameters under ``"<key>_norm"`` so the mapping back to scanner units travels with the sample."""

    def __init__(self, keys: KeysCollection, normalisation: Normalisation, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.normalisation = normalisation

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            fitted = self.normalisation.fit(d[key])
            out = fitted.forward(d[key])
            d[key] = out.to(torch.float32) if isinstance(out, torch.Tensor) else np.asarray(out, dtype=np.float32)
            norm = fitted.to_dict()
            # Window kind has no scale; a None would break torch's default collate.
            if fitted.scale is not None:
                norm["scale"] = fitted.scale
            d[f"{key}_norm"] = norm
        return d


def mr_normalise(keys: KeysCollection = "image", percentile: float = 99.5):
    """Per-volume division by the ``percentile``-th percentile (scale only, so k-space scales linearly)."""
    return NormaliseIntensityd(keys, Normalisation(kind="percentile", percentile=percentile))


def ct_normalise(keys: KeysCollection = "image", low: float = -1024.0, high: float = 2000.0):
    """Fixed HU window ``low``..``high`` -> 0..1, the same mapping for every volume."""
    return NormaliseIntensityd(keys, Normalisation(kind="window", low=low, high=high))


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
    norm = normalisation or normalisation_for(modality)
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
    steps.append(NormaliseIntensityd(key, normalisation or normalisation_for(modality)))
    return mt.Compose(steps)


def load_datalist(datalist_path: str | Path, split: str, modality: str | None = None,
                  max_items: int | None = None) -> list[dict]:
    """The first ``max_items`` entries of one split (of ``modality``, if given; entries that name no
    modality count as any), with image paths resolved against the datalist's folder. Only ``image``,
    ``modality`` and ``source`` are kept: extra bookkeeping keys differ between entries and would break
    batch collation."""
    path = Path(datalist_path)
    if not path.is_file():
        raise InputError(path, "datalist not found; create it with `medldm data prepare`")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(path, f"datalist is not valid JSON: {e}") from e
    if split not in raw:
        raise InputError(path, f"datalist has no split {split!r} (has {sorted(raw)})")
    items = load_decathlon_datalist(path, is_segmentation=False, data_list_key=split, base_dir=path.parent)
    # MONAI also rewrites any other value that names an existing path: "CT" next to a ct/ folder on a
    # case-insensitive filesystem would become a path, so only its resolved image is taken.
    out = []
    for it, entry in zip(items, raw[split]):
        entry = entry if isinstance(entry, dict) else {}  # a "test" split may list bare paths
        out.append({"image": it["image"], **{k: entry[k] for k in ("modality", "source") if k in entry}})
    if modality is not None:
        out = [it for it in out if it.get("modality", modality).upper() == modality.upper()]
    if not out:
        raise InputError(path, f"split {split!r} has no entries" + (f" of modality {modality}" if modality else ""))
    return out[:max_items] if max_items else out


def build_dataset(
    datalist_path: str | Path,
    split: str,
    transforms,
    cache: Literal["none", "memory", "disk"] = "none",
    cache_dir: str | Path | None = None,
    *,
    modality: str | None = None,
    max_items: int | None = None,
    num_workers: int = 1,
):
    """MONAI Dataset over one split (optionally one modality, the first ``max_items`` entries).

    ``cache="memory"`` (CacheDataset) and ``"disk"`` (PersistentDataset under ``cache_dir``) store the
    output of the deterministic prefix of ``transforms`` (load ... normalise/crop), so each epoch only
    pays for the random slicing/cropping.
    """
    data = load_datalist(datalist_path, split, modality, max_items)
    if cache == "none":
        return Dataset(data, transform=transforms)
    if cache == "memory":
        return CacheDataset(data, transform=transforms, cache_rate=1.0, num_workers=num_workers, progress=False)
    if cache == "disk":
        if cache_dir is None:
            raise ConfigError("cache='disk' needs cache_dir")
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        # Cache files are keyed by the entry; hashing the deterministic transforms too keeps pipelines that
        # share a cache_dir (train vs eval, other spacing or normalisation) from reading each other's volumes.
        return PersistentDataset(data, transform=transforms, cache_dir=cache_dir, hash_transform=pickle_hashing)
    raise ConfigError(f"cache must be 'none', 'memory' or 'disk', got {cache!r}")
