"""`medldm reconstruct`: batch reconstruction of every DICOM series, NIfTI and fastMRI .h5 file under a folder.

Output layout::

    OUTPUT/manifest.json         one entry per unit: id, kind, inputs, status ok|failed|skipped, reason,
                                 outputs (relative to OUTPUT), seconds
    OUTPUT/<id>/reconstruction.nii.gz, uncertainty.nii.gz (samples > 1), provenance.json,
                dicom/ (DICOM input: derived series), reconstruction.h5 (fastMRI input)

Exit codes: 0 when every unit is ok or skipped, 1 when any unit failed, 2 for usage errors (bad task or
options, missing input, nothing to reconstruct found).

Every unit is written into ``OUTPUT/.<id>.tmp`` and renamed when complete, and the manifest is rewritten
atomically after each unit: a killed run leaves finished units and a manifest of them, nothing half written.
A rerun skips finished units ("already done") unless ``overwrite``. Under torchrun (WORLD_SIZE > 1) rank r
takes units i with i % world == r, keeps ``manifest.rank{r}.json``, and rank 0 merges after a barrier.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medldm import __version__
from medldm.batch_units import TASKS, Unit, discover
from medldm.errors import InputError, MedldmError, ModelError
from medldm.io.volume import MODALITIES, Volume

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class UsageError(MedldmError):
    """Bad options or nothing to do: exit code 2."""


@dataclass
class _Context:
    out: Path
    task: str
    model: str | None
    steps: int
    samples: int
    seed: int
    factor: int | None
    device: str | None
    overwrite: bool
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
                rec = Reconstructor.load(name, device=self.device)
                if rec.task != self.task:
                    raise ModelError(f"model {name!r} does {rec.task}, not {self.task}")
                self._models[name] = rec
            except MedldmError as err:
                self._models[name] = err
        rec = self._models[name]
        if isinstance(rec, Exception):
            raise rec
        model_modality = str(rec.meta.get("modality") or "").upper()
        if model_modality and model_modality != modality:
            raise ModelError(f"model {name!r} is for {model_modality} images, this unit is {modality}")
        return rec


# ----------------------------------------------------------------------------------------- one unit


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load_input(unit: Unit):
    """(what the Reconstructor takes, the input volume when it is an image, modality)."""
    from medldm.io import fastmri_h5_to_volume, read_dicom_series, read_fastmri_h5, read_nifti

    path = unit.inputs[0]
    if unit.kind == "dicom":
        volume = read_dicom_series(unit.series if unit.series is not None else path)
        if volume.modality is None:
            volume = Volume(volume.array, volume.affine, unit.modality, volume.meta)
        return volume, volume, volume.modality
    if unit.kind == "nifti":
        if unit.modality is None:
            raise InputError(path, "modality unknown (no BIDS sidecar or suffix); pass --modality mr|ct or --model")
        volume = read_nifti(path, modality=unit.modality)
        return volume, volume, volume.modality
    from medldm.sampling.measurement import from_kspace

    kspace, mask, attrs = read_fastmri_h5(path)
    if not np.all(np.isfinite(kspace.view(np.float32))):
        raise InputError(path, "k-space contains NaN/Inf values")
    # The zero-filled volume carries the (H, W, slices) grid and spacing the fastMRI reader derives.
    grid = fastmri_h5_to_volume(kspace, attrs)
    m = from_kspace(kspace, mask, grid.affine, "MR")
    m.meta["source"] = str(path)
    return m, None, "MR"


def _reconstruct_into(unit: Unit, ctx: _Context, tmp: Path) -> tuple[dict, dict]:
    from medldm.io import write_dicom_series, write_fastmri_recon_h5, write_nifti

    data, volume, modality = _load_input(unit)
    if modality is None and ctx.model:  # NIfTI without a stated modality: the chosen model's says it
        modality = unit.modality
    name = ctx.model_name(modality)
    rec = ctx.reconstructor(name, modality)
    result = rec(data, steps=ctx.steps, samples=ctx.samples, seed=ctx.seed, factor=ctx.factor)
    if not np.all(np.isfinite(result.volume.array)):
        raise ModelError(f"model {name!r} produced NaN/Inf voxels")

    tmp.mkdir(parents=True)
    outputs = {"reconstruction": write_nifti(result.volume, tmp / "reconstruction.nii.gz")}
    if result.uncertainty is not None:
        outputs["uncertainty"] = write_nifti(result.uncertainty, tmp / "uncertainty.nii.gz")
    if unit.kind == "dicom":
        description = (f"medldm {__version__} {ctx.task} by model {rec.meta.get('name') or name} ({name}); "
                       f"{ctx.steps} steps, {ctx.samples} samples, seed {ctx.seed}")
        write_dicom_series(result.volume, tmp / "dicom", source_meta=volume.meta.get("dicom"),
                           derivation_description=description, modality=modality)
        outputs["dicom"] = tmp / "dicom"
    if unit.kind == "fastmri":
        recon = np.transpose(result.volume.array[0], (2, 0, 1))  # (H, W, slices) -> fastMRI's [slices, H, W]
        outputs["reconstruction_h5"] = write_fastmri_recon_h5(
            tmp / "reconstruction.h5", recon, {"medldm_version": __version__, "model": name, "task": ctx.task})
    outputs["provenance"] = tmp / "provenance.json"
    rel = {k: f"{unit.id}/{Path(p).name}" for k, p in outputs.items()}
    provenance = {**result.provenance, "unit": {"id": unit.id, "kind": unit.kind,
                                                "inputs": [str(p) for p in unit.inputs],
                                                "modality": modality, "modality_source": unit.modality_source},
                  "model_requested": name, "timings": result.timings, "residual": result.residual, "outputs": rel}
    write_json_atomic(outputs["provenance"], provenance)
    return rel, {"model": name, "modality": modality}


def _commit(tmp: Path, final: Path) -> None:
    if final.exists():  # --overwrite: the old result stays whole until the new one is in place
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _entry(unit: Unit) -> dict:
    entry = {"id": unit.id, "kind": unit.kind, "inputs": [str(p) for p in unit.inputs], "status": None,
             "reason": "", "outputs": {}, "seconds": 0.0, "modality": unit.modality}
    if unit.series_uid:
        entry["series_uid"] = unit.series_uid
    return entry


def _done_entry(unit: Unit, ctx: _Context, final: Path) -> dict:
    prev = ctx.previous.get(unit.id) or {}
    entry = {**_entry(unit), **{k: v for k, v in prev.items() if k not in ("status", "reason", "seconds")}}
    if not entry.get("outputs"):  # killed between the rename and the manifest write
        entry["outputs"] = {p.name.split(".")[0]: f"{unit.id}/{p.name}" for p in sorted(final.iterdir())}
    entry.update(status="skipped", reason="already done", previous_status=prev.get("status", "ok"),
                 previous_seconds=prev.get("seconds"))
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
    if tmp.exists():
        log.info("unit %s: removing the leftovers of an interrupted run", unit.id)
        shutil.rmtree(tmp)
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


# ----------------------------------------------------------------------------------------- manifests


def read_previous(out: Path) -> dict:
    """id -> entry from manifest.json and any rank manifests a killed distributed run left behind."""
    entries = {}
    for path in [out / MANIFEST, *sorted(out.glob("manifest.rank*.json"))]:
        try:
            for e in json.loads(path.read_text(encoding="utf-8")).get("units", []):
                if e.get("status") == "ok" or e.get("previous_status") == "ok":
                    entries[e["id"]] = e
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            continue
    return entries


def summarise(units: list[dict]) -> dict:
    return {s: sum(1 for u in units if u.get("status") == s) for s in ("ok", "failed", "skipped")}


def merge_rank_manifests(out: Path, world_size: int, order: list[str] | None = None, *,
                         remove: bool = True) -> dict:
    """Merge ``manifest.rank{r}.json`` (r < world_size) into ``manifest.json``, units in ``order``."""
    out = Path(out)
    merged, units, missing = None, [], []
    for r in range(world_size):
        path = out / f"manifest.rank{r}.json"
        try:
            part = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            missing.append(r)
            continue
        merged = merged or {k: v for k, v in part.items() if k not in ("units", "rank")}
        units += part.get("units", [])
    merged = merged or {}
    if order is not None:
        pos = {uid: i for i, uid in enumerate(order)}
        units.sort(key=lambda e: pos.get(e.get("id"), len(pos)))
    merged.update(units=units, summary=summarise(units), world_size=world_size, updated=_now())
    if missing:
        merged["missing_ranks"] = missing
    write_json_atomic(out / MANIFEST, merged)
    if remove and not missing:
        for r in range(world_size):
            (out / f"manifest.rank{r}.json").unlink(missing_ok=True)
    return merged


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def exit_code(units: list[dict]) -> int:
    return 1 if any(u.get("status") == "failed" for u in units) else 0


def format_table(units: list[dict]) -> str:
    width = max([len("unit")] + [len(u["id"]) for u in units])
    lines = [f"{'unit':<{width}}  {'status':<7}  {'seconds':>8}  reason"]
    for u in units:
        lines.append(f"{u['id']:<{width}}  {u['status']:<7}  {u.get('seconds') or 0.0:>8.2f}  {u.get('reason', '')}")
    s = summarise(units)
    lines.append(f"{s['ok']} ok, {s['failed']} failed, {s['skipped']} skipped")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- entry point


def _validate(source: Path, out: Path, task: str, steps: int, samples: int, modality: str | None,
              factor: int | None, model: str | None) -> None:
    if task not in TASKS:
        raise UsageError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if steps < 1 or samples < 1:
        raise UsageError("--steps and --samples must be >= 1")
    if modality is not None and modality.upper() not in MODALITIES:
        raise UsageError(f"--modality must be mr or ct, got {modality!r}")
    if factor is not None and (task != "sr" or factor < 1):
        raise UsageError("--factor takes an integer >= 1 and applies to --task sr only")
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
            meta = json.loads((Path(folder) / "model.json").read_text(encoding="utf-8"))
        except (MedldmError, ImportError, OSError, ValueError) as err:
            raise UsageError(f"--model {model}: {err}") from None
        if meta.get("task") != task:
            raise UsageError(f"--model {model} does {meta.get('task')!r}, not --task {task}")


def _plan(units: list[Unit], ctx: _Context) -> str:
    lines = []
    for u in units:
        if u.skip or u.fail:
            what = f"{'skip' if u.skip else 'fail'}: {u.skip or u.fail}"
        elif (ctx.out / u.id).is_dir() and not ctx.overwrite:
            what = "skip: already done"
        else:
            name = ctx.model or (f"{u.modality.lower()}-{ctx.task}" if u.modality else "? (pass --modality)")
            what = f"run {ctx.task} with model {name}"
        lines.append(f"{u.id}  {u.kind:<12} {len(u.inputs):>4} file(s)  {u.modality or '-':<2}  {what}")
    return "\n".join(lines)


def run_batch(input, output, *, task: str, model: str | None = None, steps: int = 20, samples: int = 1,
              seed: int = 0, modality: str | None = None, factor: int | None = None, device: str | None = None,
              dry_run: bool = False, overwrite: bool = False) -> int:
    """Reconstruct every unit under ``input`` into ``output``. Returns the exit code: 0 all units ok or
    skipped, 1 some unit failed (see manifest.json), 2 usage error (nothing written)."""
    source, out = Path(input), Path(output)
    try:
        _validate(source, out, task, steps, samples, modality, factor, model)
        units, ignored = discover(source, task, modality)
        if model is not None:  # a NIfTI that does not say its modality is taken to be what the model is for
            _fill_modality_from_model(units, model)
        if not any(u.runnable or u.fail for u in units):
            raise UsageError(f"nothing to reconstruct with --task {task} under {source} ({len(units)} unit(s) "
                             f"found, all not applicable; {len(ignored)} other file(s) ignored)")
    except (UsageError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    world, rank = int(os.environ.get("WORLD_SIZE", "1") or 1), int(os.environ.get("RANK", "0") or 0)
    ctx = _Context(out, task, model, steps, samples, seed, factor, _device(device, world), overwrite)
    if dry_run:
        if rank == 0:
            print(_plan(units, ctx))
            print(f"{len(units)} unit(s); {len(ignored)} other file(s) ignored; dry run: nothing written")
        return 0

    out.mkdir(parents=True, exist_ok=True)
    ctx.previous = read_previous(out)
    from medldm.batch_dist import finish_distributed, start_distributed

    group = start_distributed(world) if world > 1 else None
    mine = [u for i, u in enumerate(units) if i % world == rank]
    header = {"medldm_version": __version__, "created": _now(), "input": str(source), "output": str(out),
              "task": task, "model": model, "parameters": {"steps": steps, "samples": samples, "seed": seed,
                                                           "factor": factor, "modality": modality},
              "ignored": ignored[:200], "ignored_count": len(ignored)}
    path = out / (MANIFEST if world == 1 else f"manifest.rank{rank}.json")
    entries: list[dict] = []
    from tqdm.auto import tqdm

    with tqdm(mine, desc="reconstruct", unit="unit", disable=None if rank == 0 else True, file=sys.stderr) as bar:
        for unit in bar:
            bar.set_postfix_str(unit.id, refresh=False)
            entries.append(process_unit(unit, ctx))
            write_json_atomic(path, {**header, "rank": rank, "units": entries, "summary": summarise(entries),
                                     "updated": _now()})
    if world == 1:
        print(format_table(entries))
        print(f"manifest: {path}")
        return exit_code(entries)
    return finish_distributed(group, out, world, rank, [u.id for u in units])


def _fill_modality_from_model(units: list[Unit], model: str) -> None:
    from medldm.sampling.reconstructor import resolve_model

    folder, _ = resolve_model(model)
    meta = json.loads((Path(folder) / "model.json").read_text(encoding="utf-8"))
    value = str(meta.get("modality") or "").upper()
    for u in units:
        if u.kind == "nifti" and u.modality is None and value in MODALITIES:
            u.modality, u.modality_source = value, "model"


def _device(device: str | None, world: int) -> str | None:
    # One GPU per rank under torchrun: rank-local devices, never all ranks on cuda:0.
    if world <= 1 or device not in (None, "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0) % torch.cuda.device_count()}"
