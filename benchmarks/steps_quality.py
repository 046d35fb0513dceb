"""Quality per second against the number of sampler steps, to choose the default (figures printed, not a test).

Runs each model on the evaluation's held-out cases (same crop, simulated degradations and metrics as the model
cards) at several step counts, one sample, seed 0, and prints PSNR / SSIM against the truth and the seconds,
with ``use_diffusion=False`` (the VAE of the input, refiner, DC: no sampler steps at all) as the floor.

    python benchmarks/steps_quality.py [--models mr-recon mr-denoise mr-sr] [--steps 1 2 4 10 20] [--crop 128,128,16]
        [--runtime torch|openvino|openvino-bf16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medldm.evaluation import metrics as M  # noqa: E402
from medldm.evaluation.cases import make_cases  # noqa: E402
from medldm.evaluation.run import validation_volumes  # noqa: E402
from medldm.models.runtime import RUNTIMES  # noqa: E402
from medldm.sampling.reconstructor import Reconstructor  # noqa: E402


def rows_for(model: str, datalist: str, crop, steps_list: list[int], runtime: str = "torch") -> list[dict]:
    rec = Reconstructor.load(model, runtime=runtime)
    vols = validation_volumes(datalist, rec.config.modality, crop)
    rows = []
    for case in make_cases(rec.task, rec.config.modality, vols):
        truth = case.truth.array[0].astype(np.float32)
        for steps in [0, *steps_list]:  # 0: use_diffusion=False
            t0 = time.perf_counter()
            res = rec(case.measurement, steps=max(steps, 1), samples=1, seed=0, use_diffusion=steps > 0)
            seconds = time.perf_counter() - t0
            out = res.volume.array[0]
            rows.append({"model": model, "case": case.name, "steps": steps or "no diffusion",
                         "psnr": M.psnr(truth, out), "ssim": M.ssim(truth, out), "seconds": seconds})
            print(f"| {model} | {case.name} | {rows[-1]['steps']} | {rows[-1]['psnr']:.2f} | {rows[-1]['ssim']:.3f} "
                  f"| {seconds:.1f} |", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mr-recon", "mr-denoise", "mr-sr"])
    ap.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 10, 20])
    ap.add_argument("--crop", default="128,128,16")
    ap.add_argument("--datalist", default=str(ROOT / "data" / "datalist.json"))
    ap.add_argument("--runtime", default="torch", choices=RUNTIMES, help="what runs the networks (medldm.models.runtime; the "
                    "evaluation's crops are too small for auto to convert: name openvino or openvino-bf16 to see them)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    crop = tuple(int(v) for v in args.crop.split(","))
    print("| model | case | steps | PSNR dB | SSIM | seconds |\n|---|---|---|---|---|---|")
    for model in args.models:
        rows_for(model, args.datalist, crop, args.steps, args.runtime)


if __name__ == "__main__":
    main()
