"""Fuzz the other inputs medldm takes: NIfTI files, fastMRI k-space and CT sinogram HDF5 files, and requests to
the scoring app `medldm serve` runs (figures printed, not a test; fuzz_dicom.py does DICOM).

    python benchmarks/fuzz_formats.py --kinds nifti,fastmri,sinogram,serving --cases 2500 [--seed 0] [--json F]

Each case starts from a small valid input of its kind and applies 1-3 mutations (flipped or truncated bytes,
broken header fields and attributes, odd dtypes, shapes and values, missing or extra parts; for serving: JSON
fields of wrong types and values, ragged arrays, bad base64 and broken NIfTI payloads, malformed JSON), then
runs what medldm runs on it in a worker process with a per-case timeout (fuzz_harness.py):
- nifti: read_nifti, then the denoise measurement (noise estimate included);
- fastmri / sinogram: from_h5_file, then the naive inverse;
- serving: a POST /invocations to the ASGI app of `medldm serve` (request guard + MLflow's scoring server) with
  a tiny random-weight model; a 4xx with an error code is a typed failure, a 5xx or an escaped exception a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import io
import json
import logging
import os
import random
import sys
import tempfile
import warnings
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from fuzz_harness import report, run_fuzz, where  # noqa: E402

ODD_NUMBERS = [0, -1, 1e308, -1e308, float("nan"), float("inf"), 2**31, 2**63, 1e-300, 7]


def _flip_bytes(path: Path, rng: random.Random, region: tuple[int, int] | None = None) -> str:
    raw = bytearray(path.read_bytes())
    lo, hi = region or (0, len(raw))
    hi = min(hi, len(raw))
    for _ in range(rng.randint(1, 8)):
        if hi > lo:
            raw[rng.randrange(lo, hi)] = rng.randrange(256)
    path.write_bytes(bytes(raw))
    return f"flip bytes {region or 'anywhere'}"


def _truncate(path: Path, rng: random.Random) -> str:
    raw = path.read_bytes()
    cut = rng.randrange(0, max(1, len(raw)))
    path.write_bytes(raw[:cut])
    return f"truncate to {cut} of {len(raw)} bytes"


# ---------------------------------------------------------------------------------------------------- NIfTI

def _nifti_image(rng: random.Random) -> nib.Nifti1Image:
    data = np.abs(np.random.default_rng(rng.randrange(1 << 30)).normal(100, 20, (24, 20, 6))).astype(np.float32)
    return nib.Nifti1Image(data, np.diag([1.0, 1.1, 2.5, 1.0]))


def make_nifti(folder: Path, rng: random.Random, mutate: bool) -> list[str]:
    img, done, path = _nifti_image(rng), [], folder / "case.nii"
    nib.save(img, path)
    if mutate and rng.random() < 0.5:  # through nibabel: odd but writable headers and data
        what = rng.choice(["pixdim", "qform", "sform", "dtype", "data", "dims"])
        try:
            nib.save(_nibabel_mutation(img, what, rng), path)
            done.append(f"nibabel {what}")
        except Exception as exc:  # noqa: BLE001 - nibabel refused to write it: bytes mutations below instead
            nib.save(_nifti_image(rng), path)
            done.append(f"nibabel {what} not applied ({type(exc).__name__})")
    for _ in range(rng.randint(1, 2) if mutate and not any(d.startswith("nibabel") and "not" not in d
                                                            for d in done) else 0):
        kind = rng.choice(["header", "anywhere", "truncate", "gzip"])
        if kind == "header":
            done.append(_flip_bytes(path, rng, (0, 352)))
        elif kind == "anywhere":
            done.append(_flip_bytes(path, rng))
        elif kind == "truncate":
            done.append(_truncate(path, rng))
        else:
            if path.suffix != ".gz":
                gz = folder / "case.nii.gz"
                gz.write_bytes(gzip.compress(path.read_bytes()))
                path.unlink()
                path = gz
            done.append(_flip_bytes(path, rng, (10, 10**9)) if rng.random() < 0.7 else _truncate(path, rng))
    return done


def _nibabel_mutation(img: nib.Nifti1Image, what: str, rng: random.Random) -> nib.Nifti1Image:
    if what == "pixdim":
        img.header["pixdim"][rng.randint(1, 3)] = rng.choice(ODD_NUMBERS[:6])
    elif what in ("qform", "sform"):
        aff = np.diag([1.0, 1.0, 1.0, 1.0])
        aff[rng.randrange(3), rng.randrange(4)] = rng.choice(ODD_NUMBERS[:6])
        (img.set_qform if what == "qform" else img.set_sform)(aff, code=rng.choice([0, 1, 2]))
    elif what == "dtype":
        dtype = rng.choice([np.uint8, np.int16, np.float64, np.complex64, bool])
        img = nib.Nifti1Image(np.asanyarray(img.dataobj).astype(dtype), img.affine)
    elif what == "data":
        a = np.asanyarray(img.dataobj).copy()
        a.flat[rng.randrange(a.size)] = rng.choice([np.nan, np.inf, -1e30])
        img = nib.Nifti1Image(a, img.affine)
    else:
        shape = rng.choice([(1, 1, 1), (24,), (24, 20), (24, 20, 6, 3), (1, 20, 6), (24, 20, 1, 1, 2)])
        img = nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4))
    return img


def check_nifti(folder: Path) -> tuple[str, str, str]:
    from medldm.errors import MedldmError
    from medldm.io import read_nifti
    from medldm.sampling.measurement import from_image

    path = next(folder.iterdir())
    try:
        from_image(read_nifti(path, modality="MR"), "denoise")
    except MedldmError as err:
        return "failed", str(err), ""
    except Exception as exc:  # noqa: BLE001 - what the fuzzer is looking for
        return "crash", f"{type(exc).__name__}: {exc}", f"nifti {type(exc).__name__} {where(exc)}"
    return "ok", "", ""


# --------------------------------------------------------------------------------------- fastMRI and sinogram

HEADER = ("<?xml version=\"1.0\"?><ismrmrdHeader xmlns=\"http://www.ismrm.org/ISMRMRD\"><encoding><encodedSpace>"
          "<matrixSize><x>24</x><y>20</y><z>1</z></matrixSize><fieldOfView_mm><x>24.0</x><y>30.0</y><z>3.0</z>"
          "</fieldOfView_mm></encodedSpace></encoding></ismrmrdHeader>")
BAD_HEADERS = ["", "<", "<ismrmrdHeader>", HEADER.replace("24.0", "nan"), HEADER.replace("24.0", "-5"),
               HEADER.replace("24.0", "1e999"), '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">'
               '<!ENTITY b "&a;&a;&a;&a;">]><ismrmrdHeader>&b;</ismrmrdHeader>', "\xff\xfe" * 10]


def _odd_array(rng: random.Random, like: np.ndarray):
    if not np.issubdtype(like.dtype, np.number) and like.dtype != bool:  # already strings: one odd array is enough
        return like, "kept"
    choice = rng.choice(["shape", "dtype", "values", "empty", "strings"])
    if choice == "shape":
        return np.resize(like, rng.choice([(0,), (5,), (1, 1), (2, 3, 4, 5), (1, 20, 24), (4, 1, 1)])), choice
    if choice == "dtype":
        return like.real.astype(rng.choice([np.float16, np.int8, np.uint32, np.float64])), choice
    if choice == "values" and like.size:
        out = like.copy()
        out.flat[rng.randrange(out.size)] = rng.choice([np.nan, np.inf, 1e38])
        return out, choice
    if choice == "empty":
        return np.zeros((0,) + like.shape[1:], like.dtype), choice
    return np.array([b"abc", b"def"]), choice


def make_fastmri(folder: Path, rng: random.Random, mutate: bool) -> list[str]:
    g = np.random.default_rng(rng.randrange(1 << 30))
    kspace = (g.normal(size=(3, 20, 24)) + 1j * g.normal(size=(3, 20, 24))).astype(np.complex64)
    mask = np.zeros(24, bool)
    mask[::2], mask[10:14] = True, True
    parts = {"kspace": kspace * mask, "mask": mask}
    header, attrs, done = HEADER, {"acquisition": "CORPD_FBK"}, []
    for _ in range(rng.randint(1, 3) if mutate else 0):
        what = rng.choice(["kspace", "mask", "header", "attrs", "drop", "extra", "multicoil", "bytes"])
        if what in ("kspace", "mask"):
            if what in parts:
                parts[what], how = _odd_array(rng, parts[what])
                done.append(f"{what} {how}")
        elif what == "header":
            header = rng.choice(BAD_HEADERS)
            done.append("header")
        elif what == "attrs":
            attrs[rng.choice(["acquisition", "max", "norm", "patient_id"])] = rng.choice(ODD_NUMBERS[:7])
            done.append("attrs")
        elif what == "drop":
            parts.pop(rng.choice(list(parts) or ["kspace"]), None)
            done.append("drop a dataset")
        elif what == "extra":
            parts["reconstruction_rss"] = np.ones((3, 20, 24), np.float32)
            done.append("extra dataset")
        elif what == "multicoil" and "kspace" in parts and parts["kspace"].ndim == 3:
            parts["kspace"] = np.stack([parts["kspace"]] * 2, 1)
            done.append("multi-coil")
        else:
            done.append("bytes later")
    path = folder / "case.h5"
    try:
        with h5py.File(path, "w") as f:
            for name, value in parts.items():
                f.create_dataset(name, data=value)
            f.create_dataset("ismrmrd_header", data=header.encode("utf-8", "surrogateescape"))
            f.attrs.update(attrs)
    except (TypeError, ValueError) as exc:  # h5py cannot store this mutation: the case is a truncated file
        path.write_bytes(b"\x89HDF\r\n\x1a\n")
        done.append(f"unwritable ({type(exc).__name__}): an 8-byte HDF5 signature")
    if "bytes later" in done:
        done.append(_flip_bytes(path, rng) if rng.random() < 0.6 else _truncate(path, rng))
    return done


def make_sinogram(folder: Path, rng: random.Random, mutate: bool) -> list[str]:
    from medldm.io.sinogram_h5 import write_sinogram_h5

    g = np.random.default_rng(rng.randrange(1 << 30))
    sino = np.abs(g.normal(1, 0.2, (2, 30, 34))).astype(np.float32)  # [slices, views, detectors]
    angles = np.linspace(0, 180, 30, endpoint=False)
    kw, done = {"pixel_spacing": (1.0, 1.0), "slice_spacing": 2.0, "image_size": (24, 24), "I0": 1e5}, []
    for _ in range(rng.randint(1, 3) if mutate else 0):
        what = rng.choice(["sinogram", "angles", "spacing", "size", "I0", "bytes"])
        if what == "sinogram":
            sino, how = _odd_array(rng, sino)
            done.append(f"sinogram {how}")
        elif what == "angles":
            angles = rng.choice([angles[:5], angles[::-1], np.full(30, np.nan), np.zeros(30), angles * 1e10,
                                 np.array([]), np.ones((30, 2))])
            done.append("angles")
        elif what == "spacing":
            kw["pixel_spacing"] = (rng.choice(ODD_NUMBERS[:6]), 1.0)
            done.append("pixel spacing")
        elif what == "size":
            kw["image_size"] = rng.choice([(0, 0), (-3, 24), (10**6, 10**6), (24,), (1, 1)])
            done.append("image size")
        elif what == "I0":
            kw["I0"] = rng.choice(ODD_NUMBERS[:6])
            done.append("I0")
        else:
            done.append("bytes later")
    path = folder / "case.h5"
    try:
        write_sinogram_h5(path, sino, angles, **kw)
    except (TypeError, ValueError) as exc:  # the writer refuses some shapes: write the parts by hand
        with h5py.File(path, "w") as f:
            f.create_dataset("sinogram", data=sino)
            f.create_dataset("angles", data=np.asarray(angles))
        done.append(f"written raw ({type(exc).__name__})")
    if "bytes later" in done:
        done.append(_flip_bytes(path, rng) if rng.random() < 0.6 else _truncate(path, rng))
    return done


def check_h5(folder: Path) -> tuple[str, str, str]:
    from medldm.errors import MedldmError
    from medldm.sampling.measurement import from_h5_file

    try:
        m = from_h5_file(folder / "case.h5")
        out = m.naive_inverse()
        if not np.all(np.isfinite(out.numpy())):
            return "crash", "naive inverse has NaN/Inf", "h5 non-finite"
    except MedldmError as err:
        return "failed", str(err), ""
    except Exception as exc:  # noqa: BLE001
        return "crash", f"{type(exc).__name__}: {exc}", f"h5 {type(exc).__name__} {where(exc)}"
    return "ok", "", ""


# ---------------------------------------------------------------------------------------------------- serving

def _nifti_b64(rng: random.Random) -> str:
    buf = io.BytesIO()
    img = _nifti_image(rng)
    buf.write(gzip.compress(img.to_bytes()))
    return base64.b64encode(buf.getvalue()).decode()


def make_request(folder: Path, rng: random.Random, mutate: bool) -> list[str]:
    g = np.random.default_rng(rng.randrange(1 << 30))
    record: dict = {"array": np.abs(g.normal(100, 20, (6, 5, 3))).round(2).tolist(), "spacing": [1, 1, 2],
                    "steps": 2, "samples": 1}
    body, done = {"inputs": [record]}, []
    for _ in range(rng.randint(1, 3) if mutate else 0):
        what = rng.choice(["param", "array", "spacing", "nifti", "both", "unknown", "inputs", "json"])
        if what == "param":
            name = rng.choice(["steps", "samples", "seed", "factor", "sigma"])
            record[name] = rng.choice([*ODD_NUMBERS[:8], "3", None, [1], {"a": 1}, True, 2.5, 10**40, 4])
        elif what == "array":
            record["array"] = rng.choice([[], [[[]]], [1, 2, 3], [[[1, 2], [3]]], [[["a"]]], [[[1e308] * 3] * 2] * 2,
                                          [[[float("nan")] * 3] * 3] * 3, 5, "abc", [[[[1.0]]]], [[[1.0]]]])
        elif what == "spacing":
            record["spacing"] = rng.choice([[0, 1, 1], [-1, 1, 1], [1, 1], "x", [float("inf"), 1, 1], None])
        elif what == "nifti":
            record.pop("array", None), record.pop("spacing", None)
            payload = _nifti_b64(rng)
            record["nifti_b64"] = rng.choice([payload, payload[: len(payload) // 2], "!!!notbase64", "",
                                              base64.b64encode(os.urandom(200)).decode(),
                                              base64.b64encode(b"\x1f\x8b" + os.urandom(50)).decode(), 12])
        elif what == "both":
            record["nifti_b64"] = _nifti_b64(rng)
        elif what == "unknown":
            record[rng.choice(["path", "__class__", "model"])] = "x"
        elif what == "inputs":
            body = rng.choice([{"inputs": []}, {"inputs": record}, {"inputs": [record, 5]}, {"inputs": None},
                               {"instances": [record]}, {"inputs": [record], "params": {"steps": 3}}])
        done.append(what)
    raw = json.dumps(body).encode()
    if mutate and rng.random() < 0.1:
        raw = raw[: rng.randrange(len(raw))] if rng.random() < 0.5 else raw.replace(b'"', b"'", 3)
        done.append("malformed JSON")
    (folder / "request.json").write_bytes(raw)
    return done


_APP = None


def _serving_init() -> None:
    global _APP
    import medldm.serving.app as app_module

    _APP = app_module.app  # built from MLflow's model path variable, as `medldm serve` does


def _post(app, body: bytes) -> tuple[int, bytes]:
    sent, chunks = [], [body]

    async def receive():
        return {"type": "http.request", "body": chunks.pop(0) if chunks else b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/invocations", "raw_path": b"/invocations",
             "query_string": b"", "root_path": "", "scheme": "http", "http_version": "1.1",
             "server": ("127.0.0.1", 5000), "client": ("127.0.0.1", 1),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def check_request(folder: Path) -> tuple[str, str, str]:
    try:
        status, body = _post(_APP, (folder / "request.json").read_bytes())
    except Exception as exc:  # noqa: BLE001
        return "crash", f"{type(exc).__name__}: {exc}", f"serving {type(exc).__name__} {where(exc)}"
    if status == 200:
        return "ok", "", ""
    try:
        info = json.loads(body)
    except ValueError:
        info = {}
    if 400 <= status < 500 and info.get("error_code") and info.get("message"):
        return "failed", f"{status} {info['error_code']}: {info['message']}", ""
    return "crash", f"HTTP {status}: {body[:200]!r}", f"serving HTTP {status}"


def serving_model(workdir: Path) -> Path:
    """A tiny random-weight model, registered in a throw-away store and downloaded as `medldm serve` does."""
    from tests.helpers import make_tiny_bundle

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["MEDLDM_CACHE_DIR"] = str(workdir / "cache")
    from medldm.serving.registry import register_model
    from medldm.tracking.download import _download

    cwd = os.getcwd()
    os.chdir(workdir)  # MLflow puts the run's artifacts under ./mlruns
    try:
        register_model(make_tiny_bundle(workdir / "tiny", "denoise", "MR"), "fuzz-tiny", alias=None,
                       input_example=False)
        return _download("models:/fuzz-tiny/1")[0]
    finally:
        os.chdir(cwd)


def _tolerant(make):
    """A mutation the generator itself cannot build (numpy or h5py refuse it) becomes an unmutated case, named so;
    the fuzzer's own errors must not end a run of thousands."""
    def wrapped(folder: Path, rng: random.Random, mutate: bool) -> list[str]:
        try:
            return make(folder, rng, mutate)
        except Exception as exc:  # noqa: BLE001
            for p in folder.iterdir():
                p.unlink()
            return [*make(folder, rng, False), f"generator error {type(exc).__name__}: unmutated"]
    return wrapped


