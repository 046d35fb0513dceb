"""How much multi-coil reconstruction loses to estimated coil maps (figures printed, not a test).

Each held-out MR volume (middle slices) becomes 8-coil k-space with phase, equispaced masks at fastMRI's centre
fractions, as in ``benchmarks/multicoil_recon.py`` (``--noise f``: complex Gaussian noise of std f x the 99.5th
percentile). CG-SENSE and TV-POCS then run three times on the same k-space: with the maps the simulation used, with
the maps direct calibration estimates from the centre lines, and with those maps fitted to every measured line (what
a file gets, ``as_measured``; the simulation's operator projects exactly, a file's takes soft steps, so TV-POCS's
true-maps column is a ceiling, not a like-for-like row). The gaps are what map estimation costs every method that
uses the maps (the parallel-imaging baselines and medldm alike). The map error (|S_est - S_true| over coils, after the one global
phase per slice that no measurement fixes) is printed by distance from the phase-encode edges of the field of view,
where the low-resolution calibration image blurs the object's border.

    python benchmarks/coil_maps.py [--slices 4] [--coils 8] [--accelerations 4 8] [--noise 0.0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medldm.errors import InputError  # noqa: E402
from medldm.evaluation import metrics as M  # noqa: E402
from medldm.evaluation.baselines import baselines_for  # noqa: E402
from medldm.evaluation.run import validation_volumes  # noqa: E402
from medldm.sampling.measurement import as_measured, simulate  # noqa: E402

CENTRE = {4: 0.08, 8: 0.04}  # fastMRI's centre fractions, as multicoil_recon.py
BANDS = (0.1, 0.25, 0.5)  # fractions of the phase-encode width from the nearer edge


def map_error_by_band(estimated: torch.Tensor, true: torch.Tensor, signal: np.ndarray) -> list[float]:
    """Mean map error over the signal in each band of distance from the phase-encode (Y) edges."""
    phase = torch.angle((estimated * true.conj()).sum(dim=(0, 1, 2)))  # one global phase per slice
    err = (estimated * torch.exp(-1j * phase) - true).abs().pow(2).sum(0).sqrt().numpy()  # (X, Y, Z)
    width = err.shape[1]
    edge = np.minimum(np.arange(width), width - 1 - np.arange(width)) / width
    out, lo = [], 0.0
    for hi in BANDS:
        band = signal & ((edge >= lo) & (edge < hi))[None, :, None]
        out.append(float(err[band].mean()) if band.any() else float("nan"))
        lo = hi
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datalist", default=str(ROOT / "data" / "datalist.json"))
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--accelerations", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--noise", type=float, default=0.0, help="k-space noise std, a fraction of the 99.5th percentile")
    a = ap.parse_args()
    bands = " | ".join(f"map error {int(100 * lo)}-{int(100 * hi)}% from edge (direct -> fitted)"
                       for lo, hi in zip((0.0, *BANDS[:-1]), BANDS))
    print(f"| case | PE lines | centre lines | CG-SENSE / TV-POCS, true maps | direct calibration | fitted | {bands} |")
    print("|---|---|---|---|---|---|" + "---|" * len(BANDS))
    tv = baselines_for("recon", "MR", coils=a.coils)["TV-POCS"]
    for name, vol in validation_volumes(a.datalist, "MR").items():
        mid = vol.array.shape[-1] // 2
        vol = vol.with_array(vol.array[..., mid - a.slices // 2: mid - a.slices // 2 + a.slices], vol.affine)
        truth = vol.array[0]
        fg = M.foreground_mask(truth)
        sigma = a.noise * float(np.percentile(truth, 99.5))
        for acc in a.accelerations:
            sim = simulate(vol, "recon", 0, operator="MultiCoilCartesian", coils=a.coils, mask_type="equispaced",
                           accelerations=[acc], center_fractions=[CENTRE.get(acc, 0.32 / acc)], phase=True,
                           sigma=sigma)
            try:
                direct, measured = as_measured(sim, map_fit_rounds=0), as_measured(sim)
            except InputError as exc:
                print(f"| {name}/{acc}x | skipped: {exc} |")
                continue
            scores = []
            for m in (sim, direct, measured):
                r = M.all_metrics(truth, m.operator.sense(m.y).abs()[0, 0].numpy(), fg)
                r2 = M.all_metrics(truth, tv(m), fg)
                scores.append(f"{r['psnr']:.2f} / {r2['psnr']:.2f}")
            true = sim.operator.maps_for(sim.y.shape[2:], torch.complex64, "cpu")[0]
            signal = truth > 0.1 * truth.max()
            estimated = [m.operator.maps_for(sim.y.shape[2:], torch.complex64, "cpu")[0] for m in (direct, measured)]
            errors = zip(*(map_error_by_band(e, true.expand_as(e), signal) for e in estimated))
            width = sim.y.shape[3]
            centre = measured.operator.maps_recipe.get("calibration_lines")
            print(f"| {name}/{acc}x | {width} | {centre} | {scores[0]} | {scores[1]} | {scores[2]} | "
                  + " | ".join(f"{d:.2f} -> {f:.2f}" for d, f in errors) + " |", flush=True)


if __name__ == "__main__":
    main()
