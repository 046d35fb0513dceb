"""CT projector benchmark (figures printed, not timed tests).

For each slice size and view count: the one-off build of the sparse system matrix (seconds, stored entries,
MB), then one projection plus back-projection of a batch of slices by the sparse matrix and by grid_sample
with its autograd transpose (ms), and the largest difference between the two paths. Last, the TV-POCS guide
of a ct-recon training batch (8 patches 96x96, 60/90/120 views drawn as training draws them), as the
refiner stage's guide workers make it.

    python benchmarks/ct_projector.py [--threads 1] [--slices 8] [--reps 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medldm.physics.ct_projector import Projector, n_detectors  # noqa: E402


def pair_ms(p: Projector, x: torch.Tensor, reps: int) -> float:
    p.backproject(p.radon(x))  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        p.backproject(p.radon(x))
    return 1000 * (time.perf_counter() - t) / reps


def geometry_rows(sizes, views, slices: int, reps: int) -> None:
    print("| slice | views | build s | entries | MB | sparse ms | grid_sample ms | speed-up | max |diff| |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        for v in views:
            theta = torch.arange(v, dtype=torch.float64) * (torch.pi / v)
            t = time.perf_counter()
            sp = Projector((n, n), theta, torch.float32, torch.device("cpu"), sparse=True)
            build = time.perf_counter() - t
            gr = Projector((n, n), theta, torch.float32, torch.device("cpu"), sparse=False)
            x = torch.rand((slices, 1, n, n), generator=torch.Generator().manual_seed(0))
            a, b = pair_ms(sp, x, reps), pair_ms(gr, x, reps)
            diff = float((sp.radon(x) - gr.radon(x)).abs().max())
            nnz = sp.matrix._nnz()
            mb = 2 * nnz * (4 + 8) / 2**20  # the matrix and its transpose: values and column indices
            print(f"| {n}^2 (D={n_detectors((n, n))}) | {v} | {build:.2f} | {nnz:,} | {mb:.0f} | {a:.1f} | {b:.1f} "
                  f"| {b / a:.1f}x | {diff:.1e} |")


def guide_seconds() -> float:
    from medldm.models.normalisation import Normalisation
    from medldm.physics.classical import guide_image
    from medldm.physics.registry import build_random_operator
    from medldm.training.refiner import projection

    rop = build_random_operator("recon", "CT", views=[60, 90, 120], I0_range=[1e5, 1e6], pixel_mm=0.957)
    g = torch.Generator().manual_seed(1)
    x = torch.rand((8, 1, 96, 96), generator=g) * 1500 - 1000
    ops = [rop.sample(i, x[i:i + 1]) for i in range(8)]
    ys = [op.forward(x[i:i + 1]) for i, op in enumerate(ops)]
    norm = Normalisation.for_modality("CT")
    cond = torch.cat([norm.forward(op.naive_inverse(y)) for op, y in zip(ops, ys)])
    t = time.perf_counter()
    guide_image("tv-pocs", cond, image_axes=(2, 3), project=projection(ops, ys, norm), scale=1.0)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (guide workers run one each)")
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
    ap.add_argument("--views", type=int, nargs="+", default=[60, 120])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.slices} slices per call\n")
    geometry_rows(args.sizes, args.views, args.slices, args.reps)
    print(f"\nTV-POCS guide of one ct-recon training batch (8 x 96^2, 30 iterations; the first call builds its geometries' matrices): "
          f"{guide_seconds():.2f} s")
    print(f"the same batch again: {guide_seconds():.2f} s")


if __name__ == "__main__":
    main()
