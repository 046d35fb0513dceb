"""Does the uncertainty map point at the errors? Spearman(per-voxel std over K samples, |error|) on held-out cases.

For each model and each of its task's evaluation cases (the held-out volumes, crops, degradations and seeds of
`medldm evaluate`), K samples are drawn at the model's default steps and the foreground Spearman correlation of
their standard deviation with the mean's absolute error is printed. Issue #24 asks for >= 0.5 on the real ITK
subject with 8 samples. Figures printed, not a test.

    python benchmarks/uncertainty_calibration.py --model mr-recon [--samples 8] [--crop 128,128,16] [--cases itk]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medldm.evaluation import metrics as M  # noqa: E402
from medldm.evaluation.cases import make_cases  # noqa: E402
from medldm.evaluation.run import validation_volumes  # noqa: E402
from medldm.sampling.reconstructor import Reconstructor  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", required=True)
    ap.add_argument("--datalist", default=str(ROOT / "data" / "datalist.json"))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="default: each model's")
    ap.add_argument("--crop", default="128,128,16")
    ap.add_argument("--cases", default="", help="only cases whose name contains this")
    args = ap.parse_args()
    crop = tuple(int(c) for c in args.crop.split(","))
    print("| model | case | PSNR of the mean | mean std | Spearman(std, abs error) | seconds |\n"
          "|---|---|---|---|---|---|")
    for name in args.model:
        rec = Reconstructor.load(name)
        vols = validation_volumes(args.datalist, rec.config.modality, crop)
        for case in make_cases(rec.task, rec.config.modality, vols):
            if args.cases not in case.name:
                continue
            truth = case.truth.array[0]
            mask = M.foreground_mask(truth)
            t0 = time.time()
            res = rec(case.measurement, steps=args.steps, samples=args.samples, seed=0)
            mean, std = res.volume.array[0], res.uncertainty.array[0]
            rho = M.uncertainty_calibration(std, mean - truth, mask)
            print(f"| {name} | {case.name} | {M.psnr(truth, mean):.2f} | {std[mask].mean():.4g} | {rho:.3f} | "
                  f"{time.time() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main()
