"""Evaluate a model on validation cases: baselines, the VAE ceiling, medldm and its ablations, in one run.

Rows (method per case): the task's classical baselines; ``VAE(truth)`` (encode + decode the ground
truth: the latent ceiling); then medldm variants, each adding one piece:
``latent`` (diffusion, decoded) -> ``+DC`` -> ``+refiner`` -> ``+refiner+DC`` (the default output)
beside ``no diffusion`` (the default path decoding the encoded naive inverse, or a flow's start image, instead of a
latent sample) -> ``+latent DC`` (data consistency every few steps during sampling too). The default output is also
run with K samples for the uncertainty map and its calibration (Spearman std vs |error|).

``supervised``: the task's supervised U-Net baseline (``medldm.evaluation.supervised``), a row per case.
``fid``: an Inception feature network; adds one FID row per method (baselines, supervised, medldm
default) over all cases together, case "all cases" (FID needs many slices; see ``medldm.evaluation.fid``).
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medldm.evaluation import metrics as M
from medldm.evaluation.baselines import baselines_for
from medldm.evaluation.cases import Case
from medldm.evaluation.figures import case_figure
from medldm.sampling.reconstructor import Reconstructor
from medldm.sampling.slicewise import restore_slices
from medldm.evaluation.supervised import apply_supervised


def vae_ceiling(rec: Reconstructor, truth: np.ndarray) -> np.ndarray:
    """Encode and decode the ground truth slice-wise: the best any latent-only output can be."""
    t = torch.as_tensor(truth, dtype=torch.float32)
    norm = rec.config.normalisation.unfitted().fit(t)
    axis = rec.slice_axis
    slices = norm.forward(t).movedim(axis, 0)[:, None]
    out = restore_slices(rec.bundle, slices, samples=1, steps=1, seed=0, batch_size=16, refine=False,
                         use_diffusion=False, start=slices if rec.bundle.flow_start != "noise" else None)["decoded"]
    return norm.inverse(out[0, :, 0].movedim(0, axis)).numpy()


def variants(task: str, steps: int, default_use_diffusion: bool = True) -> dict[str, dict]:
    """The ablation rows' Reconstructor arguments; the default row names the row it equals (``same_as``)."""
    base = {"steps": steps, "samples": 1, "seed": 0}
    rows = {"medldm latent": {**base, "refine": False, "dc": False, "use_diffusion": True}}
    if task in ("recon", "sr"):
        rows["medldm latent+DC"] = {**base, "refine": False, "dc": True, "use_diffusion": True}
        rows["medldm +refiner"] = {**base, "refine": True, "dc": False, "use_diffusion": True}
    # the full path with the latent sample replaced by the VAE's encoding of its start image: what diffusion adds
    rows["medldm no diffusion"] = {**base, "refine": True, "dc": True, "use_diffusion": False}
    rows["medldm diffusion"] = {**base, "refine": True, "dc": True, "use_diffusion": True}
    rows["medldm (default)"] = {"same_as": "medldm diffusion" if default_use_diffusion else "medldm no diffusion"}
    if task in ("recon", "sr"):
        rows["medldm +latent opt"] = {**base, "refine": True, "dc": True, "latent_opt_steps": 10, "use_diffusion": True}
    if task == "recon":
        rows["medldm +latent DC"] = {**base, "refine": True, "dc": True, "latent_dc_every": 5, "use_diffusion": True}
    return rows


SUPERVISED_ROW = "supervised U-Net"
DEFAULT_ROW = "medldm (default)"


