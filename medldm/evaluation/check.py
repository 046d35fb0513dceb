"""The small, fast validation figure each shipped model carries in training.json ("validation_check"),
re-computed by the test suite to prove the committed weights still give what the card says."""

from __future__ import annotations

from pathlib import Path

from medldm.evaluation import metrics as M
from medldm.evaluation.cases import SETTINGS, make_cases
from medldm.evaluation.run import validation_volumes
from medldm.sampling.reconstructor import Reconstructor

CHECK_VOLUME = {"MR": "mni152_t1_val_slab", "CT": "head_ct_val_slab"}


def check_spec(modality: str, task: str) -> dict:
    return {"volume": CHECK_VOLUME[modality], "crop": [96, 96, 12], "setting": next(iter(SETTINGS[(task, modality)])),
            "steps": 10, "seed": 0}


def run_check(rec: Reconstructor, datalist: str | Path, spec: dict) -> dict:
    modality, task = rec.config.modality, rec.task
    vols = validation_volumes(datalist, modality, tuple(spec["crop"]))
    vol = {spec["volume"]: vols[spec["volume"]]}
    case = next(c for c in make_cases(task, modality, vol, seed=spec["seed"]) if c.name.endswith("/" + spec["setting"]))
    res = rec(case.measurement, steps=spec["steps"], samples=1, seed=spec["seed"])
    truth = case.truth.array[0]
    return {**spec, "psnr": round(M.psnr(truth, res.volume.array[0]), 3), "ssim": round(M.ssim(truth, res.volume.array[0]), 4)}
