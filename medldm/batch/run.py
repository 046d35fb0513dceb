"""`medldm reconstruct`: batch reconstruction of every DICOM series, NIfTI, fastMRI .h5 and CT sinogram .h5
file under a folder.

Output layout::

    OUTPUT/manifest.json         one entry per unit: id, kind, inputs, status ok|failed|skipped, reason,
                                 outputs (relative to OUTPUT), seconds
    OUTPUT/<id>/reconstruction.nii.gz, uncertainty.nii.gz (samples > 1), provenance.json,
                dicom/ (DICOM or sinogram input: derived series), reconstruction.h5 (fastMRI input)

Exit codes: 0 when every unit is ok or skipped, 1 when any unit failed, 2 for usage errors (bad task or
options, missing input, nothing to reconstruct found).

Every unit is written into ``OUTPUT/.<id>.tmp`` and renamed when complete, and the manifest is rewritten
atomically after each unit: a killed run leaves finished units and a manifest of them, nothing half written.
A rerun skips finished units ("already done") unless ``overwrite``. Under torchrun (WORLD_SIZE > 1) rank r
takes units i with i % world == r, keeps ``manifest.rank{r}.json``, and rank 0 merges after a barrier.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medldm import __version__
from medldm.batch.distributed import finish_distributed, rank_device, start_distributed
from medldm.batch.manifest import (exit_code, format_plan, format_table, previous_parameters, read_previous, summarise,
                                   utc_now, write_json_atomic)
from medldm.batch.outputs import check_geometry, check_memory, load_input, write_outputs
from medldm.batch.units import MANIFEST, MAX_IGNORED_LISTED, TASKS, Unit, discover
from medldm.errors import InputError, MedldmError, ModelError
from medldm.io.volume import MODALITIES
from medldm.models.model_config import ModelConfig, read_model_files
from medldm.models.runtime import check_runtime

log = logging.getLogger(__name__)


class UsageError(MedldmError):
    """Bad options or nothing to do: exit code 2."""


class _Unexpected(MedldmError):
    """A library step raised something other than our typed errors: the unit fails with the step named."""


@dataclass
class _Context:
    out: Path
    task: str
    model: str | None
    steps: int | None  # None: the model's default_steps
    samples: int
    seed: int
    factor: int | None
    device: str | None
    overwrite: bool
    views: int | None = None
    dose: float | None = None
    sigma: float | None = None
    skip_bad_slices: bool = False
    diffusion: bool | None = None  # None: the Reconstructor's default
    runtime: str = "auto"  # what runs the networks (medldm.models.runtime); provenance, not a parameter of the run
    deidentify: Any = None  # a medldm.io.deidentify.Deidentifier for the whole run, or None
    source: Path | None = None
    previous: dict = field(default_factory=dict)
    _models: dict = field(default_factory=dict)

    def model_name(self, modality: str | None) -> str:
        if self.model:
            return self.model
        if modality is None:
            raise ModelError("no --model given and the modality is unknown, so no shipped model can be chosen")
        return f"{modality.lower()}-{self.task}"

    def reconstructor(self, name: str, modality: str):
        """Load once per name; a load failure is remembered so every unit needing it fails fast with the reason."""
        if name not in self._models:
            from medldm.sampling.reconstructor import Reconstructor

            try:
                rec = Reconstructor.load(name, device=self.device, runtime=self.runtime)
                if rec.task != self.task:
                    raise ModelError(f"model {name!r} does {rec.task}, not {self.task}")
                self._models[name] = rec
            except MedldmError as err:
                self._models[name] = err
            except Exception as err:  # noqa: BLE001 - damaged weights, out of memory: same answer for every unit
                first = (str(err).splitlines() or [""])[0]
                self._models[name] = ModelError(f"model {name!r} cannot be loaded ({type(err).__name__}: {first})")
        rec = self._models[name]
        if isinstance(rec, Exception):
            raise rec
        model_modality = rec.config.modality
        if model_modality and model_modality != modality:
            raise ModelError(f"model {name!r} is for {model_modality} images, this unit is {modality}")
        return rec


# ----------------------------------------------------------------------------------------- one unit


@contextlib.contextmanager
def _stage(what: str):
    """Label an exception that is not one of ours with the step it came from: the unit's reason says where."""
    try:
        yield
    except MedldmError:
        raise
    except Exception as err:  # noqa: BLE001
        first = (str(err).splitlines() or [""])[0]
        raise _Unexpected(f"unexpected {type(err).__name__} while {what}: {first}") from err


