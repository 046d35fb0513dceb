"""Write the offline training set: NIfTI files plus a Decathlon-style ``datalist.json``.

Layout under ``out_dir``::

    mr/mni152_t1_train_part{0,1}.nii.gz   MNI152 T1 with the held-out slab (+ margin) cut out
    mr/mni152_t1_val_slab.nii.gz          the held-out MNI152 slab
    mr/synth_NNNN_part{j}.nii.gz          synthetic subjects, minus every slice that drew on the slab
    mr/itk_t1_brain.nii.gz                real T1 subject, skull-stripped (validation)
    mr/itk_t1_head.nii.gz                 same subject with skull (``test_ood``: outside the training domain)
    mr/pyradiomics_brain{1,2}.nii.gz      real contrast-enhanced T1 heads (training; 6.5 mm slices: axial planes only)
    mr/volpack_brainsmall.nii.gz          real T1 head, ~2 mm (training)
    ct/head_ct_train.nii.gz, ct/head_ct_val_slab.nii.gz
    datalist.json, manifest.json

Hold-out rules (also written into ``datalist.json["holdout"]`` and data_cards/):
* MNI152: validation = axial slab of world z in [10, 30) mm (ventricle bodies / basal ganglia level);
  a further 8 mm on each side is used by neither split, so no training slice is a near-copy of a
  validation slice. Ranges are in mm so they hold at any template resolution.
* Synthetic subjects are warped copies of the *same* MNI anatomy, so they obey the same rule in source
  space: an output slice is kept only if none of the template slices it was interpolated (and blurred)
  from lies in the slab or its margin. Random rotations tilt planes, so this drops more than 36 mm.
* Head CT (one patient): validation = the top 24 of 108 slices (upper cranium), margin 8 slices (12 mm),
  training = the rest.
* ITK T1: a different real person; validation only, never in training.
* Extra real heads (pyradiomics brain1/brain2, VolPack brainsmall): other people than every validation subject,
  training only, whole volumes. Entries with ``thick_axis`` are used only by 2D training on planes normal to
  that axis (``medldm.data.transforms.load_datalist``).

Idempotent: every output group (a "job") is keyed by a hash of its parameters in ``manifest.json``;
a rerun skips jobs whose hash matches and whose files exist, regenerates changed ones and deletes files of
jobs that no longer belong to the dataset.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from medldm.errors import InputError
from medldm.io.volume import Volume

PREPARE_VERSION = 1
MNI_VAL_Z_MM = (10.0, 30.0)
MNI_MARGIN_MM = 8.0
CT_SLICES = 108  # the InVesalius example; the hold-out is declared for this size
CT_VAL_SLICES = 24
CT_MARGIN_SLICES = 8
MIN_PART_SLICES = 8  # parts thinner than this are not worth a file (a 3D patch could not fit)


def _hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_nifti(vol: Volume, path: Path, dtype) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(vol.array[0]), vol.affine)
    img.set_sform(vol.affine, code=1)
    img.set_qform(vol.affine, code=1)
    # int16 + scale slope for [0, 1] images: 15-bit precision at half the size of float32.
    img.set_data_dtype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    nib.save(img, tmp)
    os.replace(tmp, path)  # a crash never leaves a truncated file that a rerun would trust


def _crop_k(vol: Volume, start: int, stop: int) -> Volume:
    affine = vol.affine.copy()
    affine[:3, 3] += affine[:3, 2] * start
    return Volume(np.ascontiguousarray(vol.array[..., start:stop]), affine, vol.modality, dict(vol.meta))


def mni_holdout(affine: np.ndarray, nz: int) -> dict:
    """Slab and excluded range (half-open k) for the MNI grid ``affine``; k must run along world z."""
    dz, oz = float(affine[2, 2]), float(affine[2, 3])
    if dz <= 0 or not np.allclose(affine[:3, 2], [0, 0, dz]):
        raise InputError(None, "MNI hold-out needs a RAS grid with k along world +z")

    def k_of(z_mm: float) -> int:  # first slice whose centre is at or above z_mm
        return int(min(max(math.ceil((z_mm - oz) / dz - 1e-9), 0), nz))

    val = (k_of(MNI_VAL_Z_MM[0]), k_of(MNI_VAL_Z_MM[1]))
    excl = (k_of(MNI_VAL_Z_MM[0] - MNI_MARGIN_MM), k_of(MNI_VAL_Z_MM[1] + MNI_MARGIN_MM))
    return {
        "applies_to_sources": ["mni152", "synthetic"],
        "grid": "MNI152 template k (axial index, RAS: increases to superior)",
        "resolution_mm": dz,
        "validation_world_z_mm": list(MNI_VAL_Z_MM),
        "margin_mm": MNI_MARGIN_MM,
        "validation_k": list(val),
        "excluded_from_training_k": list(excl),
        "rule": "training entries' source_k (template slices they draw on, incl. interpolation and blur "
        "support) never intersect excluded_from_training_k",
    }


def ct_holdout(nz: int) -> dict:
    val = (nz - CT_VAL_SLICES, nz)
    train = (0, nz - CT_VAL_SLICES - CT_MARGIN_SLICES)
    return {
        "applies_to_sources": ["invesalius_head_ct"],
        "grid": "head CT k (axial index, RAS: 0 = teeth level, increases to the vertex)",
        "validation_k": list(val),
        "margin_k": [train[1], val[0]],
        "training_k": list(train),
        "rule": f"validation = top {CT_VAL_SLICES} slices; the {CT_MARGIN_SLICES} slices between the splits are unused",
    }


def _entry(rel: str, modality: str, source: str, **extra) -> dict:
    return {"image": rel, "modality": modality, "source": source, **extra}


def _job_mni(resolution: int, out: Path) -> dict:
    from medldm.data.sources import load_mni152_t1
    from medldm.data.synth import split_excluding_source_band

    vol = load_mni152_t1(resolution)
    nz = vol.spatial_shape[2]
    h = mni_holdout(vol.affine, nz)
    v0, v1 = h["validation_k"]
    entries = {"training": [], "validation": []}
    for j, part in enumerate(split_excluding_source_band(vol, tuple(h["excluded_from_training_k"]), MIN_PART_SLICES)):
        rel = f"mr/mni152_t1_train_part{j}.nii.gz"
        _write_nifti(part, out / rel, np.int16)
        entries["training"].append(_entry(rel, "MR", "mni152", source_k=part.meta["source_k"]))
    rel = "mr/mni152_t1_val_slab.nii.gz"
    _write_nifti(_crop_k(vol, v0, v1), out / rel, np.int16)
    entries["validation"].append(_entry(rel, "MR", "mni152", source_k=[v0, v1 - 1]))
    return entries


def _job_synth(gen_factory: Callable, index: int, band: tuple[int, int], out: Path) -> dict:
    from medldm.data.synth import split_excluding_source_band

    vol = gen_factory().sample(index)
    entries = {"training": []}
    for j, part in enumerate(split_excluding_source_band(vol, band, MIN_PART_SLICES)):
        rel = f"mr/synth_{index:04d}_part{j}.nii.gz"
        _write_nifti(part, out / rel, np.int16)
        entries["training"].append(
            _entry(rel, "MR", "synthetic", subject=f"synth_{index:04d}", source_k=part.meta["source_k"],
                   contrast=part.meta["synth"]["contrast"])
        )
    return entries


def _job_itk(out: Path) -> dict:
    from medldm.data.sources import find_real_t1_validation

    entries = {"validation": [], "test_ood": []}
    brain = find_real_t1_validation(brain_only=True)
    head = find_real_t1_validation(brain_only=False)
    if brain is not None:
        _write_nifti(brain, out / "mr/itk_t1_brain.nii.gz", np.int16)
        entries["validation"].append(_entry("mr/itk_t1_brain.nii.gz", "MR", "itk_t1", subject="ITK KmeansTest T1"))
    if head is not None:
        _write_nifti(head, out / "mr/itk_t1_head.nii.gz", np.int16)
        entries["test_ood"].append(_entry("mr/itk_t1_head.nii.gz", "MR", "itk_t1", subject="ITK KmeansTest T1"))
    return entries


def _job_extra_mr(name: str, out: Path) -> dict:
    from medldm.data.sources import load_brainsmall, load_pyradiomics_brain

    vol, prefix, source = ((load_brainsmall(), "volpack", "volpack_brainsmall") if name == "brainsmall"
                           else (load_pyradiomics_brain(name), "pyradiomics", "pyradiomics_brain"))
    rel = f"mr/{prefix}_{name}.nii.gz"
    _write_nifti(vol, out / rel, np.int16)  # integer scanner values: int16 holds them exactly
    extra = {"thick_axis": vol.meta["thick_axis"]} if "thick_axis" in vol.meta else {}
    return {"training": [_entry(rel, "MR", source, subject=vol.meta["subject"], **extra)]}


def _job_ct(out: Path, expected: dict) -> dict:
    from medldm.data.sources import load_head_ct

    vol = load_head_ct()
    h = ct_holdout(vol.spatial_shape[2])
    if h != expected:
        raise InputError(vol.meta["source"], f"expected {CT_SLICES} slices, got {vol.spatial_shape[2]}: hold-out would move")
    t0, t1 = h["training_k"]
    v0, v1 = h["validation_k"]
    _write_nifti(_crop_k(vol, t0, t1), out / "ct/head_ct_train.nii.gz", np.int16)
    _write_nifti(_crop_k(vol, v0, v1), out / "ct/head_ct_val_slab.nii.gz", np.int16)
    return {
        "training": [_entry("ct/head_ct_train.nii.gz", "CT", "invesalius_head_ct", source_k=[t0, t1 - 1])],
        "validation": [_entry("ct/head_ct_val_slab.nii.gz", "CT", "invesalius_head_ct", source_k=[v0, v1 - 1])],
    }


def _run_jobs(jobs: list, out: Path, progress: bool) -> tuple[dict, int]:
    """Run the jobs whose parameters or files changed since the manifest was written, keep the others, delete
    the files of jobs that are gone; returns the manifest's jobs and how many ran."""
    from tqdm.auto import tqdm

    manifest_path = out / "manifest.json"
    old = json.loads(manifest_path.read_text()).get("jobs", {}) if manifest_path.is_file() else {}
    new: dict = {}
    made = 0
    for name, params, run in tqdm(jobs, desc="prepare_data", unit="job", disable=not progress):
        key = _hash(params)
        prev = old.get(name)
        if prev and prev["hash"] == key and all((out / f).is_file() for f in prev["files"]):
            new[name] = prev
            continue
        for f in (prev or {}).get("files", []):  # parts of a regenerated job may differ in number
            (out / f).unlink(missing_ok=True)
        entries = run()
        files = [e["image"] for split in entries.values() for e in split]
        new[name] = {"hash": key, "params": params, "files": files, "entries": entries}
        made += 1
        # Saved after every job so an interrupted run resumes where it stopped.
        manifest_path.write_text(json.dumps({"version": PREPARE_VERSION, "jobs": {**old, **new}}, indent=1))
    for name in set(old) - set(new):
        for f in old[name]["files"]:
            (out / f).unlink(missing_ok=True)
    manifest_path.write_text(json.dumps({"version": PREPARE_VERSION, "jobs": new}, indent=1))
    return new, made


