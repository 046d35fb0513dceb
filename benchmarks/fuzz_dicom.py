"""Fuzz the DICOM discovery and reader (and optionally the whole batch) with mutated copies of a small series.

    python benchmarks/fuzz_dicom.py --cases 500 --seconds 120 [--seed 0] [--timeout 10] [--reconstruct]

Each case copies a valid 4-slice MR series, applies 1-3 mutations (dropped tags, changed VRs and values,
truncated files, flipped header and pixel bytes, moved or tilted slices, wrong transfer syntaxes, deleted,
duplicated or non-image files), then runs find_dicom_series + read_dicom_series on it in a worker process
with a per-case timeout. Outcomes:

    ok       every series found was read
    failed   the reader refused with an InputError: the reason a user would see
    crash    any other exception escaped (a reader bug: users would get a traceback)
    hang     the worker did not answer within --timeout (killed and restarted)

With --reconstruct each case also goes through medldm.batch.run_batch with a tiny random-weight model
(needs tests/helpers.py); a unit failing with "unexpected ..." there counts as a crash too.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import random
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_harness import report, run_fuzz, where  # noqa: E402
_DEFAULT_MODES = (config.settings.reading_validation_mode, config.settings.writing_validation_mode)
SHAPE = (24, 20, 4)  # (columns, rows, slices): above the 16 px the tiny model's refiner needs

# (keyword, VR, values that a broken exporter might write)
WEIRD = [
    ("ImagePositionPatient", "DS", ["abc", "", "1\\2", "nan\\0\\0", "inf\\inf\\inf", "1e999\\0\\0", "0\\0\\0\\0"]),
    ("ImageOrientationPatient", "DS",
     ["0\\0\\0\\0\\0\\0", "1\\0\\0\\1\\0\\0", "x", "1\\0\\0\\0\\1", "nan\\0\\0\\0\\1\\0"]),
    ("PixelSpacing", "DS", ["0\\0", "-1\\1", "1", "abc\\1", "1e308\\1e308", "nan\\1"]),
    ("SliceThickness", "DS", ["0", "-3", "abc", ""]),
    ("RescaleSlope", "DS", ["0", "nan", "inf", "abc", "1e308", ""]),
    ("RescaleIntercept", "DS", ["nan", "x", "-1e308"]),
    ("Rows", "US", [0, 1, 65535, 7]),
    ("Columns", "US", [0, 1, 65535, 3]),
    ("BitsAllocated", "US", [0, 1, 8, 12, 32, 64]),
    ("BitsStored", "US", [0, 17, 64]),
    ("HighBit", "US", [0, 31, 99]),
    ("PixelRepresentation", "US", [2, 65535]),
    ("SamplesPerPixel", "US", [0, 3]),
    ("PhotometricInterpretation", "CS", ["RGB", "PALETTE COLOR", "YBR_FULL", "", "XYZ"]),
    ("NumberOfFrames", "IS", ["2", "0", "abc", "-1", "99999999"]),
    ("SeriesNumber", "IS", ["abc", "-5", "1.5", "99999999999999"]),
    ("InstanceNumber", "IS", ["abc", ""]),
    ("Modality", "CS", ["CT", "PT", "", "mr", "SR"]),
    ("SeriesInstanceUID", "UI", ["", "1.2.3", "not-a-uid"]),
    ("SOPInstanceUID", "UI", ["", "1.2.3"]),
    ("SpecificCharacterSet", "CS", ["ISO_IR 999", "\\\\", "ISO 2022 IR 87"]),
    ("PatientName", "PN", ["\udcff", "=" * 70, "a\\b\\c"]),
]
DROPPABLE = ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "BitsAllocated",
             "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
             "SeriesInstanceUID", "SOPInstanceUID", "Modality", "RescaleSlope", "SOPClassUID", "PixelData"]
TRANSFER_SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.50",
                     "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.3.4", ""]
VRS_SHORT = ["AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "PN", "SH", "SL", "SS", "ST",
             "TM", "UI", "UL", "US"]
VRS_LONG = ["OB", "OW", "OF", "SQ", "UT", "UN"]


def write_base_series(folder: Path, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = SHAPE
    # UIDs from the seed: their lengths shift every byte offset, and cases must replay exactly from --seed.
    study, series, frame = (generate_uid(entropy_srcs=[str(seed), kind]) for kind in ("study", "series", "frame"))
    paths = []
    for k in range(nz):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid(entropy_srcs=[str(seed), str(k)])
        ds.Modality, ds.PatientName, ds.PatientID = "MR", "Fuzz^Case", "FUZZ"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesNumber, ds.InstanceNumber = 5, k + 1
        ds.ImagePositionPatient = [-12.0, -10.0, 3.0 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 3.0
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = ny, nx, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, 0.0
        ds.PixelData = rng.integers(0, 1000, size=(ny, nx)).astype(np.uint16).tobytes()
        path = folder / f"IM{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- mutations


def _load(path: Path) -> Dataset:
    return pydicom.dcmread(path, force=True)


def _save(ds: Dataset, path: Path) -> None:
    ds.save_as(path, enforce_file_format=False)


def m_weird_value(files, rng):
    keyword, vr, values = rng.choice(WEIRD)
    value = rng.choice(values)
    targets = files if rng.random() < 0.3 else [rng.choice(files)]
    for path in targets:
        ds = _load(path)
        ds[keyword] = DataElement(keyword, vr, value, validation_mode=config.IGNORE)
        _save(ds, path)
    return f"{keyword}={value!r} in {len(targets)} file(s)"


def m_drop_tag(files, rng):
    keyword = rng.choice(DROPPABLE)
    targets = files if rng.random() < 0.3 else [rng.choice(files)]
    for path in targets:
        ds = _load(path)
        if keyword in ds:
            del ds[keyword]
        _save(ds, path)
    return f"drop {keyword} in {len(targets)} file(s)"


def m_orientation(files, rng):
    path = rng.choice(files)
    ds = _load(path)
    angle = rng.choice([1e-4, 0.01, 0.3, np.pi / 2])
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, float(np.cos(angle)), float(np.sin(angle))]
    _save(ds, path)
    return f"tilt {path.name} by {angle:.4g} rad"


def m_position(files, rng):
    i = rng.randrange(len(files))
    ds = _load(files[i])
    kind = rng.choice(["duplicate", "gap", "shift", "far", "in-plane"])
    pos = [float(v) for v in ds.ImagePositionPatient]
    other = [float(v) for v in _load(files[(i + 1) % len(files)]).ImagePositionPatient]
    pos = {"duplicate": other, "gap": [pos[0], pos[1], pos[2] + 7.3], "shift": [pos[0], pos[1], pos[2] + 0.2],
           "far": [pos[0], pos[1], 1e12], "in-plane": [pos[0] + 5, pos[1], pos[2]]}[kind]
    ds.ImagePositionPatient = pos
    _save(ds, files[i])
    return f"position {kind} in {files[i].name}"


def m_transfer_syntax(files, rng):
    uid = rng.choice(TRANSFER_SYNTAXES)
    for path in files if rng.random() < 0.5 else [rng.choice(files)]:
        ds = _load(path)
        ds.file_meta.TransferSyntaxUID = uid
        ds.save_as(path, enforce_file_format=False, implicit_vr=False, little_endian=True)
    return f"TransferSyntaxUID={uid!r} (data not re-encoded)"


def m_pixel_length(files, rng):
    path = rng.choice(files)
    ds = _load(path)
    data = bytes(ds.PixelData)
    cut = rng.choice([1, 2, len(data) // 2, len(data) - 1, -7])
    ds.PixelData = data[:-cut] if cut > 0 else data + b"\0" * -cut
    _save(ds, path)
    return f"PixelData length {len(data)} -> {len(ds.PixelData)} in {path.name}"


def m_truncate(files, rng):
    path = rng.choice(files)
    raw = path.read_bytes()
    n = rng.randrange(0, len(raw))
    path.write_bytes(raw[:n])
    return f"truncate {path.name} to {n} of {len(raw)} bytes"


def _pixel_offset(raw: bytes) -> int:
    i = raw.rfind(b"\xe0\x7f\x10\x00")
    return i if i > 0 else len(raw)


def m_flip_header(files, rng):
    path = rng.choice(files)
    raw = bytearray(path.read_bytes())
    end = _pixel_offset(bytes(raw))
    for _ in range(rng.randint(1, 8)):
        raw[rng.randrange(132, max(end, 133))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(raw))
    return f"flip header bits in {path.name}"


def m_flip_pixels(files, rng):
    path = rng.choice(files)
    raw = bytearray(path.read_bytes())
    start = _pixel_offset(bytes(raw)) + 12
    for _ in range(rng.randint(1, 64)):
        raw[rng.randrange(start, len(raw))] = rng.randrange(256)
    path.write_bytes(bytes(raw))
    return f"flip pixel bytes in {path.name}"


def m_change_vr(files, rng):
    path = rng.choice(files)
    raw = bytearray(path.read_bytes())
    ds = _load(path)
    keyword = rng.choice([e.keyword for e in ds if e.keyword])
    tag = ds[keyword].tag
    key = tag.group.to_bytes(2, "little") + tag.element.to_bytes(2, "little")
    i = raw.find(key, 132)
    if i < 0:
        return f"VR change skipped ({keyword} not found)"
    vr = rng.choice(VRS_SHORT + VRS_LONG if rng.random() < 0.3 else VRS_SHORT)
    raw[i + 4: i + 6] = vr.encode()
    path.write_bytes(bytes(raw))
    return f"{keyword} VR -> {vr} in {path.name}"


def m_files(files, rng):
    kind = rng.choice(["delete", "copy", "copy-new-sop", "other-series", "no-pixels", "garbage"])
    path = rng.choice(files)
    if kind == "delete" and len(files) > 1:
        path.unlink()
        files.remove(path)
    elif kind == "copy":
        shutil.copy(path, path.with_name("copy_" + path.name))
    elif kind in ("copy-new-sop", "other-series", "no-pixels"):
        ds = _load(path)
        if kind == "no-pixels" and "PixelData" in ds:
            del ds.PixelData
        else:
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(rng.random())])
            if kind == "other-series":
                ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(rng.random())])
        target = path if kind == "no-pixels" else path.with_name(f"{kind}_{path.name}")
        _save(ds, target)
    else:
        (path.parent / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + rng.randbytes(rng.randrange(0, 400)))
    return f"file {kind} ({path.name})"


MUTATIONS = [m_weird_value, m_weird_value, m_drop_tag, m_orientation, m_position, m_transfer_syntax, m_pixel_length,
             m_truncate, m_flip_header, m_flip_pixels, m_change_vr, m_change_vr, m_files]


@contextlib.contextmanager
def _lenient():
    """Let pydicom write invalid values while mutating; restore its settings so readers see the defaults."""
    modes = (config.settings.reading_validation_mode, config.settings.writing_validation_mode)
    config.settings.reading_validation_mode = config.settings.writing_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        config.settings.reading_validation_mode, config.settings.writing_validation_mode = modes


def make_case(base: Path | None, folder: Path, rng: random.Random, mutate: bool = True) -> list[str]:
    """Copy ``base`` (or write a fresh series with its own UIDs when None) to ``folder`` and mutate it."""
    with _lenient():
        if base is None:
            write_base_series(folder, rng.randrange(1 << 30))
        else:
            shutil.copytree(base, folder)
        files = sorted(folder.iterdir())
        done = []
        for _ in range(rng.randint(1, 3) if mutate else 0):
            mutation = rng.choice(MUTATIONS)
            try:
                done.append(mutation(files, rng))
            except Exception as exc:  # noqa: BLE001 - pydicom refused to write this mutation: try another
                done.append(f"{mutation.__name__} not applied ({type(exc).__name__})")
    return done


# ---------------------------------------------------------------------------------------------- checking


def check_reader(folder: Path) -> tuple[str, str, str]:
    """(outcome, detail, crash class) of find_dicom_series + read_dicom_series on one case folder."""
    from medldm.errors import InputError
    from medldm.io import find_dicom_series, read_dicom_series

    try:
        found = find_dicom_series(folder)
    except InputError as err:
        return "failed", str(err), ""
    except Exception as exc:  # noqa: BLE001 - what the fuzzer is looking for
        return "crash", f"find_dicom_series: {type(exc).__name__}: {exc}", f"find {type(exc).__name__} {where(exc)}"
    if not found:
        return "failed", "no image series (" + "; ".join(sorted({r for _, r in found.skipped})) + ")", ""
    outcome, details = "ok", []
    for series in found:
        try:
            volume = read_dicom_series(series)
            if not np.all(np.isfinite(volume.array)) or volume.array.ndim != 4:
                return "crash", f"read returned a bad volume {volume.array.shape}", "read bad-volume"
            det = np.linalg.det(volume.affine[:3, :3]) if np.all(np.isfinite(volume.affine)) else np.nan
            if not abs(det) > 1e-12:  # NaN too: a volume no writer or resampler can place
                return "crash", f"read returned a non-finite or degenerate affine {volume.affine.tolist()}", \
                    "read bad-affine"
        except InputError as err:
            outcome = "failed"
            details.append(str(err))
        except Exception as exc:  # noqa: BLE001
            name = type(exc).__name__
            return "crash", f"read_dicom_series: {name}: {exc}", f"read {name} {where(exc)}"
    return outcome, "; ".join(details), ""


def check_batch(folder: Path, model: str) -> tuple[str, str, str] | None:
    """A crash of medldm.batch itself (an exception out of run_batch, or a unit failing "unexpected" outside the
    reader), else None. Reader crashes the batch recorded as reasons are counted by check_reader."""
    import io

    from medldm.batch import run_batch

    out = folder.parent / (folder.name + "_out")
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = run_batch(folder, out, task="denoise", model=model, steps=1, device="cpu")
    except Exception as exc:  # noqa: BLE001
        return "crash", f"run_batch: {type(exc).__name__}: {exc}", f"batch {type(exc).__name__} {where(exc)}"
    if code == 2:
        return None
    units = json.loads((out / "manifest.json").read_text())["units"]
    bad = [u["reason"] for u in units if u["reason"].startswith("unexpected ") and "while reading" not in u["reason"]]
    return ("crash", f"run_batch unit: {bad[0]}", "batch " + bad[0].split(":")[0]) if bad else None


def check_case(folder: Path, model: str | None = None) -> tuple[str, str, str]:
    reader = check_reader(folder)
    batch = check_batch(folder, model) if model is not None else None
    return batch or reader


def fuzz(cases: int = 100, seconds: float = 60.0, seed: int = 0, timeout: float = 10.0, reconstruct: bool = False,
         workdir: Path | None = None) -> dict:
    base_dir = Path(tempfile.mkdtemp(prefix="fuzz_dicom_base_", dir=workdir))
    try:
        model = None
        if reconstruct:
            sys.path.insert(0, str(ROOT))
            from tests.helpers import make_tiny_bundle

            model = str(make_tiny_bundle(base_dir / "model", "denoise", "MR"))
        base = base_dir / "base"
        write_base_series(base, seed)

        def make(folder: Path, rng, mutate: bool) -> list[str]:
            folder.rmdir()  # make_case copies the base into a new folder
            return make_case(base, folder, rng, mutate=mutate)

        return run_fuzz(make, functools.partial(check_case, model=model), cases=cases, seconds=seconds, seed=seed,
                        timeout=timeout, workdir=workdir, limit_memory=model is None, init=_default_modes)
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


def _default_modes() -> None:
    config.settings.reading_validation_mode, config.settings.writing_validation_mode = _DEFAULT_MODES


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=200, help="number of cases (the first is the unmutated series)")
    ap.add_argument("--seconds", type=float, default=120.0, help="stop after this long even if cases remain")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=10.0, help="per-case limit before a case counts as a hang")
    ap.add_argument("--reconstruct", action="store_true", help="also run medldm.batch with a tiny model per case")
    ap.add_argument("--json", type=Path, help="write the figures here as JSON")
    ap.add_argument("--reasons", action="store_true", help="print the failure reasons by frequency")
    args = ap.parse_args(argv)
    res = fuzz(args.cases, args.seconds, args.seed, args.timeout, args.reconstruct)
    report("fuzz_dicom", res, args.reasons)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 1 if res["crashes"] or res["hangs"] else 0


if __name__ == "__main__":
    sys.exit(main())
