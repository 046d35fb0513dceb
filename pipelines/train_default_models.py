"""Train, evaluate and install the shipped default models (mr-recon, mr-denoise, mr-sr, ct-denoise, ct-recon, ct-sr).

    python pipelines/train_default_models.py [--only mr-recon ...] [--minutes M] [--skip-train]
    python pipelines/train_default_models.py --profile gpu --only mr-recon mr-denoise mr-sr [--vae-minutes M]

Stages per model: VAE (shared per modality; reused when <runs>/vae-<modality>/model exists) -> latent
diffusion + refiner -> (refiner_stage.enabled) the refiner retrained on sampler outputs -> evaluation on the held-out validation volumes (centre crops) -> the model folder,
float16 weights and a model card, copied into medldm/shipped/<name>/. The cpu profile (configs/*-cpu.yaml,
runs/) takes ~1.5 h on 2 cores; the gpu profile (configs/*-gpu.yaml, runs/gpu/: larger networks, batches
of 32) is meant for one CUDA GPU, where the LDMs train in minutes. ``--no-install`` stops after training
(e.g. on a rented GPU machine; install later with --skip-train where the data and the CPU time are).
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

from medldm.errors import ModelError  # noqa: E402
from medldm.config import load_config  # noqa: E402
from medldm.evaluation.cases import make_cases  # noqa: E402
from medldm.evaluation.check import check_spec, run_check  # noqa: E402
from medldm.evaluation.evaluate import evaluate_cases  # noqa: E402
from medldm.evaluation.run import validation_volumes  # noqa: E402
from medldm.models.bundle import load_bundle, save_bundle  # noqa: E402
from medldm.models.model_config import TrainingRecord, read_model_files, read_record, write_model_files  # noqa: E402
from medldm.evaluation.card import MULTICOIL_FILE, NOISE_FILE, ROWS_FILE, SPEED_FILE, model_card, stored  # noqa: E402
from medldm.sampling.reconstructor import DEFAULT_MODELS as MODELS, SHIPPED_DIR, Reconstructor  # noqa: E402

EVAL_CROP = (128, 128, 16)  # centre crops keep the evaluation of a model to a few minutes on 2 cores


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--minutes", type=float, default=None, help="Override train.max_minutes of the LDM configs.")
    ap.add_argument("--skip-train", action="store_true",
                    help="Reuse the VAE and LDM runs (a refiner stage the config enables and runs/ lacks still trains).")
    ap.add_argument("--steps", type=int, default=10, help="Sampling steps in the evaluation.")
    ap.add_argument("--profile", choices=["cpu", "gpu"], default="cpu", help="Which configs/*-<profile>.yaml to train.")
    ap.add_argument("--vae-minutes", type=float, default=None, help="Override train.max_minutes of the VAE config.")
    ap.add_argument("--no-install", action="store_true", help="Train only; no evaluation, no shipped copy.")
    ap.add_argument("--vae-only", action="store_true", help="Train (or reuse) the VAE of each model's modality, nothing else.")
    ap.add_argument("--unet-weights", choices=["ema", "raw"], default="ema",
                    help="Install the U-Net's EMA (default) or its raw weights at the last step (from checkpoint.pt): "
                         "runs trained before the EMA warm-up fix hold a mostly-initial EMA.")
    ap.add_argument("--no-tracking", action="store_true", help="Train without MLflow (e.g. where it is not installed).")
    ap.add_argument("--install-stage", type=Path, default=None, metavar="FOLDER",
                    help="Install a refiner-stage model folder trained elsewhere (pipelines/refiner_stages_gpu.sh on a "
                         "GPU machine): evaluate it, write its card, copy it to medldm/shipped/<name>. One --only name.")
    args = ap.parse_args(argv)
    if args.install_stage is not None:
        if len(args.only) != 1:
            ap.error("--install-stage installs one model: name it with --only")
        name = args.only[0]
        try:
            config, record = read_model_files(args.install_stage)
        except ModelError as err:
            ap.error(str(err))
        if not record.stage_legs("refiner") or config.name != name:
            ap.error(f"{args.install_stage} is not a refiner-stage folder of {name}")
        install(name, args.install_stage, ROOT / "configs" / f"ldm-{name}-cpu.yaml", args.steps,
                command=stage_command(name, record))
        return
    from medldm.training.ldm import train_ldm
    from medldm.training.vae import train_vae

    runs = ROOT / "runs" / ("gpu" if args.profile == "gpu" else "")
    tracking = {"tracking.enabled": False} if args.no_tracking else {}
    for name in args.only:
        modality = MODELS[name]
        cfg_path = ROOT / "configs" / f"ldm-{name}-{args.profile}.yaml"
        if not cfg_path.is_file():
            ap.error(f"{name} has no {args.profile} profile ({cfg_path.relative_to(ROOT)} missing)")
        vae_dir = runs / f"vae-{modality.lower()}"
        if not (vae_dir / "model" / "model.json").is_file() and not args.skip_train:
            over = {**tracking, **({"train.max_minutes": args.vae_minutes} if args.vae_minutes else {})}
            train_vae(load_config(ROOT / "configs" / f"vae-{modality.lower()}-{args.profile}.yaml", "vae", over), vae_dir)
        if args.vae_only:
            continue
        over = {**tracking, **({"train.max_minutes": args.minutes} if args.minutes else {})}
        cfg = load_config(cfg_path, "ldm", over)
        run_dir = runs / f"ldm-{name}"
        if not args.skip_train:
            train_ldm(cfg, run_dir, resume=True)
        if args.no_install and not cfg.refiner_stage.enabled:
            continue
        model_dir = run_dir / "model" if args.unet_weights == "ema" else raw_unet_folder(run_dir)
        if cfg.refiner_stage.enabled:
            model_dir = refiner_stage(cfg, model_dir, run_dir, retrain=not args.skip_train)
        if not args.no_install:
            install(name, model_dir, cfg_path, args.steps,
                    extra_flags=" --unet-weights raw" if args.unet_weights == "raw" else "")


def refiner_stage(cfg, model_dir: Path, run_dir: Path, retrain: bool) -> Path:
    """Stage 3 on ``model_dir`` -> run_dir/refined/model. It resumes (a finished stage is only re-saved); with
    ``retrain`` False a finished stage is reused as is when it was made from the same folder, holding the same
    U-Net, with the same stage settings, and redone otherwise (e.g. model-raw, now the EMA U-Net is asked for)."""
    from medldm.training.refiner import train_refiner

    refined = run_dir / "refined" / "model"
    made = (read_record(refined).stage_legs("refiner") or [{}])[-1] if (refined / "model.json").is_file() else None
    same = (made is not None and _same_folder(made.get("source_model", str(model_dir)), model_dir)
            and _same_unet(made, model_dir)
            and _stage_settings(made, cfg.data.patch_size) == cfg.refiner_stage.model_dump())
    if made is not None and not same:
        shutil.rmtree(run_dir / "refined")
    if retrain or not same:
        train_refiner(cfg, model_dir, run_dir / "refined", resume=True)
    return refined


def stage_command(name: str, record: TrainingRecord) -> str:
    """How to remake an installed stage folder (``record``: its training.json): the model as the pipeline makes it, then
    the stage from the folder it started from (usually that installed model) with every setting it recorded (the
    device too: with more workers or a GPU a stage takes more steps in its minutes), then ``--install-stage``."""
    stage = record.stage_legs("refiner")[-1]
    if not stage.get("source_model"):
        raise SystemExit(f"{name}: the stage does not record the folder it started from; no command can remake it")
    source = Path(stage["source_model"])
    source = source.resolve().relative_to(ROOT) if source.is_absolute() and source.resolve().is_relative_to(ROOT) else source
    sets = " ".join(f"--set refiner_stage.{k}={v if isinstance(v, str) else json.dumps(v).replace(' ', '')}"
                    for k, v in stage.get("settings", {}).items() if k != "enabled")
    raw = " --unet-weights raw" if "raw" in str(record.training.get("unet_weights", "")) else ""
    device = " --device cuda" if "CPU" not in stage.get("device_name", "CPU") else ""
    return (f"python pipelines/train_default_models.py --only {name}{raw} && medldm train refiner "
            f"--config configs/ldm-{name}-cpu.yaml --model {source} --out OUT{device} {sets} && python "
            f"pipelines/train_default_models.py --only {name} --install-stage OUT/model")


def _same_folder(recorded: str, model_dir: Path) -> bool:
    """Whether a recorded source folder is ``model_dir``: `medldm train refiner` records the path as typed,
    relative to the repository root when run from it, the pipeline an absolute one."""
    path = Path(recorded)
    return (path if path.is_absolute() else ROOT / path).resolve() == model_dir.resolve()


def _same_unet(made: dict, model_dir: Path) -> bool:
    """Whether the stage's frozen U-Net is the one in ``model_dir`` now: the folder is rewritten in place when
    its LDM run trains on (a resumed run with more steps). Stages saved before the U-Net's steps were
    recorded were made from the U-Nets they ship with."""
    steps = read_record(model_dir).training.get("steps")
    return made.get("source_unet_steps", steps) == steps


def _stage_settings(made: dict, data_patch: list[int]) -> dict:
    """The settings a finished stage ran with. A setting added later was not recorded by older stages, which
    ran as its default does; stages saved before any settings were recorded (and before source_model: those
    were all made from model-raw) recorded these fields."""
    from medldm.config import RefinerStageConfig

    recorded = made.get("settings") or {
        "enabled": True, "max_minutes": made.get("minutes_budget"), "sample_steps": made.get("sample_steps"),
        "lr": made.get("lr"), "augment": made.get("augment"), "init": made.get("init"),
        "patch_size": None if made.get("patch_size") == list(data_patch) else made.get("patch_size")}
    return {**RefinerStageConfig().model_dump(), **recorded}


def raw_unet_folder(run_dir: Path) -> Path:
    """run_dir/model with the U-Net's raw weights of the last checkpoint in place of its EMA: run_dir/model-raw."""
    from medldm.training.common import load_checkpoint

    bundle = load_bundle(run_dir / "model")
    ck = load_checkpoint(run_dir / "checkpoint.pt")
    if ck["step"] != bundle.record.training["steps"]:
        raise SystemExit(f"{run_dir}: checkpoint step {ck['step']} != model step {bundle.record.training['steps']}")
    bundle.unet.load_state_dict(ck["unet"])
    bundle.record.training["unet_weights"] = ("raw weights at the last step (--unet-weights raw; the run's EMA "
                                              "is in its model folder)")
    save_bundle(bundle, run_dir / "model-raw")
    return run_dir / "model-raw"


