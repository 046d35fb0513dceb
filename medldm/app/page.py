"""`medldm app`: a local Gradio page to load a scan, reconstruct it with the same ``Reconstructor`` as every other
entry point, and look at input, output, their difference, the uncertainty and (for simulations) the error.

Nothing leaves the work folder (a temporary folder removed when the app stops) unless the user downloads it;
uploads have a size limit; an error is shown on the page and the server keeps running.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import tempfile
import traceback
from pathlib import Path

import numpy as np

from medldm.app import session, views
from medldm.errors import MedldmError

log = logging.getLogger(__name__)
HEAT_NOTE = ("Grey images share the window (level, width). Heat maps (|output - input|, uncertainty = per-voxel "
             "std over the samples, |error| = |output - truth|) run from 0 to a quarter of the window's width.")
NONE = "none: use the uploaded file"
KEEP_RUNS = 10  # run folders kept in the work folder; older ones are removed
# the maps shown, in order: (session's array name, label, element id); rows of 2 and 3 on the page
PANELS = (("input", "input", "img-input"), ("output", "output", "img-output"),
          ("|output - input|", "|output - input|", "img-diff"), ("uncertainty (std)", "uncertainty (std)", "img-std"),
          ("|error|", "|error| (simulations)", "img-error"))


class App:
    """The page's state outside the browser: loaded models and the work folder."""

    def __init__(self, workroot: Path, max_bytes: int, device: str | None = None):
        self.workroot, self.max_bytes, self.device = workroot, max_bytes, device
        self._models: dict[str, object] = {}

    def model(self, name: str):
        from medldm.sampling.reconstructor import Reconstructor

        name = (name or "").strip()
        if name not in self._models:
            self._models[name] = Reconstructor.load(name, device=self.device)
        return self._models[name]

    def new_workdir(self) -> Path:
        runs = sorted(self.workroot.glob("run-*"), key=lambda p: p.stat().st_mtime)
        for old in runs[:max(0, len(runs) - KEEP_RUNS + 1)]:
            shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix="run-", dir=self.workroot))

    def run(self, model, example, upload, simulate, steps, samples, seed):
        """(status markdown, metrics markdown, display state, downloads, provenance) or raises MedldmError."""
        rec = self.model(model)
        steps, samples, seed = _int(steps, "steps", 1, 200), _int(samples, "samples", 1, 16), _int(seed, "seed", 0, 2**31 - 1)
        workdir = self.new_workdir()
        prepared = session.prepare(task=rec.task, modality=rec.config.modality, model_name=rec.config.name,
                                   upload=upload, example=None if example == NONE else example, simulate=simulate,
                                   seed=seed, workdir=workdir, max_bytes=self.max_bytes)
        outcome = session.reconstruct(rec, prepared, steps=steps, samples=samples, seed=seed, workdir=workdir,
                                      progress=True)
        arrays, spacing = views.display_arrays(outcome.arrays, outcome.affine)
        seconds = outcome.seconds
        residual = "" if outcome.residual is None else f" Data-consistency residual ||Ax - y|| / ||y|| = {outcome.residual:.2e}."
        status = (f"**Done**: {prepared.description}. Model {rec.config.name} ({rec.task}), {steps} step(s), {samples} sample(s), "
                  f"seed {seed}{'' if seconds is None else f', {seconds:.1f} s'}.{residual}")
        return status, metrics_markdown(outcome.metrics), {"arrays": arrays, "spacing": spacing}, \
            [str(p) for p in outcome.files.values()], outcome.provenance


def _int(value, name: str, lo: int, hi: int) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise MedldmError(f"{name} must be a whole number") from None
    if not lo <= v <= hi:
        raise MedldmError(f"{name} must be between {lo} and {hi}, not {v}")
    return v


def metrics_markdown(rows: list[dict]) -> str:
    if not rows:
        return "No truth is known for this input, so no PSNR / SSIM (simulate a degradation to see them)."
    head = "| | PSNR dB | SSIM |\n|---|---|---|\n"
    return head + "\n".join(f"| {r['']} | {r['PSNR dB']:.2f} | {r['SSIM']:.3f} |" for r in rows)


def render(state, x, y, z, level, width) -> list:
    """The five images for the current planes and window (None where a map does not exist)."""
    if not state:
        return [None] * len(PANELS)
    arrays = state["arrays"]
    shape = arrays["output"].shape
    index = tuple(int(round(f * (s - 1))) for f, s in zip((x, y, z), shape))
    images = views.panels(arrays, state["spacing"], index, float(level), max(float(width), 1e-6))
    return [images.get(name) for name, _, _ in PANELS]


