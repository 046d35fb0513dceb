"""Multi-coil k-space at a scanner's size: seconds of the SENSE solvers and of a whole mr-recon run (issue #25).

The repository's real head (data/mr/itk_t1_brain.nii.gz, as ``profile_inference.py`` makes it) becomes --coils-coil
k-space with a smooth phase, an equispaced --acceleration mask with fastMRI's centre fraction, then is read back
as a file would be (maps estimated from the centre lines and fitted ``--map-fit-rounds`` times, timed; soft data
consistency). Printed, same process, same inputs: CG-SENSE (the naive inverse), one soft data-consistency step and
the 32 rounds of ``consistent_nonnegative`` (every multi-coil reconstruction ends with them), each by the generic
CG / CGLS on the operator's ``A`` and ``adjoint`` (what ran before the hybrid-space solvers) and by
``MultiCoilCartesian`` itself, with the largest difference; then, unless --no-model, the whole default mr-recon
reconstruction with its stages.

    python benchmarks/multicoil_speed.py [--size 320x320x16] [--coils 16] [--acceleration 4] [--no-model]
        [--no-solvers] [--oversampled-file] [--map-fit-rounds N]

``--oversampled-file`` instead writes the k-space of the head padded to twice the readout as a fastMRI file whose
header keeps the central --size (fastMRI brain: 640 encoded, 320 reconstructed) and reconstructs it twice: as read
(the readout cropped before anything runs) and over the whole encoded field of view with only the output cropped
(what ran before), printing seconds and how far the two outputs are apart.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import profile_inference as P  # noqa: E402
from medldm.evaluation import metrics as M  # noqa: E402
from medldm.physics._common import cg, cgls  # noqa: E402
from medldm.physics.base import NONNEGATIVE_ROUNDS  # noqa: E402
from medldm.physics.fft import fftnc, ifftnc  # noqa: E402
from medldm.sampling.measurement import as_measured, simulate  # noqa: E402

CENTRE = {4: 0.08, 8: 0.04}


def generic(op):
    """(name, as they ran before: CG / CGLS on the operator's own A and adjoint in its (B, C, X, Y, Z) layout, as
    the operator runs them now) for each solver."""
    w = op.projection_weight

    def soft(x, y):
        return cg(lambda v: v + w * op.adjoint(op.A(v)), x + w * op.adjoint(y), x, iters=op.dc_iters)

    def sense(y):
        dims, m, maps = op._parts(y)
        fwd = lambda z: fftnc(z * maps, dims) * m  # noqa: E731
        adj = lambda k: (ifftnc(k * m, dims) * maps.conj()).sum(1, keepdim=True)  # noqa: E731
        return cgls(fwd, adj, y, like=adj(y), iters=op.SENSE_ITERATIONS)

    def rounds(x, y):
        for _ in range(NONNEGATIVE_ROUNDS):
            x = soft(x.clamp(min=0), y)
        return x.clamp(min=0)

    return [("CG-SENSE (naive inverse)", lambda y: sense(y).abs(), lambda y: op.sense(y).abs()),
            ("one soft DC step", soft, op.data_consistency),
            (f"consistent_nonnegative ({NONNEGATIVE_ROUNDS} rounds)", rounds, op.consistent_nonnegative)]


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def solver_table(op, y) -> None:
    print("| solver | generic CG on A / adjoint (s) | hybrid space (s) | speed-up | largest difference |\n"
          "|---|---|---|---|---|")
    x0 = None  # the naive inverse, where the data-consistency rows start
    for name, old, new in generic(op):
        inputs = (y,) if x0 is None else (x0, y)
        a, t_old = timed(old, *inputs)
        b, t_new = timed(new, *inputs)
        scale = float(a.abs().max())
        print(f"| {name} | {t_old:.1f} | {t_new:.1f} | {t_old / t_new:.1f}x | {float((a - b).abs().max()) / scale:.1e} "
              "of the max |", flush=True)
        x0 = a if x0 is None else x0

HEADER = ('<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>'
          '<encodedSpace><matrixSize><x>{ex}</x><y>{y}</y><z>1</z></matrixSize><fieldOfView_mm><x>{ex}</x><y>{y}</y>'
          '<z>1</z></fieldOfView_mm></encodedSpace><reconSpace><matrixSize><x>{x}</x><y>{y}</y><z>1</z></matrixSize>'
          '<fieldOfView_mm><x>{x}</x><y>{y}</y><z>1</z></fieldOfView_mm></reconSpace></encoding></ismrmrdHeader>')


def oversampled_file(truth, coils: int, acceleration: int) -> None:
    import tempfile

    import h5py
    import numpy as np

    from medldm.io.volume import Volume
    from medldm.sampling.measurement import from_kspace, from_kspace_file
    from medldm.sampling.reconstructor import Reconstructor

    x, y, z = truth.spatial_shape
    head = np.zeros((1, 2 * x, y, z), np.float32)
    head[:, x // 2:x // 2 + x] = truth.array
    m0 = simulate(Volume(head, np.eye(4), "MR"), "recon", 0, operator="MultiCoilCartesian", coils=coils, phase=True,
                  accelerations=[acceleration], center_fractions=[CENTRE[acceleration]], mask_type="equispaced")
    kspace = m0.y[0].permute(3, 0, 1, 2).numpy()
    rec = Reconstructor.load("mr-recon")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "oversampled.h5"
        with h5py.File(path, "w") as f:
            f["kspace"] = kspace
            f["ismrmrd_header"] = HEADER.format(ex=2 * x, x=x, y=y).encode()
        t0 = time.perf_counter()
        cropped = rec(from_kspace_file(path), samples=1, seed=0)
        t_crop = time.perf_counter() - t0
    t0 = time.perf_counter()
    whole = from_kspace(kspace, None, np.eye(4), "MR")
    whole.meta["recon_matrix"] = (x, y)  # the output cropped only at the end, as before
    full = rec(whole, samples=1, seed=0)
    t_full = time.perf_counter() - t0
    a, b, t = cropped.volume.array[0], full.volume.array[0], truth.array[0]
    print(f"{2 * x}x{y}x{z} encoded, {x}x{y} kept, {coils} coils, {acceleration}x; mr-recon, 1 sample:\n"
          f"- readout cropped first: {t_crop:.1f} s, PSNR {M.psnr(t, a):.2f} dB\n"
          f"- whole field of view, output cropped: {t_full:.1f} s, PSNR {M.psnr(t, b):.2f} dB\n"
          f"- largest difference {float(np.abs(a - b).max()) / float(np.abs(b).max()):.1e} of the max")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="320x320x16", help="XxYxZ voxels at 1 mm (readout X, phase encode Y)")
    ap.add_argument("--coils", type=int, default=16)
    ap.add_argument("--acceleration", type=int, default=4, choices=sorted(CENTRE))
    ap.add_argument("--no-model", action="store_true", help="time the solvers only")
    ap.add_argument("--no-solvers", action="store_true", help="time the reconstruction only (its peak RSS alone)")
    ap.add_argument("--oversampled-file", action="store_true", help="time a file whose readout is oversampled")
    ap.add_argument("--map-fit-rounds", type=int, default=None, help="map fits after direct calibration (default: "
                    "the library's; 0: direct calibration alone)")
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.size.split("x"))
    truth = P.test_volume("MR", shape)
    if args.oversampled_file:
        return oversampled_file(truth, args.coils, args.acceleration)
    sim = simulate(truth, "recon", 0, operator="MultiCoilCartesian", coils=args.coils, phase=True,
                   accelerations=[args.acceleration], center_fractions=[CENTRE[args.acceleration]], mask_type="equispaced")
    m, t_maps = timed(as_measured, sim, args.map_fit_rounds)
    op, y = m.operator, m.y
    print(f"{args.size}, {args.coils} coils, {args.acceleration}x, {torch.get_num_threads()} threads; read as a file "
          f"(maps: {op.maps_recipe['coil_maps']}) in {t_maps:.1f} s\n")
    if not args.no_solvers:
        solver_table(op, y)
    if args.no_model:
        return
    from medldm.sampling.reconstructor import Reconstructor

    rec = Reconstructor.load("mr-recon")
    t0 = time.perf_counter()
    res = rec(m, samples=1, seed=0)
    total = time.perf_counter() - t0
    stages = ", ".join(f"{k} {v:.1f}" for k, v in res.timings.items() if k != "total")
    print(f"\nmr-recon, 1 sample, default settings: {total:.1f} s ({stages}); PSNR "
          f"{M.psnr(truth.array[0], res.volume.array[0]):.2f} dB; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
