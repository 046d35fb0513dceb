"""The `medldm` command line. Argument parsing lives here; every command calls the library."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from medldm.errors import MedldmError

app = typer.Typer(help="medldm: medical image reconstruction with latent diffusion models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Prepare training data (datalist + NIfTI files) from offline sources.", no_args_is_help=True)
train_app = typer.Typer(help="Train the VAE or the conditional latent diffusion model.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")


def _fail(err: Exception, code: int = 2):
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@data_app.command("prepare")
def data_prepare(
    out: Path = typer.Option(Path("data"), help="Output folder for NIfTI files and datalist.json."),
    synthetic: int = typer.Option(20, help="Number of synthetic subjects to generate from the MNI152 tissue maps."),
    seed: int = typer.Option(0, help="Seed of the synthetic-subject generator."),
    ct: bool = typer.Option(True, help="Include the InVesalius head CT (Debian invesalius-examples)."),
):
    """Write datalist.json (training / validation, hold-out documented) from the offline sources."""
    from medldm.data.prepare import prepare_data

    try:
        path = prepare_data(out, n_synthetic=synthetic, seed=seed, include_ct=ct)
    except MedldmError as err:
        _fail(err)
    typer.echo(f"datalist written: {path}")


def _load_run_config(kind: str, config: Path, set_: list[str]):
    import yaml

    from medldm.config import load_config

    overrides = {}
    for item in set_:
        if "=" not in item:
            _fail(ValueError(f"--set expects key=value, got {item!r}"))
        k, v = item.split("=", 1)
        overrides[k] = yaml.safe_load(v)
    try:
        return load_config(config, kind, overrides)
    except MedldmError as err:
        _fail(err)


def _train(kind: str, config: Path, out: Optional[Path], resume: bool, device: Optional[str], set_: list[str]):
    cfg = _load_run_config(kind, config, set_)
    out = out or Path("runs") / f"{kind}-{cfg.name}"
    if kind == "vae":
        from medldm.training.vae import train_vae as run
    else:
        from medldm.training.ldm import train_ldm as run
    folder = run(cfg, out, resume=resume, device=device)
    typer.echo(f"model saved: {folder}")


_OUT = typer.Option(None, help="Run folder (checkpoint, figures, model/). Default runs/<kind>-<name>.")
_RESUME = typer.Option(False, "--resume", help="Continue from <out>/checkpoint.pt exactly where it stopped.")
_DEVICE = typer.Option(None, help="cpu | cuda (default: cuda when available).")
_SET = typer.Option([], "--set", help="Override a config field, e.g. --set train.steps=10 (repeatable).")


@train_app.command("vae")
def train_vae_cmd(config: Path = typer.Option(..., "--config", help="A VAE run config YAML (configs/)."),
                  out: Optional[Path] = _OUT, resume: bool = _RESUME, device: Optional[str] = _DEVICE, set_: list[str] = _SET):
    """Train the AutoencoderKL, calibrate its latent scale, save a model folder."""
    _train("vae", config, out, resume, device, set_)


@train_app.command("ldm")
def train_ldm_cmd(config: Path = typer.Option(..., "--config", help="An LDM run config YAML (configs/)."),
                  out: Optional[Path] = _OUT, resume: bool = _RESUME, device: Optional[str] = _DEVICE, set_: list[str] = _SET):
    """Train the conditional latent U-Net (+ refiner) on a trained VAE, save a model folder."""
    _train("ldm", config, out, resume, device, set_)


@train_app.command("bank")
def train_bank_cmd(config: Path = typer.Option(..., "--config", help="The model's LDM run config YAML (configs/)."),
                   model: Path = typer.Option(..., "--model", help="The model folder whose VAE encodes the bank."),
                   out: Path = typer.Option(..., help="The bank folder (a build that stopped continues there)."),
                   batches: Optional[int] = typer.Option(None, help="Data batches in the bank (default bridge_stage.bank_batches)."),
                   workers: Optional[int] = typer.Option(None, help="Processes making guides (default bridge_stage.bank_workers)."),
                   device: Optional[str] = _DEVICE, set_: list[str] = _SET):
    """Precompute a bank of (truth, guide) VAE latents for the bridge stage: a U-Net step then costs the U-Net alone."""
    from medldm.models.bundle import load_bundle
    from medldm.training.banks import build_bank

    cfg = _load_run_config("ldm", config, set_)
    try:
        folder = build_bank(cfg, load_bundle(model), out, batches=batches, workers=workers, device=device)
    except MedldmError as err:
        _fail(err)
    typer.echo(f"bank saved: {folder}")


@train_app.command("bridge")
def train_bridge_cmd(config: Path = typer.Option(..., "--config", help="The model's LDM run config YAML (configs/)."),
                     model: Path = typer.Option(..., "--model", help="The model folder (VAE, U-Net to start from, refiner)."),
                     bank: Path = typer.Option(..., "--bank", help="A bank made by medldm train bank for this model."),
                     out: Path = typer.Option(..., help="Run folder (checkpoint, losses, model/)."),
                     resume: bool = _RESUME, device: Optional[str] = _DEVICE, set_: list[str] = _SET):
    """Train the latent U-Net as a flow from the guide's latent to the truth's, on a latent bank (VAE and refiner
    frozen); then retrain the refiner on its samples (medldm train refiner)."""
    from medldm.training.bridge import train_bridge

    cfg = _load_run_config("ldm", config, set_)
    try:
        folder = train_bridge(cfg, model, bank, out, resume=resume, device=device)
    except MedldmError as err:
        _fail(err)
    typer.echo(f"model saved: {folder}")


@train_app.command("refiner")
def train_refiner_cmd(config: Path = typer.Option(..., "--config", help="The model's LDM run config YAML (configs/)."),
                      model: Path = typer.Option(..., "--model", help="The trained model folder (e.g. runs/ldm-<name>/model)."),
                      out: Optional[Path] = typer.Option(None, help="Run folder; default <model>/../refined."),
                      resume: bool = _RESUME, device: Optional[str] = _DEVICE, set_: list[str] = _SET):
    """Stage 3: retrain the model's pixel refiner on real sampler outputs (U-Net and VAE frozen)."""
    from medldm.training.refiner import train_refiner

    cfg = _load_run_config("ldm", config, set_)
    try:
        folder = train_refiner(cfg, model, out or model.parent / "refined", resume=resume, device=device)
    except MedldmError as err:
        _fail(err)
    typer.echo(f"model saved: {folder}")