def _datalist(jobs: list, new: dict, mni_h: dict, ct_h: dict | None) -> dict:
    """The MONAI datalist: every job's entries by split, with the hold-out rules and licences."""
    datalist: dict = {
        "name": "medldm offline training set",
        "description": "MNI152 T1 + synthetic subjects from MNI152 tissue maps + three other real heads (MR), "
        "InVesalius head CT (CT); "
        "validation is held out by the rules in 'holdout'. See data_cards/ in the medldm repository.",
        "licence": {"mni152": "ICBM 2009a MNI152 (see nilearn / McConnell Brain Imaging Centre terms)",
                    "synthetic": "derived from MNI152 tissue maps", "itk_t1": "ITK example data (Apache-2.0)",
                    "pyradiomics_brain": "pyradiomics 3.0.1 test data (BSD-3 archive; the scans' origin is not stated)",
                    "volpack_brainsmall": "VolPack example (from public-domain UNC SoftLab data; Debian libvolpack1-dev)",
                    "invesalius_head_ct": "GPL-2 (Debian invesalius-examples); do not redistribute without it"},
        "convention": "ranges are half-open [start, stop) except source_k, which is the inclusive [min, max] of "
        "source slices an entry's voxels were computed from",
        "holdout": {
            "mni152": mni_h,
            **({"invesalius_head_ct": ct_h} if ct_h else {}),
            **({"itk_t1": {"rule": "a different real subject: validation (brain) and test_ood (head) only"}}
               if "itk_t1" in new else {}),
        },
        "training": [], "validation": [], "test_ood": [],
    }
    for name, _, _ in jobs:
        for split, items in new[name]["entries"].items():
            datalist[split].extend(items)
    return datalist