def evaluate_cases(rec: Reconstructor, cases: list[Case], out_dir: str | Path, steps: int = 20, samples: int = 4,
                   tracker=None, supervised: tuple | None = None, fid=None) -> list[dict]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    fid_methods = [*baselines_for(rec.task, rec.config.modality), *([SUPERVISED_ROW] if supervised else []), DEFAULT_ROW]
    kept: dict[str, list[np.ndarray]] = {m: [] for m in ["truth", *fid_methods]}  # FID is over all cases
    for case in cases:
        truth = case.truth.array[0].astype(np.float32)
        mask = M.foreground_mask(truth)
        outputs: dict[str, np.ndarray] = {}

        def add(method: str, pred: np.ndarray, seconds: float, **extra):
            outputs[method] = pred
            rows.append({"model": rec.config.name, "case": case.name, "method": method,
                         **{k: round(v, 4) for k, v in M.all_metrics(truth, pred, mask).items()},
                         "seconds": round(seconds, 2), **extra})
            r = rows[-1]  # a line per row on stderr: a whole evaluation takes minutes and otherwise says nothing
            print(f"{r['model']} {r['case']} {method}: {r['psnr']:.2f} dB / {r['ssim']:.3f} ({seconds:.1f} s)",
                  file=sys.stderr, flush=True)

        for name, fn in baselines_for(case.measurement.task, case.measurement.modality,
                                      case.measurement.meta.get("coils", 1)).items():
            t0 = time.time()
            add(name, fn(case.measurement), time.time() - t0)
        if supervised is not None:
            t0 = time.time()
            add(SUPERVISED_ROW, apply_supervised(*supervised, case.measurement), time.time() - t0)
        t0 = time.time()
        add("VAE(truth)", vae_ceiling(rec, truth), time.time() - t0)
        done: dict[str, dict] = {}
        for name, kw in variants(case.measurement.task, steps, rec.config.default_use_diffusion).items():
            if "same_as" in kw:  # the same call as an earlier row: its output and figures, under the default's name
                same = done[kw["same_as"]]
                add(name, outputs[kw["same_as"]], same["seconds"], residual=same["residual"])
                continue
            res = rec(case.measurement, **kw)
            add(name, res.volume.array[0], res.timings["total"], residual=res.residual)
            done[name] = rows[-1]
        res = rec(case.measurement, steps=steps, samples=samples, seed=0)
        std = res.uncertainty.array[0]
        mean = res.volume.array[0]
        add(f"medldm mean of {samples}", mean, res.timings["total"],
            spearman_std_error=round(M.uncertainty_calibration(std, mean - truth, mask), 4))
        fig = case_figure(truth, res.extras["naive_inverse"][0], outputs, std,
                          out_dir / "figures" / f"{rec.config.name}_{case.name.replace('/', '_')}.png",
                          title=f"{rec.config.name} - {case.name}")
        if tracker is not None:
            tracker.log_artifact(fig, "figures")
        if fid is not None:
            kept["truth"].append(truth)
            for m in fid_methods:
                if m in outputs:
                    kept[m].append(outputs[m])
    if fid is not None and cases:
        rows += fid_rows(rec.config.name, kept, fid)
    write_tables(rows, out_dir, stem=str(rec.config.name))
    if tracker is not None:
        for r in rows:
            key = f"{r['model']}/{r['case']}/{r['method']}".replace("+", "plus ")  # Tracker makes it a valid name
            tracker.log_metrics({f"{key}/{k}": r[k] for k in ("psnr", "ssim", "fid") if k in r})
        tracker.log_artifact(out_dir / f"{rec.config.name}.md", "tables")
        tracker.log_artifact(out_dir / f"{rec.config.name}.csv", "tables")
    return rows


def fid_rows(model_name, kept: dict[str, list[np.ndarray]], features) -> list[dict]:
    from medldm.evaluation.fid import VolumeFID

    vf = VolumeFID(kept["truth"], features)
    rows = []
    for method, preds in kept.items():
        if method == "truth":
            continue
        if len(preds) != len(kept["truth"]):
            raise ValueError(f"FID of {method!r}: {len(preds)} outputs for {len(kept['truth'])} cases")
        t0 = time.time()
        rows.append({"model": model_name, "case": "all cases", "method": method, "fid": round(vf(preds), 2),
                     "seconds": round(time.time() - t0, 2)})
    return rows


COLUMNS = ["model", "case", "method", "psnr", "ssim", "nmse", "psnr_fg", "fid", "seconds", "residual",
           "spearman_std_error"]


def markdown_table(rows: list[dict], columns: list[str] = COLUMNS) -> str:
    cols = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.2f}" if abs(v) >= 10 else f"{v:.3f}"
    return str(v)


def write_tables(rows: list[dict], out_dir: Path, stem: str) -> None:
    import json

    (out_dir / f"{stem}.md").write_text(markdown_table(rows))
    (out_dir / f"{stem}.json").write_text(json.dumps(rows, indent=2))  # the rows model cards are written from
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
