"""`medldm evaluate`: every requested model on its task's held-out cases, one table and one MLflow run."""

from __future__ import annotations

from pathlib import Path

from medldm.data.transforms import load_datalist
from medldm.evaluation.cases import crop_centre, make_cases
from medldm.evaluation.evaluate import evaluate_cases, markdown_table, write_tables
from medldm.io.nifti import read_nifti
from medldm.sampling.reconstructor import Reconstructor, shipped_models
from medldm.tracking import Tracker


def validation_volumes(datalist: str | Path, modality: str, crop: tuple[int, int, int] | None = None,
                       max_volumes: int | None = None) -> dict:
    items = load_datalist(datalist, "validation", modality, max_volumes)
    out = {}
    for item in items:
        vol = read_nifti(item["image"], modality=modality)
        out[Path(item["image"]).name.split(".")[0]] = crop_centre(vol, crop)
    return out


def supervised_baseline(model_name: str | None, device: str | None = None) -> tuple | None:
    """(net, meta) of the installed supervised U-Net for a model name, or None."""
    from medldm.evaluation.supervised import SUPERVISED_DIR, load_supervised

    folder = SUPERVISED_DIR / str(model_name)
    return load_supervised(folder, device) if (folder / "model.json").is_file() else None


def evaluate_models(models: list[str], datalist: str | Path, out_dir: str | Path, *, steps: int = 20, samples: int = 4,
                    crop: tuple[int, int, int] | None = None, max_volumes: int | None = None, tracking: bool = True,
                    device: str | None = None, fid: bool = False, supervised: bool = True) -> list[dict]:
    """``supervised``: add the supervised U-Net row where a baseline for the model is installed
    (``medldm/shipped/supervised/<model name>``); ``fid``: FID rows (needs the optional Inception weights)."""
    out_dir = Path(out_dir)
    models = models or shipped_models()
    features = None
    if fid:
        from medldm.evaluation.fid import InceptionFeatures

        features = InceptionFeatures()  # FIDUnavailable, with the install command, before any work
    tracker = Tracker(tracking, experiment="medldm-evaluation").start(
        "evaluate", params={"models": ",".join(models), "steps": steps, "samples": samples, "crop": str(crop)},
        tags={"medldm.stage": "evaluation"})
    rows: list[dict] = []
    try:
        for name in models:
            rec = Reconstructor.load(name, device=device)
            vols = validation_volumes(datalist, rec.config.modality, crop, max_volumes)
            cases = make_cases(rec.task, rec.config.modality, vols)
            base = supervised_baseline(rec.config.name, device) if supervised else None
            rows += evaluate_cases(rec, cases, out_dir, steps=steps, samples=samples, tracker=tracker,
                                   supervised=base, fid=features)
        write_tables(rows, out_dir, stem="evaluation")
        tracker.log_artifact(out_dir / "evaluation.md", "tables")
        tracker.log_artifact(out_dir / "evaluation.csv", "tables")
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    print(markdown_table(rows))
    return rows