def prepare_data(
    out_dir: str | Path,
    *,
    n_synthetic: int = 20,
    seed: int = 0,
    include_ct: bool = True,
    include_real_t1: bool = True,
    include_extra_mr: bool = True,
    resolution: int = 1,
    synth_config=None,
    progress: bool = True,
) -> Path:
    """Write (or update) the dataset under ``out_dir``; returns the path of ``datalist.json``.

    ``resolution`` (1 or 2 mm) selects the MNI152 grid for the template and the synthetic subjects; 2 is
    8x smaller and meant for tests. ``include_ct=True`` requires the Debian ``invesalius-examples`` package
    (InputError otherwise); the real ITK T1 is added when ``insighttoolkit5-examples`` is installed, and with
    ``include_extra_mr`` the extra real training heads whose files are present (a warning for each missing one).
    """
    from medldm.data.sources import (BRAINSMALL_HINT, BRAINSMALL_PATH, HEAD_CT_PATH, ITK_DATA_DIRS, ITK_T1_NAME,
                                     PYRADIOMICS_BRAINS, PYRADIOMICS_HINT, PYRADIOMICS_SDIST, load_head_ct)
    from medldm.data.synth import SYNTH_VERSION, SynthConfig, SyntheticSubjectGenerator

    if resolution not in (1, 2):
        raise InputError(None, f"resolution must be 1 or 2 (mm), got {resolution}")
    if n_synthetic < 0:
        raise InputError(None, f"n_synthetic must be >= 0, got {n_synthetic}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = synth_config or SynthConfig()
    if include_ct and not HEAD_CT_PATH.is_file():
        load_head_ct()  # raises InputError with the install hint

    # The hold-out range is needed before any synthetic job; the 1 mm / 2 mm grids are nilearn's fixed ones.
    from nilearn.datasets import load_mni152_template

    tpl = load_mni152_template(resolution=resolution)
    mni_h = mni_holdout(tpl.affine, tpl.shape[2])
    band = tuple(mni_h["excluded_from_training_k"])

    gen_cache: dict = {}

    def gen_factory():
        if "g" not in gen_cache:  # tissue maps are only loaded when some synthetic subject must be (re)made
            from medldm.data.sources import load_mni152_tissue_maps

            gen_cache["g"] = SyntheticSubjectGenerator(load_mni152_tissue_maps(resolution), seed=seed, config=cfg)
        return gen_cache["g"]

    base = {"prepare_version": PREPARE_VERSION, "resolution": resolution}
    jobs: list[tuple[str, dict, Callable[[], dict]]] = [
        ("mni152_t1", {**base, "holdout": mni_h}, lambda: _job_mni(resolution, out))
    ]
    for i in range(n_synthetic):
        params = {**base, "seed": seed, "index": i, "band": list(band), "synth": cfg.to_dict(), "synth_version": SYNTH_VERSION}
        jobs.append((f"synth_{i:04d}", params, lambda i=i: _job_synth(gen_factory, i, band, out)))
    itk_path = next((d / ITK_T1_NAME for d in ITK_DATA_DIRS if (d / ITK_T1_NAME).is_file()), None)
    if include_real_t1:
        if itk_path is None:
            warnings.warn("real T1 validation subject not installed (`sudo apt-get install insighttoolkit5-examples`); "
                          "MR validation is the MNI152 slab only", stacklevel=2)
        else:
            jobs.append(("itk_t1", {**base, "path": str(itk_path), "size": itk_path.stat().st_size}, lambda: _job_itk(out)))
    if include_extra_mr:
        extra = [(n, PYRADIOMICS_SDIST, PYRADIOMICS_HINT) for n in PYRADIOMICS_BRAINS]
        for name, path, hint in extra + [("brainsmall", BRAINSMALL_PATH, BRAINSMALL_HINT)]:
            if not path.is_file():
                warnings.warn(f"extra real MR training head {name} not found at {path}: {hint}", stacklevel=2)
                continue
            params = {**base, "path": str(path), "size": path.stat().st_size, "name": name}
            jobs.append((f"extra_mr_{name}", params, lambda name=name: _job_extra_mr(name, out)))
    ct_h = None
    if include_ct:
        ct_h = ct_holdout(CT_SLICES)
        params = {**base, "path": str(HEAD_CT_PATH), "size": HEAD_CT_PATH.stat().st_size, "holdout": ct_h}
        jobs.append(("head_ct", params, lambda: _job_ct(out, ct_h)))

    new, made = _run_jobs(jobs, out, progress)
    datalist = _datalist(jobs, new, mni_h, ct_h)
    path = out / "datalist.json"
    path.write_text(json.dumps(datalist, indent=1))
    if progress:
        print(f"prepare_data: {made} of {len(jobs)} jobs (re)made, {len(datalist['training'])} training / "
              f"{len(datalist['validation'])} validation files in {out}")
    return path
