"""Multi-coil k-space: medldm against parallel-imaging baselines on held-out data (figures printed, not a test).

The held-out MNI slab (its full 197 x 233 plane: a 128-pixel crop leaves 5-10 calibration lines, too few to
calibrate coils from) becomes 8-coil k-space (birdcage maps, smooth random image phase, equispaced masks,
fastMRI centre fractions 8% / 4%), then is read as a file would be (``as_measured``: maps and phase estimated
from the centre lines, then fitted to the measured lines ``--map-fit-rounds`` times). ``--noise f`` adds complex
Gaussian noise of std f x the slab's 99.5th percentile to every measured sample (0: noise-free). Rows: zero-filled
RSS, CG-SENSE and TV-SENSE (sigpy, the same maps), medldm's default output and its ablations; PSNR / SSIM as the
model cards compute them, seconds, data residual.

    python benchmarks/multicoil_recon.py [--model mr-recon [FOLDER ...]] [--slices 8] [--coils 8] [--accelerations 4 8]
        [--noise 0.0] [--map-fit-rounds N] [--baselines "CG-SENSE" "TV-POCS" ...] [--variants "medldm (default)" ...]
        [--json OUT]

`--json OUT` also writes the rows (with the command and the day): `pipelines/write_model_cards.py --multicoil OUT`
puts them in the model card.

Several models are run on the same measurements (the baselines once), e.g. a shipped model and a retrained one.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medldm.errors import InputError  # noqa: E402
from medldm.evaluation import metrics as M  # noqa: E402
from medldm.evaluation.baselines import baselines_for  # noqa: E402
from medldm.evaluation.evaluate import markdown_table  # noqa: E402
from medldm.evaluation.run import validation_volumes  # noqa: E402
from medldm.sampling.measurement import as_measured, simulate  # noqa: E402
from medldm.sampling.reconstructor import Reconstructor  # noqa: E402

CENTRE = {4: 0.08, 8: 0.04}  # fastMRI's centre fractions
VARIANTS = {"medldm (default)": {}, "medldm no diffusion": {"use_diffusion": False},
            "medldm latent+DC": {"refine": False}, "medldm +refiner, no DC": {"dc": False}}


def rows_for(models: list[str], datalist: str, slices: int, coils: int, accelerations: list[int],
             baselines: list[str] | None = None, variants: list[str] | None = None, noise: float = 0.0,
             map_fit_rounds: int | None = None) -> list[dict]:
    recs = {model: Reconstructor.load(model) for model in models}
    chosen = {k: v for k, v in VARIANTS.items() if variants is None or k in variants}
    rows = []
    for name, vol in validation_volumes(datalist, "MR").items():
        mid = vol.array.shape[-1] // 2
        vol = vol.with_array(vol.array[..., mid - slices // 2: mid - slices // 2 + slices], vol.affine)
        truth = vol.array[0]
        mask = M.foreground_mask(truth)
        sigma = noise * float(np.percentile(truth, 99.5))
        for acc in accelerations:
            sim = simulate(vol, "recon", 0, operator="MultiCoilCartesian", coils=coils, mask_type="equispaced",
                           accelerations=[acc], center_fractions=[CENTRE.get(acc, 0.32 / acc)], phase=True,
                           sigma=sigma)
            t0 = time.perf_counter()
            try:
                m = as_measured(sim, map_fit_rounds)
            except InputError as exc:  # e.g. the ITK subject's 62-line phase-encode axis leaves 2 centre lines at 8x
                print(f"{name} {acc}x: skipped: {exc}", flush=True)
                continue
            print(f"{name} {acc}x: maps estimated in {time.perf_counter() - t0:.1f} s", flush=True)

            def add(model, method, pred, seconds, residual=None):
                case = f"{name}/{coils}coil-{acc}x" + (f"-noise{noise:g}" if noise else "")
                rows.append({"model": model, "case": case, "method": method,
                             **{k: round(v, 4) for k, v in M.all_metrics(truth, pred, mask).items()},
                             "seconds": round(seconds, 1), "residual": residual})
                print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)

            for method, fn in baselines_for("recon", "MR", coils=coils).items():
                if baselines is None or method in baselines:
                    t0 = time.perf_counter()
                    add("-", method, fn(m), time.perf_counter() - t0)
            for model, rec in recs.items():
                for method, kw in chosen.items():
                    res = rec(m, **kw)
                    add(model, method, res.volume.array[0], res.timings["total"], res.residual)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["mr-recon"], help="shipped names or model folders")
    ap.add_argument("--datalist", default=str(ROOT / "data" / "datalist.json"))
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--accelerations", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--noise", type=float, default=0.0, help="k-space noise std, a fraction of the 99.5th percentile")
    ap.add_argument("--map-fit-rounds", type=int, default=None, help="map fits after direct calibration (default: "
                    "the library's; 0: direct calibration alone)")
    ap.add_argument("--baselines", nargs="+", default=None, help="a subset of the baselines (default: all)")
    ap.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), help="a subset of medldm's rows")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here (for the model cards)")
    a = ap.parse_args()
    known = baselines_for("recon", "MR", coils=a.coils)
    if a.baselines and set(a.baselines) - set(known):  # a misspelt name would silently drop its row
        ap.error(f"unknown baseline(s) {sorted(set(a.baselines) - set(known))}; choose from {list(known)}")
    rows = rows_for(a.model, a.datalist, a.slices, a.coils, a.accelerations, a.baselines, a.variants, a.noise,
                    a.map_fit_rounds)
    print(markdown_table(rows))
    if a.json:
        command = "python benchmarks/multicoil_recon.py " + shlex.join(sys.argv[1:])
        day = time.strftime("%Y-%m-%d", time.gmtime())
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"command": command, "measured": day, "slices": a.slices, "noise": a.noise,
                                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
