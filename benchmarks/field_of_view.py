"""Does the output depend on the field of view? The held-out crops with and without air added along the readout.

Each held-out MR crop (the evaluation's, 128x128x16) is reconstructed from simulated 4x k-space (the demo's mask) as
it is and zero-padded to twice its readout length, and PSNR / SSIM are taken on the same (central) voxels. The
two differ by what sees the whole plane: the intensity normalisation (a percentile of the naive inverse, which air
moves), the guide and the networks at the crop's edges. Figures printed, not a test.

    python benchmarks/field_of_view.py [--model mr-recon] [--pad 0.5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medldm.evaluation import metrics as M  # noqa: E402
from medldm.evaluation.run import validation_volumes  # noqa: E402
from medldm.io.volume import Volume  # noqa: E402
from medldm.sampling.measurement import simulate  # noqa: E402
from medldm.sampling.reconstructor import Reconstructor  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mr-recon")
    ap.add_argument("--pad", type=float, default=0.5, help="air added on each side, as a fraction of the readout")
    ap.add_argument("--datalist", default=str(ROOT / "data" / "datalist.json"))
    args = ap.parse_args()
    rec = Reconstructor.load(args.model)
    print("| case | as cropped | readout padded with air |\n|---|---|---|")
    for name, vol in validation_volumes(args.datalist, "MR", (128, 128, 16)).items():
        truth = vol.array[0]
        pad = int(round(args.pad * truth.shape[0]))
        cells = []
        for p in (0, pad):
            big = np.zeros((truth.shape[0] + 2 * p, *truth.shape[1:]), np.float32)
            big[p:p + truth.shape[0]] = truth
            m = simulate(Volume(big[None], np.eye(4), "MR"), "recon", 0, accelerations=[4], center_fractions=[0.08])
            out = rec(m, samples=1, seed=0).volume.array[0][p:p + truth.shape[0]]
            cells.append(f"{M.psnr(truth, out):.2f} / {M.ssim(truth, out):.3f}")
        print(f"| {name} 4x | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