def _reconstruct_into(unit: Unit, ctx: _Context, tmp: Path) -> tuple[dict, dict]:
    with _stage("reading the input"):
        data, volume, modality = load_input(unit, ctx.views, ctx.dose, ctx.seed, ctx.skip_bad_slices)
    if volume is not None:
        check_geometry(volume)
        check_memory(int(np.prod(volume.spatial_shape)), ctx.samples, ctx.factor or 1)
    name = ctx.model_name(modality)
    rec = ctx.reconstructor(name, modality)
    with _stage("reconstructing"):
        result = rec(data, steps=ctx.steps, samples=ctx.samples, seed=ctx.seed, factor=ctx.factor, sigma=ctx.sigma,
                     use_diffusion=ctx.diffusion)
    if not np.all(np.isfinite(result.volume.array)):
        raise ModelError(f"model {name!r} produced NaN/Inf voxels")

    with _stage("writing the outputs"):
        return write_outputs(unit, ctx, tmp, result, volume, modality, name, rec.config.name)


def _commit(tmp: Path, final: Path) -> None:
    if final.exists():  # --overwrite: the old result stays whole until the new one is in place
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


# Output file -> manifest key; also rebuilds the outputs of a unit whose manifest entry was lost to a kill.
OUTPUT_KEYS = {"reconstruction.nii.gz": "reconstruction", "uncertainty.nii.gz": "uncertainty", "dicom": "dicom",
               "reconstruction.h5": "reconstruction_h5", "provenance.json": "provenance"}


def _entry(unit: Unit) -> dict:
    entry = {"id": unit.id, "kind": unit.kind, "inputs": [str(p) for p in unit.inputs], "status": None,
             "reason": "", "outputs": {}, "seconds": 0.0, "modality": unit.modality}
    if unit.series_uid:
        entry["series_uid"] = unit.series_uid
    return entry


# parameters added after manifests were first written: an older manifest without them used these values
LATER_PARAMS = {"deidentify": False, "deid_dates": None, "skip_bad_slices": False}


def _redacted(entry: dict, unit: Unit, ctx: _Context) -> dict:
    """Under --deidentify the manifest names inputs by keyed digests, holds no series UID and no input path."""
    if ctx.deidentify is None:
        return entry
    deid = ctx.deidentify
    entry = {k: v for k, v in entry.items() if k != "series_uid"}
    entry["inputs"] = [deid.hash_text(str(p)) for p in unit.inputs]
    entry["reason"] = deid.redact(str(entry.get("reason") or ""), [*unit.inputs, ctx.source, unit.series_uid])
    return entry


def _done_entry(unit: Unit, ctx: _Context, final: Path) -> dict:
    prev = ctx.previous.get(unit.id) or {}
    entry = {**_entry(unit), **{k: v for k, v in prev.items() if k not in ("status", "reason", "seconds")}}
    if not entry.get("outputs"):  # killed between the rename and the manifest write
        entry["outputs"] = {OUTPUT_KEYS[p.name]: f"{unit.id}/{p.name}" for p in sorted(final.iterdir())
                            if p.name in OUTPUT_KEYS}
    entry.update(status="skipped", reason="already done")
    # the run that made the outputs; a unit skipped before already carries these keys from that record
    entry.setdefault("previous_status", prev.get("status", "ok"))
    entry.setdefault("previous_seconds", prev.get("seconds"))
    return entry


