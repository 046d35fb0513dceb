"""MONAI dictionary pipeline and datasets that turn the prepared NIfTI datalist into normalised volumes.

Patches are not drawn here: medldm.training.data draws them from a generator seeded with (seed, step),
so a resumed run sees exactly the batches the killed run would have seen.

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


def load_datalist(datalist_path: str | Path, split: str, modality: str | None = None,
                  max_items: int | None = None, plane_axis: int | None = None,
                  sources: list[str] | None = None) -> list[dict]:
    """The first ``max_items`` entries of one split (of ``modality``, if given; entries that name no
    modality count as any), with image paths resolved against the datalist's folder. Only ``image``,
    ``modality`` and ``source`` are kept: extra bookkeeping keys differ between entries and would break
    batch collation.

    An entry with ``thick_axis: a`` (thick slices along index axis a) is kept only when ``plane_axis == a``:
    2D work on the planes normal to it; 3D work and other planes would see its blur as truth. ``sources``
    (if given) keeps only entries whose ``source`` is listed."""
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
        if "thick_axis" in entry and entry["thick_axis"] != plane_axis:
            continue
        if sources is not None and entry.get("source") not in sources:
            continue
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
    plane_axis: int | None = None,
    sources: list[str] | None = None,
):
    """MONAI Dataset over one split (optionally one modality, the first ``max_items`` entries).

    ``cache="memory"`` (CacheDataset) and ``"disk"`` (PersistentDataset under ``cache_dir``) store the
    output of the deterministic prefix of ``transforms`` (load ... normalise/crop), so each epoch only
    pays for the random slicing/cropping.
    """
    data = load_datalist(datalist_path, split, modality, max_items, plane_axis, sources)
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
