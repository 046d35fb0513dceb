"""`medldm demo`: the main job on embedded defaults, on this machine, in a few minutes.

For each shipped model: take a held-out real volume (the MNI152 validation slab for MR, the top of the
InVesalius head CT for CT), degrade it realistically and write it the way scanners deliver it (a DICOM
series; fastMRI-style k-space .h5 for undersampled MRI; a sinogram .h5 for sparse-view CT), register the model in the local MLflow registry
(once), run `medldm reconstruct` through the registry URI, and compare input, classical baseline and
medldm with the ground truth. Everything is reused on a second run (inputs, registry, finished units).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import h5py
import numpy as np

from medldm.errors import InputError
from medldm.evaluation import metrics as M
from medldm.evaluation.baselines import baselines_for
from medldm.evaluation.baselines import naive as naive_baseline
from medldm.evaluation.figures import case_figure
from medldm.io import read_nifti, write_dicom_series
from medldm.io.volume import Volume
from medldm.sampling.measurement import Measurement, simulate

CROP = (128, 160, 16)  # keeps the whole demo (six models) within a few minutes on 2 cores
SETTINGS = {  # task -> (operator kwargs, description)
    "mr-denoise": ({"sigma_range": [0.05, 0.05], "reference": "p99.5"}, "Rician noise, sigma 5% of the 99.5th percentile"),
    "mr-recon": ({"accelerations": [4], "center_fractions": [0.08]}, "4x random Cartesian k-space, 8% centre"),
    "mr-sr": ({"factors": [4]}, "4 mm thick slices (box profile) from 1 mm"),
    "ct-denoise": ({"I0_range": [1e4, 1e4], "pixel_mm": 0.957}, "low dose: 1e4 incident photons per ray"),
    "ct-recon": ({"views": [60], "I0_range": [1e5, 1e5], "pixel_mm": 0.957}, "sparse view: 60 of 180 degrees, 1e5 photons per ray"),
    "ct-sr": ({"factors": [3]}, "4.5 mm thick axial slices (box profile) from 1.5 mm"),
}


# SR is sampled on YZ planes (they contain the thick-slice axis): fewer of them keeps its time in line
CROPS = {"mr-sr": (64, 160, 16), "ct-sr": (64, 160, 15), "ct-recon": (128, 128, 8)}


def truth_volume(modality: str, crop: tuple[int, int, int] | None = None) -> Volume:
    from medldm.data.prepare import CT_VAL_SLICES, mni_holdout
    from medldm.data.sources import load_head_ct, load_mni152_t1
    from medldm.evaluation.cases import crop_centre

    if modality == "MR":
        vol = load_mni152_t1(1)
        k0, k1 = mni_holdout(vol.affine, vol.spatial_shape[2])["validation_k"]
        vol = vol.with_array(vol.array[..., k0:k1] * 1000.0, vol.affine @ _shift_k(k0))  # scanner-like units
    else:
        vol = load_head_ct()
        nz = vol.spatial_shape[2]
        vol = vol.with_array(vol.array[..., nz - CT_VAL_SLICES:], vol.affine @ _shift_k(nz - CT_VAL_SLICES))
    return crop_centre(vol, crop or (CROP if modality == "MR" else (160, 160, 16)))


def _shift_k(k0: int) -> np.ndarray:
    s = np.eye(4)
    s[2, 3] = k0
    return s


def degrade(name: str, truth: Volume) -> Measurement:
    return simulate(truth, name.split("-", 1)[1], 0, **SETTINGS[name][0])


def write_input(name: str, m: Measurement, folder: Path) -> None:
    """What a scanner or PACS would hand over: a DICOM series, or raw k-space for undersampled MRI."""
    stamp = json.dumps({"settings": SETTINGS[name][0], "shape": list(m.y.shape), "affine": np.round(m.affine, 6).tolist()},
                       sort_keys=True)
    if folder.exists() and (folder / "settings.json").is_file() and (folder / "settings.json").read_text() == stamp:
        return  # reuse: same degradation of the same volume
    if folder.exists():
        shutil.rmtree(folder)  # the demo's own input from an older version or settings
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    if name == "mr-recon":
        k = m.y[0, 0].permute(2, 0, 1).numpy().astype(np.complex64)  # (X, Y, Z) -> fastMRI [slices, H, W]
        mask = m.operator.mask_for((m.y.shape[3],)).reshape(-1).astype(np.float32)  # 2D mode: phase encode along Y
        with h5py.File(tmp / "undersampled.h5", "w") as f:
            f.create_dataset("kspace", data=k)
            f.create_dataset("mask", data=mask)
    elif name == "ct-recon":
        from medldm.io.sinogram_h5 import write_sinogram_h5
        from medldm.sampling.measurement import to_sinogram

        views = m.operator.views
        spacing = np.linalg.norm(m.affine[:3, :3], axis=0)
        write_sinogram_h5(tmp / "sinogram.h5", to_sinogram(m), np.arange(views) * 180.0 / views,
                          pixel_spacing=spacing[:2], slice_spacing=spacing[2],
                          I0=m.operator.I0)
    else:
        image = m.naive_inverse() if name == "ct-denoise" else m.y  # CT: the low-dose FBP image
        affine = m.meta.get("input_affine", m.affine)
        arr = image[0].numpy().astype(np.float32)
        if m.modality == "CT":
            arr = np.round(arr)  # CT is stored as integer HU
        write_dicom_series(Volume(arr, affine, m.modality, {}), tmp / "dicom", series_description_suffix="",
                           derivation_description=f"medldm demo input: {SETTINGS[name][1]}")
    (tmp / "settings.json").write_text(stamp)
    tmp.replace(folder)


def run_demo(out: str | Path = "demo_output", steps: int | None = None, samples: int = 2, models: list[str] | None = None) -> list[dict]:
    from medldm.batch import run_batch
    from medldm.batch import previous_parameters
    from medldm.sampling.reconstructor import shipped_models
    from medldm.serving import ensure_registered

    out = Path(out)
    available = shipped_models()
    names = [n for n in (models or list(SETTINGS)) if n in available]
    if not names:
        raise InputError(None, f"no shipped models installed (found: {available}); see data_cards/ and "
                               "pipelines/train_default_models.py")
    rows = []
    for name in names:
        modality = "CT" if name.startswith("ct") else "MR"
        t0 = time.time()
        try:
            truth = truth_volume(modality, CROPS.get(name))
        except InputError as err:
            print(f"[{name}] skipped: {err}")
            continue
        m = degrade(name, truth)
        write_input(name, m, out / "inputs" / name)
        reg = ensure_registered(name, f"medldm-{name}", "champion")
        # SR: the factor that made the thick slices (the default, "as fine as in-plane", would give 5x for
        # 4.5 mm CT slices at 0.96 mm pixels, finer than the 1.5 mm truth)
        factor = SETTINGS[name][0]["factors"][0] if m.task == "sr" else None
        # MR denoise: the noise level the input was made with, as the NLM baseline below gets it (a NIfTI does
        # not carry it; estimated from the image it came out 10% low on this slab)
        sigma = float(m.operator.sigma) if name == "mr-denoise" else None
        kwargs = dict(task=name.split("-", 1)[1], model=reg["uri"], steps=steps, samples=samples, seed=0,
                      modality=modality, factor=factor, sigma=sigma)
        # an earlier demo's outputs made with other settings are redone; any other usage error stays an error
        before = previous_parameters(out / "outputs" / name)
        stale = before is not None and any(before.get(k) != v for k, v in kwargs.items())
        code = run_batch(out / "inputs" / name, out / "outputs" / name, overwrite=stale, **kwargs)
        manifest = json.loads((out / "outputs" / name / "manifest.json").read_text())
        unit = manifest["units"][0]
        if code != 0 or unit["status"] == "failed":
            print(f"[{name}] reconstruction failed: {unit.get('reason')}")
            continue
        rec = read_nifti(out / "outputs" / name / unit["outputs"]["reconstruction"]).array[0]
        std_path = unit["outputs"].get("uncertainty")
        std = read_nifti(out / "outputs" / name / std_path).array[0] if std_path else None
        gt = truth.array[0]
        if rec.shape != gt.shape:
            raise InputError(None, f"{name}: output shape {rec.shape} differs from the truth's {gt.shape}")
        naive = m.naive_inverse()[0, 0].numpy()
        # the "input" row already is the naive inverse (zero-filled, cubic, FBP, the noisy image)
        outputs = {k: fn(m) for k, fn in baselines_for(m.task, modality).items() if fn is not naive_baseline}
        outputs["medldm (default)"] = rec
        for method, pred in [("input", naive), *outputs.items()]:
            r = M.all_metrics(gt, pred)
            rows.append({"model": name, "method": method, "psnr": r["psnr"], "ssim": r["ssim"],
                         # a reused unit reports the seconds of the run that made it
                         "seconds": unit.get("previous_seconds", unit.get("seconds")) if method.startswith("medldm") else None})
        fig = case_figure(gt, naive, outputs, std, out / "figures" / f"{name}.png", title=f"{name}: {SETTINGS[name][1]}")
        print(f"[{name}] done in {time.time() - t0:.0f} s; figure: {fig}")
    _print_table(rows, out)
    return rows


def _print_table(rows: list[dict], out: Path) -> None:
    lines = ["| model | method | PSNR (dB) | SSIM | seconds per volume |", "|---|---|---|---|---|"]
    for r in rows:
        sec = f"{r['seconds']:.1f}" if r["seconds"] is not None else ""
        lines.append(f"| {r['model']} | {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {sec} |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(f"\noutputs: {out / 'outputs'}  figures: {out / 'figures'}  table: {out / 'results.md'}")
