"""The Python API: ``Reconstructor.load(name_or_uri)(volume_or_path, ...) -> ReconstructionResult``.

Pipeline for one volume: naive inverse -> normalise -> 2D slices along the model's slice axis ->
latent sampling (optional DC every M steps) -> decode -> pixel refiner -> back to physical units ->
final hard data consistency -> mean / std over K samples.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nibabel.orientations import ornt2axcodes

from medldm import __version__
from medldm.errors import InputError, ModelError
from medldm.io.volume import Volume
from medldm.models.bundle import ModelBundle, load_bundle
from medldm.models.device import autocast, pick_device
from medldm.physics.base import NONNEGATIVE_ROUNDS
from medldm.models.runtime import Networks, check_runtime, convert_networks, openvino_plan, torch_networks
from medldm.models.upsample import fold_nearest_upsampling
from medldm.physics.classical import guide_image, guide_parts, guide_refusal
from medldm.physics.registry import DC_TASKS
from medldm.sampling import measurement as meas
from medldm.sampling.slicewise import pad_to_multiple, restore_slices, varying_slices
from medldm.sampling.volumetric import restore_volume

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "shipped"
# the shipped default models and their modality, in the order the pipelines train and the README lists them
DEFAULT_MODELS = {"mr-recon": "MR", "mr-denoise": "MR", "mr-sr": "MR", "ct-denoise": "CT", "ct-recon": "CT", "ct-sr": "CT"}


@dataclass
class ReconstructionResult:
    """What one reconstruction returns.

    ``volume``: the mean over samples, physical units (MR signal, CT HU), on the output grid (finer for SR).
    ``uncertainty``: per-voxel standard deviation over the samples (None for ``samples=1``).
    ``residual``: relative data residual ||A x - y|| / ||y|| for recon/sr (None for denoising).
    ``timings``: seconds per stage. ``provenance``: model, parameters, operator, input hash (JSON-ready).
    ``samples``: every sample (K, X, Y, Z) when ``keep_samples=True``. ``extras["naive_inverse"]``: the input's
    naive inverse (zero-filled, FBP, cubic upsampling, or the noisy image) on the output grid."""

    volume: Volume
    uncertainty: Volume | None
    residual: float | None
    timings: dict[str, float]
    provenance: dict[str, Any]
    samples: np.ndarray | None = None  # (K, X, Y, Z) physical units, when keep_samples=True
    extras: dict[str, Any] = field(default_factory=dict)


def shipped_models() -> list[str]:
    return sorted(p.name for p in SHIPPED_DIR.glob("*") if (p / "model.json").is_file())


def resolve_model(name_or_uri: str | Path) -> tuple[Path, dict]:
    """A shipped name, a local folder, or an MLflow URI (models:/..., runs:/...) -> local folder."""
    s = str(name_or_uri)
    if s.startswith(("models:/", "runs:/")):
        from medldm.tracking.download import download_model  # imports mlflow: only for URIs

        return download_model(s)
    if "/" not in s and "\\" not in s and (SHIPPED_DIR / s / "model.json").is_file():
        return SHIPPED_DIR / s, {"source": "shipped", "name": s}
    p = Path(s)
    if (p / "model.json").is_file():
        return p, {"source": "folder", "path": str(p.resolve())}
    raise ModelError(f"{s!r} is not a shipped model ({', '.join(shipped_models()) or 'none installed'}), "
                     "a model folder, or an MLflow URI (models:/NAME@alias, runs:/ID/path)")


class Reconstructor:
    """A trained model ready to reconstruct: ``Reconstructor.load("mr-recon")(data, steps=10, samples=4)``.

    ``device`` defaults to CUDA when available (then ``amp`` runs the networks in bfloat16), else the CPU.
    ``runtime`` runs a 2D model's networks: "auto", "torch", "openvino" or "openvino-bf16"
    (``medldm.models.runtime``: OpenVINO on the CPU for volumes that pay for converting, in bfloat16 where the CPU
    has bfloat16 instructions)."""

    def __init__(self, bundle: ModelBundle, device: str | torch.device | None = None, origin: dict | None = None,
                 amp: bool = True, runtime: str = "auto"):
        if bundle.unet is None:
            raise ModelError(f"{bundle.path}: a VAE-only model cannot reconstruct; train an LDM on it")
        self.device = pick_device(device)
        self.bundle = bundle.to(self.device).eval()
        for net in (bundle.vae, bundle.unet):
            # nearest x2 + 3x3 conv computed at the low resolution: the same output (within 6e-6), VAE decode
            # 1.16x and U-Net 1.03x on this CPU (benchmarks/network_backends.py, channels_last+folded)
            fold_nearest_upsampling(net)
        if self.device.type == "cpu" and bundle.spatial_dims == 2:
            # channels_last: 1.04x (U-Net) to 1.43x (VAE encoder) per call on CPU, outputs within 1e-4
            # (benchmarks/network_backends.py); not measured on CUDA, so left as it is there
            for net in (bundle.vae, bundle.unet, bundle.refiner):
                if net is not None:
                    net.to(memory_format=torch.channels_last)
        self.config = bundle.config  # the model.json, validated once when the folder was loaded
        check_runtime(runtime, self.device)
        self.runtime = runtime
        self._converted: dict[tuple[str, str], Networks] = {}  # OpenVINO conversions, made at the first call wanting them
        self.origin = origin or {}
        self.amp = amp  # bfloat16 autocast for the networks on CUDA; CPU always runs float32

    @classmethod
    def load(cls, name_or_uri: str | Path, device: str | None = None, runtime: str = "auto") -> "Reconstructor":
        """A shipped name (``mr-recon``, ``mr-denoise``, ``mr-sr``, ``ct-denoise``, ``ct-recon``, ``ct-sr``), a model
        folder, or an MLflow URI (``models:/NAME@alias``, ``runs:/ID/model``; downloaded once and cached)."""
        folder, origin = resolve_model(name_or_uri)
        return cls(load_bundle(folder), device=device, origin=origin, runtime=runtime)

    @property
    def task(self) -> str:
        return self.config.task

    @property
    def slice_axis(self) -> int:
        return self.config.slice_axis

    def measurement_for(self, data, factor: int | None = None, sigma: float | None = None,
                        views: int | None = None, dose: float | None = None) -> meas.Measurement:
        """What ``data`` measured: Measurements pass through; .h5 files are fastMRI k-space or CT sinograms;
        images are noisy (denoise) or thick-slice (sr) inputs, or, with ``views``, CT volumes whose
        sparse-view sinogram is simulated (research; ``dose`` photons per ray, None noiseless)."""
        if isinstance(data, meas.Measurement):
            return data
        if isinstance(data, (str, Path)) and Path(data).suffix.lower() in (".h5", ".hdf5"):
            return meas.from_h5_file(data)  # the measurement itself, not its zero-filled image
        if isinstance(data, (str, Path)):
            from medldm.io import read_volume

            data = read_volume(data, modality=self.config.modality)
        if isinstance(data, Volume):
            if views is not None:
                return meas.from_ct_volume(data, views, I0=dose)
            return meas.from_image(data, self.task, factor=factor, sigma=sigma)
        raise InputError(None, f"cannot reconstruct from a {type(data).__name__}; pass a Volume, a path or a Measurement")

    def __call__(self, data, *, steps: int | None = None, samples: int = 1, seed: int = 0, factor: int | None = None,
                 sigma: float | None = None, views: int | None = None, dose: float | None = None, dc: bool = True, dc_weight: float | None = None, latent_dc_every: int = 0,
                 latent_opt_steps: int = 0, refine: bool = True,
                 use_diffusion: bool | None = None, eta: float = 0.0, batch_size: int = 16, keep_samples: bool = False,
                 progress: bool = False, nonnegative: bool | None = None) -> ReconstructionResult:
        """Reconstruct one volume.

        ``data``: a :class:`~medldm.io.volume.Volume`, a path (NIfTI, DICOM folder or file, fastMRI k-space .h5,
        CT sinogram .h5) or a :class:`~medldm.sampling.measurement.Measurement` (e.g. from ``simulate``).

        Sampling: ``steps`` sampler steps (default: the model's ``default_steps``, the fewest that measured as well
        as more; its card gives the figures); ``samples`` independent samples (2 or more give the uncertainty
        map); ``seed`` makes the output reproducible; ``eta`` is DDIM's stochasticity (0 = deterministic
        DDIM; flow models ignore it); ``use_diffusion=False`` skips sampling and decodes the encoded input (or
        the model's start image): the ablation the model cards report; ``None`` (default) samples when
        ``samples >= 2`` and otherwise follows the model's ``default_use_diffusion`` (False where its card
        measured the decoded input as good as a sample, at less time); ``refine`` runs the pixel refiner.

        What the input measured, for image inputs:
        ``sigma`` (denoise): noise standard deviation in the image's units; MR defaults to an estimate from the
        image (Rician, ``estimate_rician_sigma``), CT to 0 (no soft data consistency).
        ``factor`` (sr): slice-thickness factor along Z; defaults to round(slice spacing / finest in-plane
        spacing), e.g. 5 mm slices at 1 mm in-plane give 5.
        ``views`` (recon of a CT *image*): simulate a sparse-view sinogram with this many views (research);
        ``dose``: photons per ray for its Poisson noise (None: noiseless). k-space and sinogram files carry
        their own mask / views.

        Data consistency: ``dc`` projects the output onto the measurement at the end (hard, or soft with
        ``dc_weight`` when y is noisy); ``latent_dc_every`` / ``latent_opt_steps`` also correct during sampling
        (2D models). ``nonnegative`` (default: MR, whose images are magnitudes; CT keeps HU) alternates that
        projection with x >= 0 and ends non-negative (``Operator.consistent_nonnegative``; the residual is then
        ~1e-3 instead of 1e-7); False keeps the exact projection. ``batch_size`` slices per network call;
        ``progress`` shows a bar; ``keep_samples`` returns every sample. 2D models pass constant planes (the air
        of a padded or registered volume) through without their networks (provenance ``constant_planes_passed_through``).
        """
        steps = self.config.default_steps if steps is None else steps
        if samples < 1 or steps < 1:
            raise ValueError("samples and steps must be >= 1")
        if use_diffusion is None:
            use_diffusion = samples > 1 or self.config.default_use_diffusion
        t0 = time.time()
        m = self.measurement_for(data, factor=factor, sigma=sigma, views=views, dose=dose)
        if m.task != self.task:
            raise ModelError(f"model {self.config.name} does {self.task}, the input is a {m.task} measurement")
        cond_phys = m.naive_inverse().float()  # (1, 1, X, Y, Z) on the output grid
        norm = self.config.normalisation.unfitted().fit(cond_phys)
        cond = norm.forward(cond_phys)
        axis = self.slice_axis
        slices = cond[0, 0].movedim(axis, 0)[:, None]  # (S, 1, A, B)
        guide, start, intensity = self._guides(m, cond, norm, axis, refine=refine)
        t_prep = time.time()
        latent_dc, data_loss = self._slice_corrections(m, norm, axis)
        bar = None
        # the planes the networks run on: 2D models pass constant ones (air) through as they are
        run = varying_slices(slices, guide, start) if self.bundle.spatial_dims == 2 else torch.arange(slices.shape[0])
        planes = len(run)
        if progress:
            from tqdm.auto import tqdm

            n_batches = -(-planes // batch_size) * samples
            bar = tqdm(total=n_batches * steps if use_diffusion else n_batches, desc="sampling", mininterval=1.0)
        nets = self._networks(slices, planes, samples, refine)
        try:
            with autocast(self.device, self.amp):
                vols_n = self._sample(m, cond, slices, axis, steps=steps, samples=samples, seed=seed, eta=eta,
                                      refine=refine, use_diffusion=use_diffusion, batch_size=batch_size, dc=dc,
                                      latent_dc_every=latent_dc_every, latent_opt_steps=latent_opt_steps,
                                      latent_dc=latent_dc, data_loss=data_loss, bar=bar, guide=guide, start=start,
                                      networks=nets, intensity=intensity, run=run)
        finally:
            nets.release_memory()  # before the final data consistency, whose peak would otherwise add to them
        if bar:
            bar.close()
        t_sample = time.time()
        vols = norm.inverse(vols_n.float())  # (K, X, Y, Z) physical units
        nonnegative = (m.modality == "MR") if nonnegative is None else bool(nonnegative)
        return self._finish(m, vols, samples, dc, dc_weight, cond_phys, t0, t_prep, t_sample, steps=steps, seed=seed,
                            nonnegative=nonnegative,
                            latent_dc_every=latent_dc_every, latent_opt_steps=latent_opt_steps, refine=refine,
                            use_diffusion=use_diffusion, eta=eta, keep_samples=keep_samples,
                            runtimes=(nets.latent_runtime, nets.refiner_runtime if refine else None),
                            intensity=intensity,
                            constant=slices.shape[0] - planes)

    def _networks(self, slices: torch.Tensor, planes: int, samples: int, refine: bool) -> Networks:
        """What runs the networks: the modules themselves, or their OpenVINO conversions where ``runtime`` asks for
        them and, for "auto", the volume pays for converting (each made at its first call, once per plan: a
        network this call does not use is never converted)."""
        bundle = self.bundle
        if bundle.spatial_dims != 2:
            if self.runtime.startswith("openvino"):
                raise ModelError(f"the {self.runtime} runtime runs 2D models; this one is 3D: use auto or torch")
            return torch_networks(bundle)
        plane = math.prod(pad_to_multiple(slices[:1])[0].shape[-2:])
        cascades = bundle.refiner_cascades if refine and bundle.refiner is not None else 1
        plan = openvino_plan(self.runtime, self.device, planes * plane * samples * cascades)
        if plan is None:
            return torch_networks(bundle)
        if plan not in self._converted:
            in_channels = 1 + len(guide_parts(bundle.refiner_guide))
            self._converted[plan] = convert_networks(bundle, in_channels, *plan,
                                                     strict=self.runtime.startswith("openvino"))
        return self._converted[plan]

    @staticmethod
    def _slice_corrections(m, norm, axis):
        """Data consistency (``latent_dc``) and the data loss (``data_loss``) on a batch of normalised slices
        ``idx`` along ``axis``: what latent DC, latent optimisation and the refiner's cascade apply mid-sampling."""
        op, y = m.operator, m.y

        def latent_dc(x_slices, idx):
            sub_y = y.index_select(2 + axis, idx.to(y.device)) if m.task != "sr" or axis != op.axis else None
            x_vol = norm.inverse(x_slices.cpu()[:, 0].movedim(0, axis))[None, None]
            if sub_y is None:
                raise ModelError("latent DC along the degraded axis is not slice-separable")
            x_vol = op.select(axis, idx).data_consistency(x_vol, sub_y)
            return norm.forward(x_vol[0, 0].movedim(axis, 0)[:, None]).to(x_slices)

        def data_loss(x_slices, idx):
            """||A x - y||^2 / ||y||^2 on the slices idx (differentiable), in physical units."""
            if m.task == "sr" and axis == op.axis:
                raise ModelError("latent optimisation along the degraded axis is not slice-separable")
            sub_y = y.index_select(2 + axis, idx.to(y.device))
            x_vol = norm.inverse(x_slices[:, 0].movedim(0, axis))[None, None].cpu()
            r = op.select(axis, idx).A(x_vol) - sub_y
            return (r.abs() ** 2).sum() / (sub_y.abs() ** 2).sum().clamp_min(1e-12)

        return latent_dc, data_loss

    def _guides(self, m, cond, norm, axis, refine: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        """The refiner's guide slices (S, G, A, B) when it is not the naive inverse itself, the slices
        (S, 1, A, B) a flow model starts from, both normalised by ``norm``, and the latent path's intensity; each
        classical image is computed once. The VAE decodes at the intensity it was trained at (clean volumes at their
        percentile): with latent_fit_on "guide" the latent path sees the input at the clean estimate's percentile
        (the reference guide's, in ``norm``'s units) and its decode is scaled back; else 1."""
        refiner_kind = self.bundle.refiner_guide if refine and self.bundle.refiner is not None else "naive"
        start_kind = self.bundle.flow_start
        reference_kind = (self.config.normalisation_reference if self.config.normalisation.latent_fit_on == "guide"
                          else None)
        parts = [] if refiner_kind == "naive" else refiner_kind.split("+")
        for kind in (start_kind, reference_kind):
            if kind not in ("noise", "naive", None) and kind not in parts:
                parts.append(kind)
        if not parts:
            return None, (cond[0, 0].movedim(axis, 0)[:, None] if start_kind == "naive" else None), 1.0
        kind = "+".join(parts)
        op, y = m.operator, m.y
        sigma = getattr(op, "sigma", None)
        why = guide_refusal(kind, m.task, m.modality)
        if why or self.bundle.spatial_dims != 2:  # the stages that make guided models are 2D-only
            raise ModelError(f"this model starts from or refines with a {kind} guide: {why or 'a 2D model only'}")
        vol = guide_image(kind, cond, image_axes=tuple(2 + a for a in range(3) if a != axis), scale=1.0,
                          project=lambda x: norm.forward(op.data_consistency(norm.inverse(x), y)),
                          sigma=None if sigma is None else float(sigma) * norm.linear_scale)
        images = vol[0].movedim(axis + 1, 0)  # (G, X, Y, Z) -> slices along axis, the G images as channels
        by_kind = dict(zip(parts, images.split(1, dim=1)))
        by_kind.setdefault("naive", cond[0, 0].movedim(axis, 0)[:, None])
        guide = None if refiner_kind == "naive" else torch.cat([by_kind[p] for p in refiner_kind.split("+")], 1)
        intensity = 1.0 if reference_kind is None else norm.fit(by_kind[reference_kind]).scale
        return guide, (None if start_kind == "noise" else by_kind[start_kind]), intensity

    def _sample(self, m, cond, slices, axis, *, steps, samples, seed, eta, refine, use_diffusion, batch_size, dc,
                latent_dc_every, latent_opt_steps, latent_dc, data_loss, bar, guide=None, start=None,
                networks=None, intensity=1.0, run=None) -> torch.Tensor:
        """Normalised (K, X, Y, Z) outputs of the 2D (slice-wise, networks on the slices ``run``) or 3D
        (sliding-window) path."""
        if self.bundle.spatial_dims == 3:
            if latent_dc_every or latent_opt_steps:
                raise ModelError("latent DC and latent optimisation are implemented for 2D models only")
            out = restore_volume(self.bundle, cond, samples=samples, steps=steps, seed=seed, eta=eta, refine=refine,
                                 use_diffusion=use_diffusion, progress=bar.update if bar else None)
            return out["output"][:, 0]  # (K, X, Y, Z)
        with torch.no_grad():
            out = restore_slices(
                self.bundle, slices, samples=samples, steps=steps, seed=seed, batch_size=batch_size,
                eta=eta, refine=refine, use_diffusion=use_diffusion,
                correct=latent_dc if (dc and latent_dc_every > 0 and m.task in DC_TASKS) else None,
                correct_every=latent_dc_every,
                data_loss=data_loss if m.task in DC_TASKS and latent_opt_steps > 0 else None,
                latent_opt_steps=latent_opt_steps, refine_dc=latent_dc if m.task in DC_TASKS else None,
                guide=guide, start=start, networks=networks, intensity=intensity, run_slices=run,
                progress=bar.update if bar else None)
        return out["output"][:, :, 0].movedim(1, 1 + axis)  # (K, S, A, B) -> (K, X, Y, Z)

    def _finish(self, m, vols, samples, dc, dc_weight, cond_phys, t0, t_prep, t_sample, *, steps, seed, latent_dc_every,
                latent_opt_steps, refine, use_diffusion, eta, keep_samples, nonnegative,
                runtimes=("torch", None), intensity=1.0, constant=0) -> ReconstructionResult:
        """Final data consistency (and non-negativity), mean/std over samples, geometry and provenance."""
        op, y = m.operator, m.y
        with_dc = dc and m.task in DC_TASKS
        rounds = (NONNEGATIVE_ROUNDS if with_dc else 0) if nonnegative else None
        if nonnegative:  # DC and x >= 0 alternate, x >= 0 last (without DC: clipped once)
            vols = torch.cat([op.consistent_nonnegative(v[None, None], y, weight=dc_weight, rounds=rounds)[0]
                              for v in vols])
        elif with_dc:
            # DC comes last, after the refiner, so nothing undoes it; soft (dc_weight) when y is noisy
            vols = torch.cat([op.data_consistency(v[None, None], y, weight=dc_weight)[0] for v in vols])
        t_dc = time.time()
        mean = vols.mean(0)
        std = vols.std(0, unbiased=True) if samples > 1 else None
        residual = op.residual(mean[None, None], y) if m.task in DC_TASKS else None
        modality = m.modality
        # back to the input's orientation (io.volume's rule: the model ran on the RAS+ grid)
        mean_np, affine = m.to_input_orientation(mean[None].numpy().astype(np.float32))
        out_vol = Volume(mean_np, affine, modality, {"source": m.meta.get("source"), "task": m.task})
        unc = (Volume(m.to_input_orientation(std[None].numpy().astype(np.float32))[0], affine, modality, {"kind": "std"})
               if std is not None else None)
        timings = {"prepare": t_prep - t0, "sample": t_sample - t_prep, "data_consistency": t_dc - t_sample,
                   "total": time.time() - t0}
        prov = {
            "medldm_version": __version__, "model": {**self.origin, "name": self.config.name,
                                                      "format": self.config.format,
                                                      "mlflow_run_id": self.bundle.record.training.get("mlflow_run_id")},
            "task": m.task, "modality": modality,
            "parameters": {"steps": steps, "samples": samples, "seed": seed, "dc": dc, "dc_weight": dc_weight,
                           "nonnegative_rounds": rounds,
                           "latent_dc_every": latent_dc_every, "latent_opt_steps": latent_opt_steps,
                           "refine": refine, "use_diffusion": use_diffusion, "eta": eta,
                           "refiner_guide": self.bundle.refiner_guide if refine else None},
            "operator": op.params(), "input_sha256": _hash_tensor(y), "device": str(self.device),
            "latent_runtime": runtimes[0], "refiner_runtime": runtimes[1],
            "constant_planes_passed_through": constant,  # all-air planes: their constant input, no network run
            "latent_intensity": {"fit_on": self.config.normalisation.latent_fit_on, "factor": intensity,
                                 "reference": self.config.normalisation_reference
                                 if self.config.normalisation.latent_fit_on == "guide" else None},
            **({"noise_estimate": m.meta["noise_estimate"]} if "noise_estimate" in m.meta else {}),
            **({"readout_cropped_from": m.meta["readout_cropped_from"]} if "readout_cropped_from" in m.meta else {}),
            **({"reoriented_from": "".join(ornt2axcodes(m.orientation))} if m.orientation is not None else {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return ReconstructionResult(out_vol, unc, residual, timings, prov,
                                    samples=m.to_input_orientation(vols.numpy())[0] if keep_samples else None,
                                    extras={"naive_inverse": m.to_input_orientation(cond_phys[0].numpy())[0]})


def _hash_tensor(t: torch.Tensor) -> str:
    import hashlib

    a = t.detach().cpu()
    if a.is_complex():
        a = torch.view_as_real(a)
    return hashlib.sha256(a.contiguous().numpy().tobytes()).hexdigest()
