"""Classical estimates the refiner can start from (``refiner_stage.guide``).

TV-POCS (recon: TV alternated with the operator's data consistency) and non-local means (denoise) are
also the evaluation's classical baselines. They know no anatomy, so they do not share the learned networks'
blind spots on anatomy the training data lacks.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import numpy as np
import torch
from joblib import Parallel, delayed
from skimage.restoration import denoise_tv_chambolle

from medldm.physics.registry import DC_TASKS
from medldm.slice_filters import nlm_images

TV_ITERATIONS = 30
TV_WEIGHT = 0.02  # relative to the image's 99.5th percentile (fixed, not tuned on validation data)


def tv_pocs(x0: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor], *, image_axes: tuple[int, int],
            iterations: int = TV_ITERATIONS, weight: float = TV_WEIGHT, scale: float | None = None) -> torch.Tensor:
    """Alternate 2D TV denoising (Chambolle) with the hard projection ``project`` onto the measurements.

    ``x0`` (B, 1, ...) real, usually the naive inverse; TV acts on the 2D images spanned by ``image_axes``
    (axes of ``x0``), separately for every index of the other axes. ``scale`` (default: the 99.5th
    percentile of ``x0``) sets the intensity the TV weight is relative to. Returns ``project`` of the
    last TV image: as consistent with the measurement as that projection makes it (exactly for k-space,
    a few gradient steps for CT)."""
    first, second = _axes(x0, image_axes)
    x = x0.detach().float().cpu()
    if scale is None:
        scale = float(np.percentile(x.numpy(), 99.5)) or 1.0
    for _ in range(iterations):
        a = x.movedim((first, second), (-2, -1))
        lead = a.shape[:-2]
        flat = a.reshape(-1, *a.shape[-2:]).numpy() / scale
        tv = tv_slices(flat, weight) * scale
        x = torch.as_tensor(tv, dtype=torch.float32).reshape(*lead, *a.shape[-2:]).movedim((-2, -1), (first, second))
        x = project(x).detach().float().cpu()
    return x


TV_WARM_INNER = 5  # Chambolle dual steps per round of tv_pocs_warm


def tv_pocs_warm(x0: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor], *, image_axes: tuple[int, int],
                 iterations: int = TV_ITERATIONS, inner: int = TV_WARM_INNER, weight: float = TV_WEIGHT,
                 scale: float | None = None) -> torch.Tensor:
    """TV-POCS whose Chambolle dual is carried from one round to the next, all images at once in torch.

    skimage restarts Chambolle's dual from zero every round and runs it until the energy settles (5-13 steps per
    round on a head's planes); the image changes little between rounds, so ``inner`` steps from the last round's
    dual reach a better TV image (benchmarks/README.md). Same arguments and contract as :func:`tv_pocs`."""
    first, second = _axes(x0, image_axes)
    x = x0.detach().float().cpu()
    if scale is None:
        scale = float(np.percentile(x.numpy(), 99.5)) or 1.0
    tau = 0.25  # 1 / (2 * ndim), skimage's step for 2D
    p = None
    for _ in range(iterations):
        a = x.movedim((first, second), (-2, -1)) / scale
        p = a.new_zeros((2, *a.shape)) if p is None else p
        for _ in range(inner):
            g = _gradient(a + _divergence(p))
            p = (p - tau * g) / (1 + (tau / weight) * g.pow(2).sum(0).sqrt())
        tv = (a + _divergence(p)) * scale
        x = project(tv.movedim((-2, -1), (first, second))).detach().float().cpu()
    return x


def _gradient(u: torch.Tensor) -> torch.Tensor:
    """Forward differences along the last two axes, zero at the far edge (skimage's Chambolle)."""
    g = u.new_zeros((2, *u.shape))
    g[0, ..., :-1, :] = u[..., 1:, :] - u[..., :-1, :]
    g[1, ..., :, :-1] = u[..., :, 1:] - u[..., :, :-1]
    return g


def _divergence(p: torch.Tensor) -> torch.Tensor:
    """skimage's d, minus the divergence: the adjoint of :func:`_gradient` on duals that are zero at the far edge
    (where the gradient is, so Chambolle's update keeps them zero)."""
    d = -p[0] - p[1]
    d[..., 1:, :] += p[0, ..., :-1, :]
    d[..., :, 1:] += p[1, ..., :, :-1]
    return d


PARALLEL_MIN_IMAGES = 32  # below this (training batches of patches), worker processes cost more than they save


def map_images(fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    """``fn`` of a stack of 2D images (N, H, W) -> (N, H, W), where ``fn`` treats each image on its own. A whole
    volume's slices are split over up to 8 of joblib's reusable worker processes (results identical): skimage
    runs one image after another in one numpy process and leaves the other cores idle (benchmarks/README.md).
    ``fn`` must come from a module that does not import torch (``medldm.slice_filters``, skimage): each worker
    imports it before its first task."""
    jobs = min(os.cpu_count() or 1, 8, images.shape[0] // (PARALLEL_MIN_IMAGES // 2))
    if images.shape[0] < PARALLEL_MIN_IMAGES or jobs < 2:
        return fn(images)
    return np.concatenate(Parallel(n_jobs=jobs)(delayed(fn)(part) for part in np.array_split(images, jobs)))


def tv_slices(images: np.ndarray, weight: float) -> np.ndarray:
    """skimage's Chambolle TV of each 2D image of ``images`` (N, H, W) (channel axis: one 2D TV per image).

    Constant images (the all-air planes a padded or registered volume has at its ends) are returned as they are,
    which equals what skimage returns for them (up to the sign of zeros): their gradient is zero, so the dual never
    moves. skimage would still spend its full 200 iterations on each (its stopping test compares energy changes
    with the first energy, which is zero): 80% of a whole padded head's TV time (benchmarks/README.md)."""
    tv = functools.partial(denoise_tv_chambolle, weight=weight, channel_axis=0)
    if images.dtype not in (np.float32, np.float64):  # skimage converts (and rescales) others
        return map_images(tv, images)
    flat = images.reshape(images.shape[0], -1)
    varying = np.flatnonzero(flat.max(axis=1) != flat.min(axis=1))
    out = images.copy()
    if varying.size:
        out[varying] = map_images(tv, images[varying])
    return out


def nlm_slices(x: torch.Tensor, sigma, *, image_axes: tuple[int, int]) -> torch.Tensor:
    """2D non-local means (skimage, fast mode) of every image spanned by ``image_axes`` of ``x`` (B, 1, ...),
    Rician bias removed (``slice_filters.rician_unbias``); ``sigma``: the noise level, one value or one per batch item (the
    patches of a training batch differ)."""
    first, second = _axes(x, image_axes)
    sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (x.shape[0],))
    a = x.detach().float().cpu().movedim((first, second), (-2, -1))
    out = np.empty(a.shape, dtype=np.float32)
    flat, flat_out = a.reshape(a.shape[0], -1, *a.shape[-2:]).numpy(), out.reshape(a.shape[0], -1, *a.shape[-2:])
    for b in range(flat.shape[0]):
        flat_out[b] = map_images(functools.partial(nlm_images, sigma=float(sig[b]) or 1e-6), flat[b])
    return torch.from_numpy(out).movedim((-2, -1), (first, second))


def _axes(x: torch.Tensor, image_axes: tuple[int, int]) -> tuple[int, int]:
    axes = [a % x.ndim for a in image_axes]
    if len(set(axes)) != 2 or min(axes) < 2:
        raise ValueError(f"image_axes {image_axes} must be two distinct spatial axes of a {x.ndim}-D (B, 1, ...) tensor")
    return axes[0], axes[1]


GUIDES = ("naive", "tv-pocs", "tv-pocs-warm", "nlm")


def guide_parts(kind: str) -> list[str]:
    """The classical images a guide is made of, one refiner input channel each: "naive+tv-pocs" is the naive
    inverse and TV-POCS (the refiner's correction is added to the first, see ``apply_refiner``)."""
    parts = kind.split("+")
    unknown = [p for p in parts if p not in GUIDES]
    if unknown or len(set(parts)) != len(parts):
        raise ValueError(f"unknown refiner guide {kind!r}: distinct parts joined by '+', each one of {', '.join(GUIDES)}")
    return parts


def guide_refusal(kind: str, task: str, modality: str) -> str | None:
    """Why a ``kind`` guide cannot serve a ``modality`` ``task`` model (None when it can): TV-POCS alternates
    with the projection onto a kept measurement; the NLM settings are those for Rician (MR) noise."""
    if "+" in kind:
        return next(filter(None, (guide_refusal(p, task, modality) for p in guide_parts(kind))), None)
    if kind in ("tv-pocs", "tv-pocs-warm") and task not in DC_TASKS:
        return f"{kind} projects onto the measurement, which only {' and '.join(DC_TASKS)} keep, not {modality} {task}"
    if kind == "nlm" and (task, modality) != ("denoise", "MR"):
        return f"nlm is set for Rician noise: MR denoise only, not {modality} {task}"
    return None


def guide_image(kind: str, naive: torch.Tensor, *, image_axes: tuple[int, int],
                project: Callable[[torch.Tensor], torch.Tensor] | None = None, sigma=None,
                scale: float | None = None) -> torch.Tensor:
    """The refiner's guide: the naive inverse itself, TV-POCS started from it (needs ``project``; "tv-pocs-warm":
    :func:`tv_pocs_warm`) or its
    non-local means (needs the noise ``sigma``); for a composite kind ("naive+tv-pocs") its parts stacked
    on the channel axis, in that order."""
    if "+" in kind:
        return torch.cat([guide_image(p, naive, image_axes=image_axes, project=project, sigma=sigma, scale=scale)
                          for p in guide_parts(kind)], 1)
    if kind == "naive":
        return naive
    if kind in ("tv-pocs", "tv-pocs-warm"):
        if project is None:
            raise ValueError("a TV-POCS guide needs the measurement's projection")
        solver = tv_pocs if kind == "tv-pocs" else tv_pocs_warm
        return solver(naive, project, image_axes=image_axes, scale=scale).to(naive)
    if kind == "nlm":
        if sigma is None:
            raise ValueError("a non-local-means guide needs the noise sigma")
        return nlm_slices(naive, sigma, image_axes=image_axes).to(naive)
    raise ValueError(f"unknown refiner guide {kind!r}; one of {', '.join(GUIDES)}")