def process_unit(unit: Unit, ctx: _Context) -> dict:
    """Run one unit and return its manifest entry; never raises for a problem with the unit."""
    entry = _entry(unit)
    if unit.skip or unit.fail:
        entry.update(status="skipped" if unit.skip else "failed", reason=unit.skip or unit.fail)
        return entry
    final, tmp = ctx.out / unit.id, ctx.out / f".{unit.id}.tmp"
    if final.is_dir() and not ctx.overwrite:
        return _done_entry(unit, ctx, final)
    for leftover in (tmp, ctx.out / f".{unit.id}.old"):  # a kill mid-write or mid-_commit
        if leftover.exists():
            log.info("unit %s: removing the leftovers of an interrupted run", unit.id)
            shutil.rmtree(leftover)
    t0 = time.perf_counter()
    try:
        outputs, info = _reconstruct_into(unit, ctx, tmp)
        _commit(tmp, final)
        entry.update(status="ok", reason=f"reconstructed ({ctx.task})", outputs=outputs, **info)
    except MedldmError as err:
        entry.update(status="failed", reason=str(err))
    except Exception as err:  # noqa: BLE001 - one bad unit must not stop the batch
        log.debug("unit %s: unexpected error", unit.id, exc_info=True)
        first = str(err).splitlines()[0] if str(err) else ""
        entry.update(status="failed", reason=f"unexpected {type(err).__name__}: {first}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("unit %s: %s in %.1f s", unit.id, entry["status"], entry["seconds"])
    return entry


# ----------------------------------------------------------------------------------------- entry point


def _validate(source: Path, out: Path, task: str, steps: int | None, samples: int, modality: str | None,
              factor: int | None, model: str | None, views: int | None = None, dose: float | None = None,
              sigma: float | None = None) -> ModelConfig | None:
    """The model's configuration (None without --model) once the options make sense, else UsageError."""
    if task not in TASKS:
        raise UsageError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if (steps is not None and steps < 1) or samples < 1:
        raise UsageError("--steps and --samples must be >= 1")
    if modality is not None and modality.upper() not in MODALITIES:
        raise UsageError(f"--modality must be mr or ct, got {modality!r}")
    if factor is not None and (task != "sr" or factor < 1):
        raise UsageError("--factor takes an integer >= 1 and applies to --task sr only")
    if views is not None and (task != "recon" or views < 1):
        raise UsageError("--views takes an integer >= 1 and applies to --task recon only (CT images -> simulated "
                         "sparse-view sinograms)")
    if dose is not None and (views is None or not dose > 0):
        raise UsageError("--dose takes photons per ray > 0 and applies with --views only")
    if sigma is not None and (task != "denoise" or not 0 < sigma < float("inf")):
        raise UsageError("--sigma takes the noise level (> 0, in the input's intensity units) and applies to "
                         "--task denoise only")
    if not source.exists():
        raise UsageError(f"input {source} does not exist")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} is a file, not a folder")
    src, dst = source.resolve(), out.resolve()
    if source.is_dir() and (dst == src or src in dst.parents):
        raise UsageError(f"output {out} lies inside the input folder; choose a folder outside it")
    if model is not None:
        from medldm.sampling.reconstructor import resolve_model

        try:
            folder, _ = resolve_model(model)
            config, _ = read_model_files(folder)
        except (MedldmError, ImportError, OSError, ValueError) as err:
            raise UsageError(f"--model {model}: {err}") from None
        if config.task != task:
            raise UsageError(f"--model {model} does {config.task!r}, not --task {task}")
        return config
    return None


def _check_runnable(out: Path, params: dict, overwrite: bool, units: list, ignored: list, source: Path) -> None:
    """UsageError unless the run can start: earlier results made otherwise need --overwrite, and something must
    be there to reconstruct."""
    before = previous_parameters(out)
    changed = sorted(k for k in params if before is not None and before.get(k, LATER_PARAMS.get(k)) != params[k])
    if changed and not overwrite and read_previous(out):
        # finished units would be reused as "already done" although made differently
        raise UsageError(f"{out} holds results made with other {', '.join(changed)} "
                         f"({', '.join(f'{k}={before.get(k)}' for k in changed)}): use --overwrite to redo them, "
                         "or another output folder")
    if not any(u.runnable or u.fail for u in units):
        reasons = sorted({u.skip for u in units if u.skip})  # e.g. "add --views N" for CT images with recon
        raise UsageError(f"nothing to reconstruct with --task {params['task']} under {source} ({len(units)} unit(s) "
                         f"found, all not applicable; {len(ignored)} other file(s) ignored)"
                         + "".join(f"\n  {r}" for r in reasons[:5]))


