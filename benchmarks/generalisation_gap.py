"""How much of a learned model's gain survives on anatomy it never saw (figures printed, not a test).

Every MR training volume is one anatomy: the MNI152 template outside its validation slab, and synthetic
subjects warped from it. A network can learn that anatomy's detail instead of the physics; it then gains
on training crops and loses on held-out ones. This runs the same evaluation code path (centre crop ->
simulated degradation with the evaluation's settings -> output -> PSNR against the truth) on training
volumes and on the validation volumes, for the task's naive inverse, the supervised U-Net baseline and
the medldm default output, and prints the gain over the naive inverse per split.

    python benchmarks/generalisation_gap.py --model mr-sr [--train-volumes 4] [--crop 128,128,48] [--steps 10]

(2026-11-26, by the same code path, not this script: a supervised SR U-Net trained 6 min without
augmentation on 96x48 patches gained +2.6 to +9.4 dB on 128x128x48 training crops and lost 0.2 to 6.1 dB on
the 128x128x16 held-out crops of the evaluation.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medldm.data.transforms import load_datalist  # noqa: E402
from medldm.evaluation import metrics as M  # noqa: E402
from medldm.evaluation.cases import crop_centre, make_cases  # noqa: E402
from medldm.evaluation.run import supervised_baseline, validation_volumes  # noqa: E402
from medldm.io.nifti import read_nifti  # noqa: E402
from medldm.sampling.reconstructor import Reconstructor  # noqa: E402
from medldm.evaluation.supervised import apply_supervised  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mr-sr", help="Shipped model name or model folder.")
    ap.add_argument("--datalist", default=str(ROOT / "data" / "datalist.json"))
    ap.add_argument("--train-volumes", type=int, default=4, help="Training volumes to crop (evenly spaced in the list).")
    ap.add_argument("--crop", default="128,128,48")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    rec = Reconstructor.load(args.model)
    crop = tuple(int(v) for v in args.crop.split(","))
    modality = rec.config.modality
    items = load_datalist(args.datalist, "training", modality)
    picks = [items[i] for i in np.linspace(0, len(items) - 1, min(args.train_volumes, len(items))).astype(int)]
    splits = {"training": {Path(it["image"]).name.split(".")[0]: crop_centre(read_nifti(it["image"], modality=modality), crop)
                           for it in picks},
              "held-out": validation_volumes(args.datalist, modality, crop)}
    sup = supervised_baseline(rec.config.name)
    print(f"| split | case | naive dB | supervised U-Net (gain) | medldm default (gain) |\n|---|---|---|---|---|")
    gains = {}
    for split, vols in splits.items():
        for case in make_cases(rec.task, modality, vols):
            truth = case.truth.array[0].astype(np.float32)
            mask = M.foreground_mask(truth)
            psnr = lambda pred: M.all_metrics(truth, pred, mask)["psnr"]  # noqa: E731
            naive = psnr(case.measurement.naive_inverse().float()[0, 0].numpy())
            ours = psnr(rec(case.measurement, steps=args.steps, samples=1, seed=0).volume.array[0])
            s = psnr(apply_supervised(*sup, case.measurement)) if sup else float("nan")
            gains.setdefault(split, []).append((s - naive, ours - naive))
            print(f"| {split} | {case.name} | {naive:.2f} | {s:.2f} ({s - naive:+.2f}) | {ours:.2f} ({ours - naive:+.2f}) |",
                  flush=True)
    for split, g in gains.items():
        g = np.array(g)
        print(f"mean gain over the naive inverse, {split}: supervised {g[:, 0].mean():+.2f} dB, medldm {g[:, 1].mean():+.2f} dB")


if __name__ == "__main__":
    main()
