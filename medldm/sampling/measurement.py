"""What a reconstruction starts from: a measurement y, the operator that produced it, and the geometry
of the image grid the answer lives on."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medldm.errors import ConfigError, InputError
from medldm.io.volume import Volume, reorient, to_ras
from medldm.physics.base import Operator


@dataclass
class Measurement:
    y: torch.Tensor  # operator-domain data, batch and channel dims first: (1, 1, ...)
    operator: Operator
    affine: np.ndarray  # affine of the OUTPUT image grid (RAS+ mm)
    modality: str
    meta: dict[str, Any] = field(default_factory=dict)
    # the input image's orientation (nibabel) when it was reoriented to RAS+ for the model (io.volume's rule);
    # None: the output grid is the input's own (RAS+ already, or a k-space / sinogram acquisition grid)
    orientation: np.ndarray | None = None

    @property
    def task(self) -> str:
        return self.operator.task

    def to_input_orientation(self, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """An array (..., X, Y, Z) on the output grid (``affine``) -> what the user gets, with its affine: the
        centre of ``meta["recon_matrix"]`` (k-space files whose header asks for one: fastMRI crops the
        oversampled readout), in the input image's orientation."""
        array, affine = np.asarray(array), self.affine
        keep = self.meta.get("recon_matrix")
        if keep is not None and any(c < n for c, n in zip(keep, array.shape[-3:-1])):
            start = [max(0, (n - c) // 2) for c, n in zip(keep, array.shape[-3:-1])]
            array = array[..., start[0]:start[0] + keep[0], start[1]:start[1] + keep[1], :]
            affine = affine.copy()
            affine[:3, 3] += affine[:3, :3] @ np.array([*start, 0.0])
        if self.orientation is None:
            return array, affine
        return reorient(array, affine, self.orientation)

    def naive_inverse(self) -> torch.Tensor:
        # Measured k-space holds a complex image: its zero-filled magnitude is the naive inverse, not the
        # real part of the adjoint (which is right for the real images medldm simulates).
        # measured k-space (from_kspace, any coil count) is a MultiCoilCartesian: |CG-SENSE|, maps carry the phase
        return self.operator.naive_inverse(self.y)


def coarsest_axis(volume: Volume) -> int:
    return int(np.argmax(volume.spacing))


MIN_AXIS = 2  # noise estimation and the networks need an image, not a line or a voxel


def from_image(volume: Volume, task: str, *, factor: int | None = None, axis: int | None = None, sigma: float | None = None,
               profile: str = "box") -> Measurement:
    """Build the measurement for image-domain inputs: a noisy image (denoise) or a thick-slice image (sr)."""
    from medldm.physics.noise import RicianNoise, rician_sigma_estimate
    from medldm.physics.resolution import ThickSlice, coarse_to_fine_affine

    if volume.spatial_dims != 3 or volume.array.shape[0] != 1:
        raise InputError(volume.meta.get("source"), f"expected a single-channel 3D volume, got shape {volume.array.shape}")
    volume, orientation = to_ras(volume)
    if sum(n >= MIN_AXIS for n in volume.spatial_shape) < 2:
        raise InputError(volume.meta.get("source"), f"a volume needs at least {MIN_AXIS} voxels along two of its "
                         f"axes (X, Y, Z), got shape {tuple(volume.spatial_shape)}")
    volume.check_finite()
    y = torch.as_tensor(np.ascontiguousarray(volume.array), dtype=torch.float32)[None]
    modality = volume.modality or "MR"
    if task == "denoise":
        meta = {}
        if modality == "MR":
            est = {"sigma": sigma, "method": "given"} if sigma is not None else rician_sigma_estimate(y[0, 0].numpy())
            op, meta["noise_estimate"] = RicianNoise(sigma=float(est["sigma"])), est
        else:  # a CT image: the sinogram is gone, the noise lives in the reconstructed image
            from medldm.physics.noise import ReconstructedImageNoise

            op = ReconstructedImageNoise(sigma=float(sigma or 0.0))
        return Measurement(y, op, volume.affine.copy(), modality, {"noise_sigma": op.sigma, **meta}, orientation)
    if task == "sr":
        axis = coarsest_axis(volume) if axis is None else axis
        if factor is None:  # thick slices: the factor that makes the slice axis as fine as the finest in-plane axis
            others = [s for i, s in enumerate(volume.spacing) if i != axis]
            factor = max(1, int(round(volume.spacing[axis] / min(others))))
        if factor < 1:
            raise InputError(volume.meta.get("source"), f"super-resolution factor must be an integer >= 1, got {factor}")
        if axis != 2:  # the models learnt axial thick slices of RAS+ volumes
            raise InputError(volume.meta.get("source"), "the thick slices must be axial (thickest along S once the "
                             f"volume is reoriented to RAS+); this input is thickest along {'RAS'[axis]}")
        op = ThickSlice(factor=int(factor), axis=axis, profile=profile)
        return Measurement(y, op, coarse_to_fine_affine(volume.affine, axis, int(factor)), modality, {"axis": axis},
                           orientation)
    raise InputError(volume.meta.get("source"), f"task {task!r} needs a k-space measurement, not an image: pass a k-space "
                     ".h5 (fastMRI or ISMRMRD) to `medldm reconstruct` or the Python API (serving takes images only)")


def from_kspace(kspace: np.ndarray, mask: np.ndarray | None, affine: np.ndarray | None = None, modality: str = "MR",
                source=None, map_fit_rounds: int | None = None) -> Measurement:
    """Measured k-space, fastMRI layout: single-coil [slices, H, W] or multi-coil [slices, coils, H, W] (H the
    readout, W the phase encode) -> a measurement on the (H, W, slices) image grid.

    The image of measured k-space is complex. Its phase and (multi-coil) the coil sensitivities are estimated
    slice by slice from the fully sampled centre lines (``medldm.physics.coils``) and folded into the
    operator's maps, so the networks see the magnitude and data consistency stays exact among real images. With
    coils, the maps are then fitted to every measured line ``map_fit_rounds`` times (default
    ``coils.MAP_FIT_ROUNDS``; 0: direct calibration alone)."""
    from medldm.physics.coils import (MAP_FIT_BASIS, MAP_FIT_ROUNDS, calibration_lines, estimate_volume_maps,
                                      refine_maps)
    from medldm.physics.sense import MultiCoilCartesian

    k = np.asarray(kspace)
    if k.ndim == 3:
        k = k[:, None]
    if k.ndim != 4 or not np.iscomplexobj(k):
        raise InputError(source, f"k-space must be complex [slices, H, W] or [slices, coils, H, W], got {k.dtype} "
                                 f"{tuple(np.shape(kspace))}")
    if min(k.shape) < 1:
        raise InputError(source, f"k-space is empty (a zero-length axis; coils >= 1 needed): shape {k.shape}")
    if not (np.isfinite(k.real).all() and np.isfinite(k.imag).all()):
        raise InputError(source, "k-space contains NaN/Inf values")
    if mask is None:  # sampled lines are the non-zero columns
        mask = np.abs(k).sum(axis=(0, 1, 2)) > 0
    mask = np.asarray(mask).astype(bool).reshape(-1)
    if mask.size != k.shape[-1] or not mask.any():
        raise InputError(source, f"mask of {mask.size} lines ({int(mask.sum())} sampled) does not fit k-space "
                                 f"width W={k.shape[-1]}")
    y = torch.from_numpy(np.ascontiguousarray(k.transpose(1, 2, 3, 0))).to(torch.complex64)[None]
    y = y * torch.as_tensor(mask, dtype=torch.float32)[:, None]  # (1, coils, H, W, slices)
    maps = torch.from_numpy(estimate_volume_maps(y[0].numpy(), mask, source))
    acs = calibration_lines(mask)
    recipe = {"coil_maps": "direct calibration" if k.shape[1] > 1 else "none (one coil)",
              "phase": "low-resolution image of the calibration lines", "calibration_lines": acs.stop - acs.start}

    # estimated maps: soft steps instead of projections (MultiCoilCartesian has the figures); CG on the soft step's
    # well-conditioned system (eigenvalues in [1, 2]) needs few iterations
    operator = functools.partial(MultiCoilCartesian, mask=mask, projection_weight=1.0, dc_iters=10)
    rounds = MAP_FIT_ROUNDS if map_fit_rounds is None else int(map_fit_rounds)
    if rounds < 0:
        raise ConfigError(f"map_fit_rounds must be >= 0, got {map_fit_rounds}")
    if k.shape[1] > 1 and rounds:  # one coil keeps its low-resolution phase (|S| = 1: no map to fit)
        maps = refine_maps(y, mask, maps, lambda m: operator(maps=m), rounds)
        recipe.update(coil_maps=f"direct calibration, then {rounds} round(s) fitted to the measured lines "
                                f"given a TV-POCS image ({MAP_FIT_BASIS}x{MAP_FIT_BASIS} coefficients per map)",
                      phase="folded into the fitted maps")
    op = operator(maps=maps, maps_recipe=recipe)
    meta = {"acceleration": float(mask.size / mask.sum()), "measured_kspace": True, "coils": int(k.shape[1]),
            "source": None if source is None else str(source)}
    return Measurement(y, op, np.eye(4) if affine is None else affine, modality, meta)


def as_measured(m: Measurement, map_fit_rounds: int | None = None) -> Measurement:
    """A simulated k-space measurement as a file of it would come: the coil maps and image phase the simulation
    knew are forgotten and estimated from the data (``from_kspace``); meta and orientation are kept."""
    op = m.operator
    y = m.y[0]  # (coils, H, W, slices)
    out = from_kspace(y.permute(3, 0, 1, 2).numpy(), op.mask_for((y.shape[2],)), m.affine, m.modality,
                      map_fit_rounds=map_fit_rounds)
    out.meta = {**m.meta, **{k: v for k, v in out.meta.items() if k != "source"}}
    out.orientation = m.orientation
    return out


def simulate(volume: Volume, task: str, seed: int, **random_kwargs) -> Measurement:
    """Research helper: degrade a clean volume with a randomly drawn operator (recorded in meta). Like every image
    input, the volume is degraded on its RAS+ grid; results and ``to_input_orientation`` go back to its own."""
    from medldm.physics.registry import build_random_operator
    from medldm.physics.resolution import fine_to_coarse_affine

    modality = volume.modality or "MR"
    volume, orientation = to_ras(volume)
    x = torch.as_tensor(np.ascontiguousarray(volume.array), dtype=torch.float32)[None]
    op = build_random_operator(task, modality, **random_kwargs).sample(seed, image=x)
    y = op.forward(x, generator=torch.Generator().manual_seed(seed))
    affine = volume.affine.copy()
    meta = {"simulated": op.params(), "seed": seed}
    if task == "sr":  # the thick-slice input lives on a coarse grid; the answer on the original fine grid
        meta["input_affine"] = fine_to_coarse_affine(affine, op.axis, op.factor)
    return Measurement(y, op, affine, modality, meta, orientation)


def from_sinogram(sinogram: np.ndarray, angles, *, pixel_mm: float = 1.0, slice_mm: float = 1.0,
                  image_size: tuple[int, int] | None = None, I0: float | None = None, source=None) -> Measurement:
    """Post-log parallel-beam sinogram [slices, views, detectors] -> a sparse-view CT measurement on the
    (X, Y, slices) grid (layout and conventions: ``medldm.io.sinogram_h5``)."""
    import math

    from medldm.physics.ct import SparseViewCT, n_detectors

    sino = np.asarray(sinogram, dtype=np.float32)
    if sino.ndim != 3:
        raise InputError(source, f"sinogram must be [slices, views, detectors], got shape {sino.shape}")
    d = sino.shape[2]
    op = SparseViewCT(angles=list(np.asarray(angles, dtype=np.float64)), pixel_mm=pixel_mm,
                      I0=math.inf if I0 is None else float(I0), image_shape=image_size)
    if image_size is None:
        shape = op.slice_shape_for(d)
    else:
        shape = tuple(int(s) for s in image_size)
        need = n_detectors(shape)
        if d > need or (need - d) % 2:
            raise InputError(source, f"{d} detector bins cannot be centred on a {shape} slice grid (its diagonal "
                                     f"needs {need}; a narrower row must differ by an even number)")
        pad = (need - d) // 2
        sino = np.pad(sino, ((0, 0), (0, 0), (pad, pad)))  # bins beyond the measured row see only air
    y_raw = torch.from_numpy(np.ascontiguousarray(sino)).permute(2, 1, 0)[None, None]  # (1, 1, D, V, S)
    y = y_raw - op.water_line_integrals(shape)[..., None]
    affine = np.diag([pixel_mm, pixel_mm, slice_mm, 1.0])
    return Measurement(y, op, affine, "CT", {"source": None if source is None else str(source), "views": op.views,
                                              "I0": I0})


def from_sinogram_file(path) -> Measurement:
    """A sinogram .h5 (layout: ``medldm.io.sinogram_h5``) -> its sparse-view CT measurement."""
    from medldm.io.sinogram_h5 import read_sinogram_h5, sinogram_geometry

    sino, angles, attrs = read_sinogram_h5(path)
    geo = sinogram_geometry(attrs, path)
    return from_sinogram(sino, angles, pixel_mm=geo["pixel_mm"], slice_mm=geo["slice_mm"],
                         image_size=geo["image_size"], I0=geo["I0"], source=path)


def from_kspace_file(path, map_fit_rounds: int | None = None) -> Measurement:
    """A k-space .h5 (fastMRI single- or multi-coil, or ISMRMRD raw data) -> its measurement on the (H, W, slices)
    grid and spacing the header gives; ``meta["recon_matrix"]``: the header's reconstruction size, if any.
    ``map_fit_rounds``: as :func:`from_kspace`'s."""
    from medldm.io.fastmri_h5 import kspace_spacing, read_kspace_h5, recon_matrix

    kspace, mask, attrs = read_kspace_h5(path)
    affine = np.diag([*kspace_spacing(attrs, str(path)), 1.0])
    keep, encoded = recon_matrix(attrs), kspace.shape[-2]
    cropped = keep is not None and 0 < keep[0] < encoded  # an oversampled readout: reconstruct only what is kept
    if cropped:
        kspace = crop_readout(kspace, keep[0])
        affine[:3, 3] += affine[:3, :3] @ np.array([(encoded - keep[0]) // 2, 0.0, 0.0])
    m = from_kspace(kspace, mask, affine, "MR", source=path, map_fit_rounds=map_fit_rounds)
    m.meta["recon_matrix"] = keep
    if cropped:
        m.meta["readout_cropped_from"] = int(encoded)
    return m


def crop_readout(kspace: np.ndarray, size: int) -> np.ndarray:
    """k-space [..., H, W] -> [..., size, W]: the central ``size`` rows of its image along the readout H, back in
    k-space. The readout is fully sampled, so this is exact, and data consistency decouples readout line by readout
    line: on the kept rows it solves what it would in the whole field of view, while the networks, the guide and
    the solvers cover only them. fastMRI's headers ask for it (brain: 640 encoded, 320 reconstructed); the rows
    dropped are those ``Measurement.to_input_orientation`` crops from an output (same start, (H - size) // 2)."""
    from medldm.physics.fft import fftnc, ifftnc

    start = (kspace.shape[-2] - size) // 2
    image = ifftnc(torch.from_numpy(np.ascontiguousarray(kspace)), (-2,))[..., start:start + size, :]
    return fftnc(image, (-2,)).numpy().astype(kspace.dtype, copy=False)


def from_h5_file(path) -> Measurement:
    """Either kind of .h5 measurement, told apart by its datasets."""
    from medldm.io.sinogram_h5 import is_sinogram_h5

    return from_sinogram_file(path) if is_sinogram_h5(path) else from_kspace_file(path)


def to_sinogram(m: Measurement) -> np.ndarray:
    """The post-log sinogram [slices, views, detectors] of a CT measurement (inverse of ``from_sinogram``)."""
    shape = m.operator.slice_shape_for(m.y.shape[2])
    y = m.y + m.operator.water_line_integrals(shape)[..., None]
    return y[0, 0].permute(2, 1, 0).numpy().astype(np.float32)


def from_ct_volume(volume: Volume, views: int, I0: float | None = None, seed: int = 0) -> Measurement:
    """Research: the sparse-view sinogram of a CT volume (HU), ``views`` evenly over 180 degrees, Poisson
    noise at ``I0`` photons per ray (None: noiseless); the answer lives on the volume's own grid."""
    import math

    from medldm.physics.ct import SparseViewCT

    if volume.spatial_dims != 3 or volume.array.shape[0] != 1:
        raise InputError(volume.meta.get("source"), f"expected a single-channel 3D volume, got shape {volume.array.shape}")
    if (volume.modality or "").upper() != "CT":
        raise InputError(volume.meta.get("source"), f"--views simulates CT projections; this volume is {volume.modality}")
    if int(views) < 1:
        raise InputError(volume.meta.get("source"), f"views must be >= 1, got {views}")
    volume.check_finite()
    volume, orientation = to_ras(volume)
    dx, dy = volume.spacing[:2]
    if abs(dx - dy) > 1e-3 * max(dx, dy):
        raise InputError(volume.meta.get("source"), f"in-plane spacing {dx:.3f} x {dy:.3f} mm: the projector needs square pixels")
    x = torch.as_tensor(np.ascontiguousarray(volume.array), dtype=torch.float32)[None]
    op = SparseViewCT(views=int(views), I0=math.inf if I0 is None else float(I0), pixel_mm=float(dx),
                      image_shape=volume.spatial_shape[:2], noise_seed=seed)
    y = op.forward(x, generator=torch.Generator().manual_seed(seed))
    return Measurement(y, op, volume.affine.copy(), "CT", {"source": volume.meta.get("source"), "simulated": op.params(),
                                                          "seed": seed}, orientation)