def run_batch(input, output, *, task: str, model: str | None = None, steps: int | None = None, samples: int = 1,
              diffusion: bool | None = None, seed: int = 0, modality: str | None = None, factor: int | None = None, device: str | None = None,
              dry_run: bool = False, overwrite: bool = False, views: int | None = None,
              dose: float | None = None, sigma: float | None = None, deidentify: bool = False,
              deid_dates: str = "shift", deid_secret: str | None = None, skip_bad_slices: bool = False,
              runtime: str = "auto") -> int:
    """Reconstruct every unit under ``input`` into ``output``. Returns the exit code: 0 all units ok or
    skipped, 1 some unit failed (see manifest.json), 2 usage error (nothing written).

    ``deidentify``: derived DICOM follows the PS3.15 Basic Profile (``medldm.io.deidentify``; ``deid_dates``
    "shift" or "remove"), and the manifest and provenance name inputs by keyed digests (``deid_secret``, or a
    random key for this run). ``skip_bad_slices``: a DICOM series with unreadable slices is reconstructed from
    the others when no gap results (the slices left out are listed in the manifest and provenance). ``runtime``:
    what runs the networks (``Reconstructor``'s; outputs agree to float32 rounding, to ~1e-3 of the image's scale in
    bfloat16: each unit's provenance says which ran, and a resumed run does not redo units for it)."""
    source, out = Path(input), Path(output)
    try:
        config = _validate(source, out, task, steps, samples, modality, factor, model, views, dose, sigma)
        units, ignored = discover(source, task, modality, simulate_views=views is not None)
        model_modality = config.modality if config else ""
        for u in units:  # a NIfTI that does not say its modality is taken to be what the chosen model is for
            if u.kind == "nifti" and u.modality is None and model_modality in MODALITIES:
                u.modality, u.modality_source = model_modality, "model"
        params = {"task": task, "model": model, "steps": steps, "samples": samples, "seed": seed, "factor": factor,
                  "modality": modality, "views": views, "dose": dose, "sigma": sigma, "deidentify": deidentify,
                  "deid_dates": deid_dates if deidentify else None, "skip_bad_slices": skip_bad_slices}
        if diffusion is not None:  # only when chosen, so runs begun before the option existed still resume
            params["diffusion"] = diffusion
        if deid_dates not in ("shift", "remove"):
            raise UsageError(f"--deid-dates must be shift or remove, got {deid_dates!r}")
        try:
            check_runtime(runtime, device)
        except ModelError as err:
            raise UsageError(f"--runtime: {err}") from None
        _check_runnable(out, params, overwrite, units, ignored, source)
    except (UsageError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    world, rank = int(os.environ.get("WORLD_SIZE", "1") or 1), int(os.environ.get("RANK", "0") or 0)
    ctx = _Context(out, task, model, steps, samples, seed, factor, rank_device(device, world), overwrite, views, dose, sigma,
                   source=source, skip_bad_slices=skip_bad_slices, diffusion=diffusion, runtime=runtime)
    if deidentify:
        from medldm.io.deidentify import Deidentifier

        ctx.deidentify = Deidentifier(deid_dates, deid_secret)
        ignored = [{"path": ctx.deidentify.hash_text(i["path"]),
                    "reason": ctx.deidentify.redact(i["reason"], [Path(i["path"]), source])} for i in ignored]
    if dry_run:
        if rank == 0:
            print(format_plan(units, out, task, model, overwrite))
            print(f"{len(units)} unit(s); {len(ignored)} other file(s) ignored; dry run: nothing written")
        return 0

    out.mkdir(parents=True, exist_ok=True)
    ctx.previous = read_previous(out)
    owned = start_distributed() if world > 1 else False
    mine = [u for i, u in enumerate(units) if i % world == rank]
    where = {"input": str(source), "output": str(out)} if ctx.deidentify is None else {
        "input": ctx.deidentify.hash_text(str(source)), "output": ctx.deidentify.hash_text(str(out)),
        "deidentified": "input paths as HMAC-SHA256 digests (16 hex digits) under the run's key"}
    header = {"medldm_version": __version__, "created": utc_now(), **where,
              "task": task, "model": model,
              "parameters": {k: v for k, v in params.items() if k not in ("task", "model")},
              "ignored": ignored[:MAX_IGNORED_LISTED], "ignored_count": len(ignored)}
    if any(u.runnable for u in mine):  # torch and the networks import once here, not inside the first unit's seconds
        import medldm.sampling.reconstructor  # noqa: F401
    path = out / (MANIFEST if world == 1 else f"manifest.rank{rank}.json")
    entries: list[dict] = []
    from tqdm.auto import tqdm

    with tqdm(mine, desc="reconstruct", unit="unit", disable=None if rank == 0 else True, file=sys.stderr) as bar:
        for unit in bar:
            bar.set_postfix_str(unit.id, refresh=False)
            entries.append(_redacted(process_unit(unit, ctx), unit, ctx))
            write_json_atomic(path, {**header, "rank": rank, "units": entries, "summary": summarise(entries),
                                     "updated": utc_now()})
    if world == 1:
        for stale in out.glob("manifest.rank*.json"):  # a killed torchrun's progress, now carried into manifest.json
            stale.unlink(missing_ok=True)
        print(format_table(entries))
        print(f"manifest: {path}")
        return exit_code(entries)
    return finish_distributed(owned, out, world, rank, [u.id for u in units])