KINDS = {"nifti": (_tolerant(make_nifti), check_nifti), "fastmri": (_tolerant(make_fastmri), check_h5),
         "sinogram": (_tolerant(make_sinogram), check_h5), "serving": (_tolerant(make_request), check_request)}


def fuzz_kind(kind: str, cases: int, seconds: float = 600.0, seed: int = 0, timeout: float = 30.0,
              workdir: Path | None = None) -> dict:
    make, check = KINDS[kind]
    init = None
    if kind == "serving":  # the app is built in the worker from the model path, as uvicorn builds it
        from mlflow.pyfunc import scoring_server

        where_model = Path(tempfile.mkdtemp(prefix="fuzz_srv_", dir=workdir)).resolve()
        os.environ[scoring_server._SERVER_MODEL_PATH] = str(serving_model(where_model))
        init = _serving_init
    return run_fuzz(make, check, cases=cases, seconds=seconds, seed=seed, timeout=timeout, workdir=workdir,
                    limit_memory=kind != "serving", init=init)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--cases", type=int, default=500, help="cases per kind (the first of each is unmutated)")
    ap.add_argument("--seconds", type=float, default=600.0, help="per kind: stop after this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--reasons", action="store_true")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.getLogger("nibabel").setLevel(logging.CRITICAL)  # it reports every odd header it is asked to write
    results, bad = {}, 0
    for kind in args.kinds.split(","):
        res = fuzz_kind(kind, args.cases, args.seconds, args.seed, args.timeout)
        report(f"fuzz {kind}", res, args.reasons)
        results[kind], bad = res, bad + res["crashes"] + res["hangs"]
    total = sum(r["cases"] for r in results.values())
    print(f"all kinds: {total} cases, {bad} crashes or hangs")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
