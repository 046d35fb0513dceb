"""Training batches from a Decathlon-style datalist: whole normalised volumes (medldm.data.transforms,
optionally cached in memory or on disk), then patches drawn by a generator seeded with (seed, step).

Drawing each step's patches from (seed, step) alone makes a resumed run see exactly the batches the
killed run would have seen, without saving loader state, and lets worker processes draw them ahead
(``data.num_workers``) without changing a single batch.
"""

from __future__ import annotations

import json
from itertools import count
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import SpatialPad
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from medldm.config import DataConfig
from medldm.data.transforms import build_dataset, build_eval_transforms

FOREGROUND = 0.05  # normalised intensity above which a voxel counts as foreground when choosing patch centres


def volume_dataset(cfg: DataConfig, split: str) -> Dataset:
    """Whole normalised volumes (``"image"``: (1, X, Y, Z) in RAS) of one split."""
    # The disk cache lives beside the data it was computed from, so it is shared by every run on that datalist.
    cache_dir = Path(cfg.datalist).parent / ".cache" / "persistent"
    return build_dataset(cfg.datalist, split, build_eval_transforms(cfg.modality), cache=cfg.cache, cache_dir=cache_dir,
                         modality=cfg.modality, max_items=cfg.max_volumes, num_workers=0,
                         plane_axis=cfg.slice_axis if cfg.spatial_dims == 2 else None,
                         sources=cfg.sources if split == "training" else None)


def slices_first(volume: torch.Tensor, axis: int) -> torch.Tensor:
    """(1, X, Y, Z) -> (S, 1, A, B): slices along ``axis``, the other two axes kept in index order."""
    return volume[0].movedim(axis, 0)[:, None]


def foreground_slices(volume: torch.Tensor, slice_axis: int) -> torch.Tensor:
    """Indices of the slices along ``slice_axis`` that hold any foreground."""
    return torch.nonzero(slices_first(volume, slice_axis).amax(dim=(1, 2, 3)) > FOREGROUND).flatten()


def _random_patch(volume: torch.Tensor, patch: list[int], rng: np.random.Generator, slice_axis: int = 2,
                  fg: torch.Tensor | None = None) -> torch.Tensor:
    """One patch (1, *patch) from a (1, X, Y, Z) volume; 2D patches are planes normal to ``slice_axis``.
    ``fg``: the volume's ``foreground_slices`` when already known (a whole-volume scan per patch costs as
    much as the rest of the patch drawing)."""
    dims = len(patch)
    if dims == 2:
        fg = foreground_slices(volume, slice_axis) if fg is None else fg
        volume = slices_first(volume, slice_axis)  # (S, 1, A, B)
        z = int(fg[rng.integers(len(fg))]) if len(fg) and rng.random() < 0.95 else int(rng.integers(volume.shape[0]))
        volume = volume[z]
    spatial = volume.shape[1:]
    volume = SpatialPad(patch)(volume) if any(s < p for s, p in zip(spatial, patch)) else volume
    spatial = volume.shape[1:]
    mask = volume[0] > FOREGROUND
    idx = torch.nonzero(mask)
    if len(idx) and rng.random() < 0.9:
        centre = idx[rng.integers(len(idx))].tolist()
        start = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, patch, spatial)]
    else:
        start = [int(rng.integers(0, s - p + 1)) for s, p in zip(spatial, patch)]
    sl = tuple(slice(s, s + p) for s, p in zip(start, patch))
    return volume[(slice(None),) + sl]


