"""How well the Rician sigma is estimated from a noisy magnitude volume (figures printed, not a test).

For each held-out MR volume of the datalist (the MNI152 validation slab and the real ITK T1 subject; with
``--splits validation,test_ood`` also that subject's head with skull) and each noise level (sigma as a fraction
of the volume's max, as the evaluation sets it), Rician noise is added with a fixed seed, sigma is estimated
from the noisy volume alone (``estimate_rician_sigma``, what ``medldm reconstruct`` and the API use when
``sigma`` is not given), and the relative error is printed. ``--variants`` adds the cases without usable air,
where the foreground estimate takes over: the air zeroed after the noise (a masked export), and a central crop
holding tissue only.

    python benchmarks/noise_estimate.py [--levels 0.01,...,0.15] [--seeds 3] [--splits validation,test_ood] [--variants]
        [--json medldm/shipped/mr-denoise/noise_estimate.json]   # the rows the mr-denoise card shows
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medldm.data.transforms import load_datalist  # noqa: E402
from medldm.io import read_nifti  # noqa: E402
from medldm.physics.noise import RicianNoise, estimate_rician_sigma  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datalist", default=str(ROOT / "data/datalist.json"))
    ap.add_argument("--levels", default="0.01,0.02,0.03,0.05,0.075,0.1,0.125,0.15")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--splits", default="validation")
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--json", default=None, help="Also write the rows here (a model card shows them).")
    args = ap.parse_args(argv)
    levels = [float(v) for v in args.levels.split(",")]
    items = [i for split in args.splits.split(",") for i in load_datalist(args.datalist, split, "MR")]
    variants = {"as is": lambda noisy, clean: noisy}
    if args.variants:
        variants["air zeroed"] = lambda noisy, clean: noisy * (clean > 0)
        variants["tissue crop"] = lambda noisy, clean: noisy[..., tuple(slice(n // 4, n - n // 4) for n in noisy.shape[-3:])[0],
                                                             tuple(slice(n // 4, n - n // 4) for n in noisy.shape[-3:])[1], :]
    print("| volume | variant | sigma / max | estimated / true (mean over seeds) | worst relative error | seconds |")
    print("|---|---|---|---|---|---|")
    worst_all, rows = 0.0, []
    for item in items:
        vol = read_nifti(item["image"], modality="MR")
        clean = torch.from_numpy(np.asarray(vol.array, np.float32))[None]  # (1, 1, X, Y, Z)
        peak = float(clean.max())
        for (variant, make), level in ((v, lv) for v in variants.items() for lv in levels):
            ratios, t0 = [], time.time()
            for seed in range(args.seeds):
                noisy = make(RicianNoise(level * peak, seed).forward(clean)[0, 0], clean[0, 0])
                ratios.append(estimate_rician_sigma(noisy) / (level * peak))
            worst = max(abs(r - 1) for r in ratios)
            if variant == "as is":
                worst_all = max(worst_all, worst)
            rows.append({"volume": Path(item["image"]).name, "variant": variant, "sigma_over_max": level,
                         "mean_ratio": round(float(np.mean(ratios)), 4), "worst_error": round(worst, 4)})
            print(f"| {Path(item['image']).name} | {variant} | {level:g} | {np.mean(ratios):.3f} | {100 * worst:.1f}% "
                  f"| {(time.time() - t0) / args.seeds:.2f} |")
    print(f"\nworst relative error over all volumes and levels, as is: {100 * worst_all:.1f}%")
    if args.json:
        command = "python benchmarks/noise_estimate.py " + " ".join(a for a in (argv or sys.argv[1:]))
        Path(args.json).write_text(json.dumps({"command": command.strip(), "seeds": args.seeds, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
