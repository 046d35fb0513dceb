"""Where inference time goes (issue #26): seconds per stage and peak RSS for one volume per shipped model.

For each model (default: the three MR ones) and each number of samples, a fresh subprocess (so ru_maxrss is its
own) loads the model and runs what `medldm reconstruct` runs on a realistic test volume (the repository's
data/mr/itk_t1_brain.nii.gz, or data/ct/head_ct_train.nii.gz for CT models, resampled to 1 mm and centre
cropped/padded to --size), degraded as `medldm demo` degrades it (medldm.demo.SETTINGS: MR 4x Cartesian k-space,
Rician sigma 5% of the 99.5th percentile, 4 mm thick slices along Z):

    python benchmarks/profile_inference.py [--models mr-recon mr-denoise mr-sr] [--size 181x217x181]
        [--steps N (default: each model's)] [--samples 1 4] [--device cpu|cuda] [--threads N] [--json OUT]
        [--runtime auto|torch|openvino|openvino-bf16]

Stages, timed from outside the library by wrapping module attributes at run time (nothing in medldm changes):

    load     Reconstructor.load (weights, .to(device)); an OpenVINO conversion (or cache read) runs at its network's
             first call and counts in that call's stage (nested: stage>load)
    read     medldm.io.read_volume of the input NIfTI written to a temp folder (recon: the clean volume;
             denoise / sr: the noisy / thick-slice image)
    measure  recon: measurement.simulate (mask + FFT); denoise / sr: Reconstructor.measurement_for (from_image:
             MR noise estimate, thick-slice operator)
    naive    Measurement.naive_inverse
    guide    reconstructor.guide_image (the refiner's classical guide: mr-recon TV-POCS, mr-denoise NLM)
    encode   LatentCodec.encode          unet     the U-Net's forward (every denoiser call; "calls" counts them)
    decode   LatentCodec.decode          refiner  slicewise.apply_refiner (its cascaded DC included)
    dc       Operator.consistent_nonnegative / data_consistency / residual called by the reconstructor itself
    write    medldm.io.write_nifti of the reconstruction (and the uncertainty when samples > 1)
    other    total minus the stages: normalisation, slicing/padding, copies, scheduler steps, hashing, ...

Making the test input (resampling, the simulated noise or thick slices, writing its NIfTI) is not timed. Nested
calls count in the outermost stage (TV-POCS's projections in guide, the refiner's DC in refiner); their own time
is listed under "nested" as outer>inner (dc>dc: the data_consistency rounds inside consistent_nonnegative).
On CUDA every stage boundary synchronises. Timings are wall clock: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("load", "read", "measure", "naive", "guide", "encode", "unet", "decode", "refiner", "dc", "write")
IMAGES = {"MR": ROOT / "data/mr/itk_t1_brain.nii.gz", "CT": ROOT / "data/ct/head_ct_train.nii.gz"}
BACKGROUND = {"MR": 0.0, "CT": -1024.0}  # what the padding holds: air


class Profile:
    """Seconds and calls per stage; a call made inside another stage counts in the outer one (and in ``nested``)."""

    def __init__(self, device: str):
        import torch

        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.calls = dict.fromkeys(STAGES, 0)
        self.nested: dict[str, float] = {}
        self.stack: list[str] = []

    def run(self, name: str, fn, *args, **kwargs):
        self.sync()
        self.stack.append(name)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.sync()
            dt = time.perf_counter() - t0
            self.stack.pop()
            if self.stack:
                key = f"{self.stack[0]}>{name}"
                self.nested[key] = self.nested.get(key, 0.0) + dt
            else:
                self.seconds[name] += dt
                self.calls[name] += 1

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            return self.run(name, fn, *args, **kwargs)

        return timed

    def patch(self, owner, attr: str, name: str) -> None:
        setattr(owner, attr, self.wrap(name, getattr(owner, attr)))


def test_volume(modality: str, shape: tuple[int, int, int]):
    """The repository's real head image, trilinearly resampled to 1 mm, centre cropped / padded (air) to ``shape``."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from medldm.evaluation.cases import crop_centre
    from medldm.io import read_volume
    from medldm.io.volume import Volume

    src = read_volume(IMAGES[modality], modality=modality)
    size = [max(1, round(n * s)) for n, s in zip(src.spatial_shape, src.spacing)]
    x = F.interpolate(torch.from_numpy(np.ascontiguousarray(src.array, dtype=np.float32))[None], size=size,
                      mode="trilinear", align_corners=False)[0].numpy()
    vol = crop_centre(Volume(x, np.eye(4), modality), shape)
    pad = [((n - s) // 2, n - s - (n - s) // 2) for n, s in zip(shape, vol.spatial_shape)]
    return Volume(np.pad(vol.array, [(0, 0), *pad], constant_values=BACKGROUND[modality]).astype(np.float32),
                  np.eye(4), modality)


def one_model(model: str, shape: tuple[int, int, int], steps: int, samples: int, device: str,
              threads: int | None, use_diffusion: bool | None = None, runtime: str = "auto") -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from medldm import demo
    from medldm.io import read_volume, write_nifti
    from medldm.io.volume import Volume
    from medldm.models import runtime as runtimes  # (`runtime` is this function's argument)
    from medldm.models.latent import LatentCodec
    from medldm.sampling import reconstructor, slicewise, volumetric
    from medldm.sampling.measurement import Measurement, simulate
    from medldm.sampling.reconstructor import Reconstructor

    prof = Profile(device)
    t_start = time.perf_counter()
    rec = prof.run("load", Reconstructor.load, model, device=device, runtime=runtime)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    modality = rec.config.modality
    t0 = time.perf_counter()  # setup, not a stage: the test input is made outside the total
    truth = test_volume(modality, shape)
    settings = demo.SETTINGS.get(model, next(v for k, v in demo.SETTINGS.items() if k.endswith(rec.task)))[0]
    if rec.task == "recon":
        given = truth
    else:  # the image a scanner would hand over: noisy, or thick slices on their coarse grid
        m0 = simulate(truth, rec.task, 0, **settings)
        given = Volume(m0.y[0].numpy(), m0.meta.get("input_affine", m0.affine), modality)
    t_start += time.perf_counter() - t0

    # the stages the library runs, wrapped where they are looked up
    prof.patch(Measurement, "naive_inverse", "naive")
    prof.patch(reconstructor, "guide_image", "guide")
    prof.patch(LatentCodec, "encode", "encode")
    prof.patch(LatentCodec, "decode", "decode")
    prof.patch(slicewise, "apply_refiner", "refiner")
    prof.patch(volumetric, "apply_refiner", "refiner")
    prof.patch(rec.bundle.unet, "forward", "unet")  # nn.Module.__call__ finds the instance attribute
    # networks in OpenVINO are LazyOpenVino objects, converted at their first call (that call's stage holds the
    # conversion, listed under nested as stage>load): the U-Net's are timed here, the VAE's and the refiner's above
    lazy_call = runtimes.LazyOpenVino.__call__

    def lazy_timed(self, *xs):
        return prof.run("unet", lazy_call, self, *xs) if self.what == "U-Net" else lazy_call(self, *xs)

    runtimes.LazyOpenVino.__call__ = lazy_timed
    prof.patch(runtimes, "_convert", "load")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_nifti(given, Path(tmp) / "input.nii.gz")  # setup too
        t_start += time.perf_counter() - t0
        vol = prof.run("read", read_volume, Path(tmp) / "input.nii.gz", modality=modality)
        if rec.task == "recon":
            m = prof.run("measure", simulate, vol, "recon", 0, **settings)
        else:
            m = prof.run("measure", rec.measurement_for, vol)
        for attr in ("consistent_nonnegative", "data_consistency", "residual"):
            prof.patch(type(m.operator), attr, "dc")
        res = rec(m, steps=steps, samples=samples, seed=0, use_diffusion=use_diffusion)
        prof.run("write", write_nifti, res.volume, Path(tmp) / "reconstruction.nii.gz")
        if res.uncertainty is not None:
            prof.run("write", write_nifti, res.uncertainty, Path(tmp) / "uncertainty.nii.gz")
    total = time.perf_counter() - t_start
    row = {"model": model, "shape": "x".join(map(str, shape)), "steps": res.provenance["parameters"]["steps"],
           "samples": samples, "device": device, "refiner_runtime": res.provenance.get("refiner_runtime"),
           "latent_runtime": res.provenance.get("latent_runtime"),
           "measured": time.strftime("%Y-%m-%d", time.gmtime()),
           "threads": torch.get_num_threads(), **{k: round(v, 3) for k, v in prof.seconds.items()}}
    row.update(other=round(total - sum(prof.seconds.values()), 3), total=round(total, 3),
               unet_calls=prof.calls["unet"], calls=prof.calls, nested={k: round(v, 3) for k, v in prof.nested.items()},
               reconstructor_timings={k: round(v, 3) for k, v in res.timings.items()},
               rss_after_load_gib=round(rss_loaded, 3),
               peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3))
    if device.startswith("cuda"):
        row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["mr-recon", "mr-denoise", "mr-sr"])
    ap.add_argument("--size", default="181x217x181", help="XxYxZ voxels at 1 mm (one number: a cube)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: each model's default_steps, "
                                                                "what medldm reconstruct runs)")
    ap.add_argument("--samples", nargs="*", type=int, default=[1, 4])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--diffusion", choices=["default", "on", "off"], default="default",
                    help="sample the U-Net (on), decode the input's latent (off), or each model's default path")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each run (default: torch's)")
    from medldm.models.runtime import RUNTIMES  # no torch: cheap in the parent process

    ap.add_argument("--runtime", choices=RUNTIMES, default="auto",
                    help="what runs the networks (Reconstructor's runtime, medldm.models.runtime)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.size.split("x")) if "x" in args.size else (int(args.size),) * 3
    if len(shape) != 3:
        ap.error("--size needs three numbers, e.g. 181x217x181")
    if args.child:
        model, samples = json.loads(args.child)
        use = {"default": None, "on": True, "off": False}[args.diffusion]
        print(json.dumps(one_model(model, shape, args.steps, samples, args.device, args.threads, use, args.runtime)))
        return
    import torch

    steps = args.steps
    print(f"device: {args.device}; torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads; "
          f"volume {args.size} at 1 mm; {steps or 'each model' + chr(39) + 's default'} steps", flush=True)
    cols = [*STAGES, "other", "total"]
    print("| model | samples | " + " | ".join(cols) + " | unet calls | peak RSS GiB |\n"
          + "|---" * (len(cols) + 4) + "|", flush=True)
    rows, notes = [], []
    for model in args.models:
        for k in args.samples:
            cmd = [sys.executable, __file__, "--size", args.size, "--device", args.device, "--diffusion", args.diffusion,
                   "--runtime", args.runtime,
                   "--child", json.dumps([model, k])] + (["--threads", str(args.threads)] if args.threads else []) + (
                ["--steps", str(steps)] if steps else [])
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                why = (p.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"| {model} | {k} | failed: {why} |", flush=True)
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"| {model} | {k} | " + " | ".join(f"{r[c]:.1f}" for c in cols)
                  + f" | {r['unet_calls']} | {r['peak_rss_gib']:.2f} |", flush=True)
            notes.append(f"{model} x{k}: U-Net and VAE in {r.get('latent_runtime')}, refiner in {r['refiner_runtime']}; nested {r['nested'] or '-'}; RSS after load {r['rss_after_load_gib']:.2f} GiB"
                         f"; reconstructor timings {r['reconstructor_timings']}"
                         + (f"; peak GPU {r['peak_gpu_gib']} GiB" if "peak_gpu_gib" in r else ""))
    print("\n" + "\n".join(notes))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
