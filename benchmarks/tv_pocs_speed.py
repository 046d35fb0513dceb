"""TV-POCS on a whole volume: skimage's Chambolle each round against the dual carried over (figures printed).

``medldm.physics.classical.tv_pocs`` restarts Chambolle's dual every round and runs skimage to its stopping test
(constant planes skipped: skimage's own result for them; "skimage on every plane" is the reference before that);
``tv_pocs_warm`` carries the dual from round to round and takes 5 steps per round, all slices at once in torch.
All run mr-recon's 30 rounds (weight 0.02 of the 99.5th percentile) on the profile's realistic T1 volume
(benchmarks/profile_inference.py), undersampled 4x and 8x as the evaluation does, and end as the baseline does
(``consistent_nonnegative``). Prints seconds and PSNR / SSIM against the volume.

    python benchmarks/tv_pocs_speed.py [--size 181x217x181] [--accelerations 4 8]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from skimage.restoration import denoise_tv_chambolle

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from profile_inference import test_volume  # noqa: E402

from medldm.evaluation import metrics as M  # noqa: E402
from medldm.evaluation.cases import make_cases  # noqa: E402
from medldm.physics import classical  # noqa: E402
from medldm.physics.classical import tv_pocs, tv_pocs_warm  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="181x217x181")
    ap.add_argument("--accelerations", type=int, nargs="+", default=[4, 8])
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    vol = test_volume("MR", tuple(int(v) for v in args.size.split("x")))
    truth = vol.array[0]
    print("| volume | case | solver | seconds | PSNR dB | SSIM |\n|---|---|---|---|---|---|")
    for case in make_cases("recon", "MR", {"t1": vol}):
        if int(case.name.split("/")[-1].rstrip("x")) not in args.accelerations:
            continue
        m = case.measurement
        outputs = {}
        for name, solver in SOLVERS.items():
            t0 = time.perf_counter()
            x = outputs[name] = solver(m.naive_inverse().float(), lambda v: m.operator.data_consistency(v, m.y),
                                       image_axes=(2, 3))
            seconds = time.perf_counter() - t0
            out = m.operator.consistent_nonnegative(x, m.y)[0, 0].numpy()
            print(f"| {args.size} | {case.name} | {name} | {seconds:.1f} | {M.psnr(truth, out):.2f} | "
                  f"{M.ssim(truth, out):.3f} |", flush=True)
        same = torch.equal(outputs["skimage (tv_pocs)"], outputs["skimage on every plane"])
        print(f"| {args.size} | {case.name} | tv_pocs equals skimage on every plane | {same} | | |", flush=True)
    return 0


def tv_pocs_every_plane(x0, project, *, image_axes):
    """tv_pocs as it was before constant planes were skipped: skimage on every plane (the speed-up's reference)."""
    every_plane = lambda images, weight: classical.map_images(  # noqa: E731
        functools.partial(denoise_tv_chambolle, weight=weight, channel_axis=0), images)
    with mock.patch.object(classical, "tv_slices", every_plane):
        return tv_pocs(x0, project, image_axes=image_axes)


SOLVERS = {"skimage (tv_pocs)": tv_pocs, "skimage on every plane": tv_pocs_every_plane,
           "warm dual (tv_pocs_warm)": tv_pocs_warm}


if __name__ == "__main__":
    raise SystemExit(main())