def flip_and_transpose(patch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """(1, *spatial): each spatial axis flipped with p = 1/2; square 2D patches also transposed with p = 1/2
    (the 8 symmetries of the square). Degradation comes after, so the physics stays what it was."""
    flips = [d + 1 for d in range(patch.ndim - 1) if rng.random() < 0.5]
    patch = patch.flip(flips) if flips else patch
    if patch.ndim == 3 and patch.shape[1] == patch.shape[2] and rng.random() < 0.5:
        patch = patch.transpose(1, 2)
    return patch.contiguous()


def source_probabilities(entries: list[dict], weights: dict[str, float]) -> np.ndarray | None:
    """Per-volume draw probabilities from per-source weights (unnamed sources weigh 1); ``None`` when all weigh
    the same, so runs without weights keep drawing exactly the batches they always drew."""
    w = np.array([float(weights.get(e.get("source", ""), 1.0)) for e in entries])
    return None if np.all(w == w[0]) else w / w.sum()


class PatchBatches:
    """The batch of training step ``s``, a pure function of (seed, s): (B, 1, *patch) normalised patches.

    A callable object rather than a generator so DataLoader workers can draw batches ahead of the
    training step (``step_stream``) and still produce exactly the batches a single process would.
    """

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.dataset = volume_dataset(cfg, "training")
        self.volumes = ([torch.as_tensor(self.dataset[i]["image"]) for i in range(len(self.dataset))]
                        if cfg.cache == "memory" else None)
        self.fgs = ([foreground_slices(v, cfg.slice_axis) for v in self.volumes]
                    if self.volumes is not None and cfg.spatial_dims == 2 else None)
        self.p = source_probabilities(self.dataset.data, cfg.source_weights)

    def __call__(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step])
        patches = []
        for _ in range(self.cfg.batch_size):
            i = int(rng.integers(len(self.dataset)) if self.p is None else rng.choice(len(self.dataset), p=self.p))
            vol = self.volumes[i] if self.volumes is not None else torch.as_tensor(self.dataset[i]["image"])
            patch = _random_patch(vol, self.cfg.patch_size, rng, self.cfg.slice_axis, self.fgs[i] if self.fgs else None)
            patches.append(flip_and_transpose(patch, rng) if self.cfg.augment else patch)
        return torch.stack(patches)


class _StepStream(IterableDataset):
    """Items of steps start, start + 1, ...: worker w of n makes steps start + w, start + w + n, ..., and a
    DataLoader hands out its workers' items round-robin, so the order is the step order for any n."""

    def __init__(self, make: Callable[[int], Any], start: int):
        self.make, self.start = make, start

    def __iter__(self):
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start + w
        while True:
            yield self.make(step)
            step += n


def step_stream(make: Callable[[int], Any], start_step: int = 0, num_workers: int = 0) -> Iterator:
    """Infinite iterator of make(start_step), make(start_step + 1), ...; with ``num_workers`` > 0 they are
    made in that many DataLoader worker processes ahead of use (the GPU profile: patch drawing and
    degradation on the CPU otherwise leave the GPU idle most of each step)."""
    if num_workers == 0:
        return (make(s) for s in count(start_step))
    loader = DataLoader(_StepStream(make, start_step), batch_size=None, num_workers=num_workers, prefetch_factor=4)
    return iter(loader)


def train_batches(cfg: DataConfig, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
    """Infinite iterator of (B, 1, *patch) float tensors in normalised units."""
    return step_stream(PatchBatches(cfg, seed), start_step, cfg.num_workers)


def validation_images(cfg: DataConfig, max_images: int = 6) -> list[torch.Tensor]:
    """Held-out images (1, 1, *size): 2D = evenly spaced axial slices cropped/padded to a multiple of 16
    around the centre; 3D = centre patches."""
    ds = volume_dataset(cfg.model_copy(update={"cache": "none"}), "validation")
    images = []
    for i in range(len(ds)):
        vol = torch.as_tensor(ds[i]["image"])
        if cfg.spatial_dims == 2:
            planes = slices_first(vol, cfg.slice_axis)
            zs = np.linspace(planes.shape[0] * 0.3, planes.shape[0] * 0.7, max(1, max_images // len(ds))).astype(int)
            for z in zs:
                sl = planes[int(z)]
                size = [max(p, (s // 16) * 16) for s, p in zip(sl.shape[1:], cfg.patch_size)]
                images.append(_centre(sl, size)[None])
        else:
            images.append(_centre(vol, cfg.patch_size)[None])
    return images[:max_images]


def _centre(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    x = SpatialPad(size)(x) if any(s < p for s, p in zip(x.shape[1:], size)) else x
    start = [(s - p) // 2 for s, p in zip(x.shape[1:], size)]
    return x[(slice(None),) + tuple(slice(a, a + p) for a, p in zip(start, size))]


DATA_CARDS = {"mni152": "mni152", "synthetic": "synthetic_subjects", "invesalius_head_ct": "head_ct_invesalius",
              "itk_t1": "itk_t1_validation"}


def data_card_ids(datalist: str | Path, modality: str) -> str:
    """The data cards (data_cards/<id>.md) behind a datalist's entries of one modality, for run tags."""
    try:
        data = json.loads(Path(datalist).read_text())
    except (OSError, ValueError):
        return "unknown"
    sources = {e.get("source", "unknown") for k in ("training", "validation") for e in data.get(k, [])
               if e.get("modality", modality).upper() == modality.upper()}
    return ",".join(sorted(DATA_CARDS.get(s, s) for s in sources))