@app.command()
def reconstruct(
    input: Path = typer.Argument(..., help="A folder (searched recursively) or one DICOM/NIfTI/.h5 file."),
    output: Path = typer.Argument(..., help="Output folder (manifest.json + one folder per unit)."),
    task: str = typer.Option(..., help="denoise | recon | sr"),
    model: Optional[str] = typer.Option(None, help="Shipped model name, model folder or MLflow URI."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps (default: the model's, stated in its card)."),
    samples: int = typer.Option(1, help="Samples per volume (K > 1 gives an uncertainty map)."),
    diffusion: Optional[bool] = typer.Option(None, "--diffusion/--no-diffusion", help="Sample the latent diffusion "
                                             "model, or decode the input's latent (default: sample when --samples > 1, "
                                             "else the model's measured default, stated in its card)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    modality: Optional[str] = typer.Option(None, help="mr | ct (needed for NIfTI when it cannot be inferred)."),
    factor: Optional[int] = typer.Option(None, help="SR factor along the slice axis."),
    views: Optional[int] = typer.Option(None, help="Research: --task recon of CT images by simulating N-view sinograms."),
    dose: Optional[float] = typer.Option(None, help="With --views: photons per ray (Poisson noise); default noiseless."),
    sigma: Optional[float] = typer.Option(None, help="--task denoise: the noise level in the input's intensity units "
                                          "(MR: Rician sigma), where it is known; default: estimated from each image."),
    device: Optional[str] = _DEVICE,
    dry_run: bool = typer.Option(False, "--dry-run", help="List the units found and what would run."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo units that already finished."),
    skip_bad_slices: bool = typer.Option(False, "--skip-bad-slices", help="Leave out DICOM slices that cannot be read "
                                         "(listed in the manifest) when the rest has no gap."),
    deidentify: bool = typer.Option(False, "--deidentify", help="Derived DICOM per DICOM PS3.15 Basic Profile (new "
                                    "UIDs/names/IDs, consistent within the run); inputs named by digests in "
                                    "manifest and provenance."),
    deid_dates: str = typer.Option("shift", help="With --deidentify: shift (one offset, intervals kept) | remove."),
    deid_secret_file: Optional[Path] = typer.Option(None, help="With --deidentify: a file holding the site's key, so "
                                                    "runs and resumed runs map alike (keep it apart from outputs)."),
    runtime: str = typer.Option("auto", help="What runs the networks: auto (OpenVINO on the CPU when the 'fast' "
                                "extra is installed and the volume pays for converting: bfloat16 where the CPU has "
                                "it, else the refiner alone) | torch | openvino | openvino-bf16."),
):
    """Batch reconstruction of DICOM series, NIfTI, fastMRI k-space .h5 and CT sinogram .h5 files.

    Exit codes: 0 all units ok or skipped, 1 any unit failed (see OUTPUT/manifest.json), 2 usage error."""
    from medldm.batch import run_batch

    code = run_batch(input, output, task=task, model=model, steps=steps, samples=samples, diffusion=diffusion, seed=seed, modality=modality,
                     factor=factor, device=device, dry_run=dry_run, overwrite=overwrite, views=views, dose=dose,
                     sigma=sigma, deidentify=deidentify, deid_dates=deid_dates, skip_bad_slices=skip_bad_slices,
                     deid_secret=_read_secret(deid_secret_file, deidentify), runtime=runtime)
    raise typer.Exit(code)


def _read_secret(path: Optional[Path], deidentify: bool) -> Optional[str]:
    if path is None:
        return None
    if not deidentify:
        raise typer.BadParameter("applies with --deidentify only", param_hint="--deid-secret-file")
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as err:
        raise typer.BadParameter(f"cannot read it: {err.strerror}", param_hint="--deid-secret-file") from None
    if len(secret) < 16:
        raise typer.BadParameter("holds fewer than 16 characters: too short to be a key", param_hint="--deid-secret-file")
    return secret


@app.command()
def evaluate(model: list[str] = typer.Option([], help="Models to evaluate (repeatable; default: all shipped)."),
             datalist: Path = typer.Option(Path("data/datalist.json"), help="Datalist from `medldm data prepare`."),
             out: Path = typer.Option(Path("outputs/evaluation"), help="Output folder for tables and figures."),
             steps: int = typer.Option(20, help="Sampling steps."),
             samples: int = typer.Option(4, help="Samples for the uncertainty map and its calibration."),
             crop: Optional[str] = typer.Option(None, help="Centre crop X,Y,Z of each validation volume (faster)."),
             max_volumes: Optional[int] = typer.Option(None, help="At most this many validation volumes per modality."),
             tracking: bool = typer.Option(True, help="Log one MLflow evaluation run."),
             fid: bool = typer.Option(False, "--fid", help="Add FID rows (optional extra: local Inception weights; slow on CPU)."),
             supervised: bool = typer.Option(True, help="Add the supervised U-Net baseline rows where installed."),
             device: Optional[str] = _DEVICE):
    """Evaluate models against classical baselines on held-out data (tables, figures, MLflow run)."""
    from medldm.evaluation.run import evaluate_models

    crop_t = tuple(int(v) for v in crop.split(",")) if crop else None
    if crop_t is not None and len(crop_t) != 3:
        _fail(ValueError("--crop needs three integers X,Y,Z"))
    try:
        evaluate_models(model, datalist, out, steps=steps, samples=samples, crop=crop_t, max_volumes=max_volumes,
                        tracking=tracking, device=device, fid=fid, supervised=supervised)
    except MedldmError as err:
        _fail(err)
    typer.echo(f"tables and figures in {out}")


@app.command()
def register(model: str = typer.Argument(..., help="Model folder, shipped model name or MLflow URI."),
             name: str = typer.Option(..., help="Registered model name."),
             alias: Optional[str] = typer.Option("champion", help="Alias to set on the new version."),
             tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="Default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db."),
             no_example: bool = typer.Option(False, "--no-example", help="Skip MLflow's input-example check (faster).")):
    """Log a model as an MLflow pyfunc (safetensors + config + card) and register a new version."""
    from medldm.serving import register_model

    try:
        info = register_model(model, name, alias=alias, tracking_uri=tracking_uri, input_example=not no_example)
    except MedldmError as err:
        _fail(err)
    typer.echo(f"registered {info['name']} version {info['version']}: {info['model_uri']}")


@app.command()
def serve(model_uri: str = typer.Argument(..., help="models:/NAME@alias or runs:/ID/model"),
          host: str = typer.Option("127.0.0.1"), port: int = typer.Option(5000),
          timeout: int = typer.Option(600, help="Request timeout in seconds."),
          max_payload_mb: float = typer.Option(256, help="Largest accepted request (MEDLDM_MAX_PAYLOAD_MB)."),
          tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI "
                                                     "or sqlite:///mlflow.db).")):
    """Serve a registered model with `mlflow models serve --env-manager local` (POST /invocations).

    SIGTERM or SIGINT (Ctrl-C) stops the server and every process it started."""
    from medldm.serving import serve as start, stop

    proc = start(model_uri, host=host, port=port, timeout_s=timeout, tracking_uri=tracking_uri,
                 env={"MEDLDM_MAX_PAYLOAD_MB": str(max_payload_mb)})

    def _stop_tree(signum, _frame):
        # the server runs in its own process group (so a terminal's Ctrl-C alone would not reach uvicorn):
        # forward the stop to the whole group and wait for it, then exit as killed by that signal
        stop(proc)
        raise typer.Exit(128 + signum)

    signal.signal(signal.SIGTERM, _stop_tree)
    signal.signal(signal.SIGINT, _stop_tree)
    raise typer.Exit(proc.wait())


@app.command()
def demo(out: Path = typer.Option(Path("demo_output"), help="Where inputs, outputs, figures and the table go."),
         steps: Optional[int] = typer.Option(None, help="Sampling steps (default: each model's)."),
         samples: int = typer.Option(2, help="Samples per volume (uncertainty map)."),
         model: list[str] = typer.Option([], help="Only these shipped models (default: all).")):
    """The main job on embedded defaults: degrade held-out real scans, write them as DICOM / k-space,
    register the shipped models in the local MLflow registry, run `medldm reconstruct` through the
    registry URIs, and compare with classical baselines. A second run reuses everything."""
    from medldm.demo import run_demo

    try:
        run_demo(out, steps=steps, samples=samples, models=model or None)
    except MedldmError as err:
        _fail(err)


@app.command("app")
def app_cmd(model: str = typer.Option("mr-denoise", help="Model shown first: shipped name, folder or models:/NAME@alias."),
            host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."),
            port: int = typer.Option(7860), max_upload_mb: float = typer.Option(512, help="Largest accepted upload."),
            device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda when available).")):
    """A local web page: load a scan or an example, reconstruct it, look at input, output, difference,
    uncertainty and error in three planes, download the results (needs `pip install medldm[app]`)."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        _fail(MedldmError("medldm app needs gradio: pip install 'medldm[app]' (bash .ci/setup installs it)"))
    from medldm.app.page import launch

    try:
        launch(model, host=host, port=port, max_upload_mb=max_upload_mb, device=device)
    except MedldmError as err:
        _fail(err)


def main():
    try:
        app()
    except MedldmError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