def build(app: App, default_model: str):
    import gradio as gr

    from medldm.sampling.reconstructor import shipped_models

    with gr.Blocks(title="medldm", analytics_enabled=False) as page:
        gr.Markdown("## medldm: reconstruct a scan and look at the result\nPick a bundled example or upload a "
                    "NIfTI, a zipped DICOM series, fastMRI / ISMRMRD k-space or a CT sinogram (.h5). Outputs are "
                    "research results, not for diagnosis.")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(shipped_models(), value=default_model, allow_custom_value=True, elem_id="model",
                                    label="model (shipped name, model folder, or models:/NAME@alias)")
                example = gr.Radio([NONE, *session.EXAMPLES], value=next(iter(session.EXAMPLES)), elem_id="example",
                                   label="example volume (degraded by simulation)")
                upload = gr.File(label="or upload a file", elem_id="upload",
                                 file_types=[".nii", ".gz", ".zip", ".h5", ".hdf5"])
                simulate = gr.Checkbox(False, label="the upload is a clean scan: degrade it by simulation first",
                                       elem_id="simulate")
                with gr.Row():
                    steps = gr.Number(app.model(default_model).config.default_steps, label="steps", precision=0,
                                      elem_id="steps")
                    samples = gr.Number(2, label="samples (2+ give the uncertainty)", precision=0, elem_id="samples")
                    seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
                run = gr.Button("Reconstruct", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                status = gr.Markdown("Choose an input and press Reconstruct.", elem_id="status")
                metrics = gr.Markdown("", elem_id="metrics")
                with gr.Row():
                    x = gr.Slider(0, 1, 0.5, step=0.01, label="sagittal position", elem_id="x")
                    y = gr.Slider(0, 1, 0.5, step=0.01, label="coronal position", elem_id="y")
                    z = gr.Slider(0, 1, 0.5, step=0.01, label="axial position", elem_id="z")
                with gr.Row():
                    level = gr.Slider(-2000, 5000, 500, label="window level", elem_id="level")
                    width = gr.Slider(1, 8000, 1000, label="window width", elem_id="width")
        images = []
        for row in (PANELS[:2], PANELS[2:]):
            with gr.Row():
                images += [gr.Image(label=f"{label} (axial | coronal | sagittal)", elem_id=i, format="png", height=260,
                                    interactive=False, buttons=["download", "fullscreen"]) for _, label, i in row]
        gr.Markdown(HEAT_NOTE)
        downloads = gr.File(label="downloads", file_count="multiple", interactive=False, elem_id="downloads")
        provenance = gr.JSON(label="provenance", elem_id="provenance")

        def on_run(model_name, ex, up, sim, n_steps, n_samples, n_seed, fx, fy, fz,
                   progress=gr.Progress(track_tqdm=True)):
            try:
                text, table, st, files, prov = app.run(model_name, ex, up, sim, n_steps, n_samples, n_seed)
            except (MedldmError, ValueError, OSError) as err:
                # the upload's place in the work folder means nothing to the user: name the file alone
                text = str(err).replace(f"{Path(up).parent}/", "") if up else str(err)
                return [f"**Error**: {text}", "", None, None, None, *[gr.update()] * 2, *render(None, 0, 0, 0, 0, 1)]
            except Exception as err:  # noqa: BLE001 - the page says what happened; the server keeps running
                log.error("app run failed:\n%s", traceback.format_exc())
                return [f"**Error** (unexpected, details in the server log): {type(err).__name__}: {err}", "", None,
                        None, None, *[gr.update()] * 2, *render(None, 0, 0, 0, 0, 1)]
            out = st["arrays"]["output"]
            lv, wd = views.default_window(out)
            lo, hi = float(np.min(out)), float(np.max(out))
            span = max(hi - lo, 1e-3)
            step = float(f"{span / 500:.1g}")  # round numbers on the sliders, ~500 stops over the range
            snap = lambda v: round(round(v / step) * step, 6)  # noqa: E731
            return [text, table, st, files, prov,
                    gr.update(minimum=snap(lo - span), maximum=snap(hi + span), value=snap(lv), step=step),
                    gr.update(minimum=step, maximum=snap(2 * span), value=snap(wd), step=step),
                    *render(st, fx, fy, fz, lv, wd)]

        run.click(on_run, [model, example, upload, simulate, steps, samples, seed, x, y, z],
                  [status, metrics, state, downloads, provenance, level, width, *images])
        for s in (x, y, z, level, width):
            s.release(render, [state, x, y, z, level, width], images)
        model.change(lambda name: _default_steps(app, name), model, steps)
        upload.upload(lambda _file: NONE, upload, example)  # a new upload is what the user wants to see
    return page


def _default_steps(app: App, name: str):
    import gradio as gr

    try:
        return gr.update(value=app.model(name).config.default_steps)
    except (MedldmError, ValueError, OSError):
        return gr.update()  # the run reports the model error on the page


def launch(model: str = "mr-denoise", host: str = "127.0.0.1", port: int = 7860, max_upload_mb: float = 512,
           device: str | None = None) -> None:
    """Serve the page until interrupted. Uploads and outputs live in one temporary folder, removed on exit."""
    workroot = Path(tempfile.mkdtemp(prefix="medldm-app-"))
    atexit.register(shutil.rmtree, workroot, True)
    # SIGTERM (a service manager, a test) stops the server like Ctrl-C does, so the work folder is removed
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"work folder (uploads, outputs; removed on exit): {workroot}", flush=True)
    os.environ["GRADIO_TEMP_DIR"] = str(workroot / "uploads")  # gradio's upload cache, inside the work folder
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    app = App(workroot, int(max_upload_mb * 2**20), device)
    page = build(app, model)
    page.queue(default_concurrency_limit=1)  # one reconstruction at a time: they use every core
    # system fonts: the default theme would ask the browser to fetch fonts from the internet
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    try:
        page.launch(server_name=host, server_port=port, max_file_size=int(max_upload_mb * 2**20), theme=theme,
                    show_error=False, quiet=False, footer_links=[])
    finally:
        shutil.rmtree(workroot, ignore_errors=True)


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt
