"""Train, evaluate and install the shipped default models (mr-recon, mr-denoise, mr-sr, ct-denoise, ct-recon, ct-sr).

    python pipelines/train_default_models.py [--only mr-recon ...] [--minutes M] [--skip-train]

Stages per model: VAE (shared per modality; reused when runs/vae-<modality>/model exists) -> latent
diffusion + refiner -> evaluation on the held-out validation volumes (centre crops) -> the model folder,
float16 weights and a model card, copied into medldm/shipped/<name>/. Runs on CPU in ~1.5 h in total.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medldm.config import load_config  # noqa: E402
from medldm.evaluation.cases import make_cases  # noqa: E402
from medldm.evaluation.check import check_spec, run_check  # noqa: E402
from medldm.evaluation.evaluate import evaluate_cases  # noqa: E402
from medldm.evaluation.run import validation_volumes  # noqa: E402
from medldm.models.bundle import load_bundle, save_bundle  # noqa: E402
from medldm.models.card import model_card  # noqa: E402
from medldm.sampling.reconstructor import SHIPPED_DIR, Reconstructor  # noqa: E402

MODELS = {"mr-recon": "MR", "mr-denoise": "MR", "mr-sr": "MR", "ct-denoise": "CT", "ct-recon": "CT", "ct-sr": "CT"}
EVAL_CROP = (128, 128, 16)  # centre crops keep the evaluation of a model to a few minutes on 2 cores


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--minutes", type=float, default=None, help="Override train.max_minutes of the LDM configs.")
    ap.add_argument("--skip-train", action="store_true", help="Only evaluate and install existing runs.")
    ap.add_argument("--steps", type=int, default=10, help="Sampling steps in the evaluation.")
    args = ap.parse_args(argv)
    from medldm.training.ldm import train_ldm
    from medldm.training.vae import train_vae

    for name in args.only:
        modality = MODELS[name]
        vae_dir = ROOT / "runs" / f"vae-{modality.lower()}"
        if not (vae_dir / "model" / "model.json").is_file() and not args.skip_train:
            train_vae(load_config(ROOT / "configs" / f"vae-{modality.lower()}-cpu.yaml", "vae"), vae_dir)
        cfg_path = ROOT / "configs" / f"ldm-{name}-cpu.yaml"
        over = {"train.max_minutes": args.minutes} if args.minutes else {}
        cfg = load_config(cfg_path, "ldm", over)
        run_dir = ROOT / "runs" / f"ldm-{name}"
        if not args.skip_train:
            train_ldm(cfg, run_dir, resume=True)
        install(name, run_dir / "model", cfg_path, args.steps)


def install(name: str, model_dir: Path, cfg_path: Path, steps: int) -> Path:
    t0 = time.time()
    rec = Reconstructor.load(model_dir)
    vols = validation_volumes(ROOT / "data" / "datalist.json", rec.meta["modality"], EVAL_CROP)
    out = ROOT / "outputs" / "shipped-eval"
    from medldm.evaluation.run import supervised_baseline

    rows = evaluate_cases(rec, make_cases(rec.task, rec.meta["modality"], vols), out, steps=steps, samples=2,
                          supervised=supervised_baseline(name))
    bundle = load_bundle(model_dir)
    default = [r for r in rows if r["method"] == "medldm (default)"]
    bundle.meta["metrics"] = {**bundle.meta.get("metrics", {}),
                              **{f"val_{r['case']}_{k}".replace("/", "_"): r[k] for r in default for k in ("psnr", "ssim")}}
    dest = SHIPPED_DIR / name
    tmp = dest.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    command = f"python pipelines/train_default_models.py --only {name}   # configs: {cfg_path.relative_to(ROOT)}"
    machine = f"{platform.machine()} CPU, 2 cores (torch CPU build)"
    save_bundle(bundle, tmp, half=True)
    # the small check the test suite re-runs on the float16 weights as committed
    check = run_check(Reconstructor.load(tmp), ROOT / "data" / "datalist.json", check_spec(rec.meta["modality"], rec.task))
    meta = json.loads((tmp / "model.json").read_text())
    meta["validation_check"] = check
    (tmp / "model.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    (tmp / "README.md").write_text(model_card(meta, rows, command, machine))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    card_path = ROOT / "data_cards" / f"model-{name}.md"
    shutil.copy(dest / "README.md", card_path)
    (out / f"{name}-rows.json").write_text(json.dumps(rows, indent=2))
    print(f"installed {name} -> {dest} ({time.time() - t0:.0f} s evaluation)")
    return dest


if __name__ == "__main__":
    main()