def install(name: str, model_dir: Path, cfg_path: Path, steps: int, extra_flags: str = "", command: str | None = None) -> Path:
    t0 = time.time()
    rec = Reconstructor.load(model_dir)
    vols = validation_volumes(ROOT / "data" / "datalist.json", rec.config.modality, EVAL_CROP)
    out = ROOT / "outputs" / "shipped-eval"
    from medldm.evaluation.run import supervised_baseline

    rows = evaluate_cases(rec, make_cases(rec.task, rec.config.modality, vols), out, steps=steps, samples=2,
                          supervised=supervised_baseline(name))
    bundle = load_bundle(model_dir)
    default = [r for r in rows if r["method"] == "medldm (default)"]
    bundle.record.metrics.update({f"val_{r['case']}_{k}".replace("/", "_"): r[k] for r in default for k in ("psnr", "ssim")})
    dest = SHIPPED_DIR / name
    tmp = dest.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    gpu = "-gpu" in cfg_path.name
    command = command or (f"python pipelines/train_default_models.py{' --profile gpu' if gpu else ''} --only {name}"
                          f"{extra_flags}   # configs: {cfg_path.relative_to(ROOT)}")
    trained_on = bundle.record.training.get("device_name")
    machine = trained_on or f"{platform.machine()} CPU, 2 cores (torch CPU build)"
    save_bundle(bundle, tmp, half=True)
    # the small check the test suite re-runs on the float16 weights as committed
    check = run_check(Reconstructor.load(tmp), ROOT / "data" / "datalist.json", check_spec(rec.config.modality, rec.task))
    config, record = read_model_files(tmp)
    record.validation_check = check
    record.card = {"command": command, "machine": machine}  # pipelines/write_model_cards.py rewrites cards from these
    write_model_files(tmp, config, record)
    (tmp / ROWS_FILE).write_text(json.dumps(rows, indent=1))
    if (dest / NOISE_FILE).is_file():  # the noise estimator is classical: its figures hold for any weights
        shutil.copy(dest / NOISE_FILE, tmp / NOISE_FILE)
    stale = [f for f in (SPEED_FILE, MULTICOIL_FILE) if (dest / f).is_file()]  # measured on the old model
    (tmp / "README.md").write_text(model_card(config, record, rows, command, machine, noise=stored(tmp, NOISE_FILE)))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    card_path = ROOT / "data_cards" / f"model-{name}.md"
    shutil.copy(dest / "README.md", card_path)
    print(f"installed {name} -> {dest} ({time.time() - t0:.0f} s evaluation; its card has no FID rows: "
          f"`medldm evaluate --model {name} --crop {','.join(map(str, EVAL_CROP))} --steps {steps} --samples 2 --fid "
          f"--out DIR`, then `pipelines/write_model_cards.py --rows DIR` "
          "updates the card and data_cards/evaluation.md)")
    if stale:
        print(f"not kept, measured on the old weights: {', '.join(stale)}; remake them with benchmarks/"
              "profile_inference.py --json F (then write_model_cards.py --speed F) and benchmarks/multicoil_recon.py "
              "--json F (then --multicoil F)")
    return dest


if __name__ == "__main__":
    main()
