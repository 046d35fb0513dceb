"""The manifest of `medldm reconstruct`: atomic JSON writes, what an earlier run left (resume), the merge of
torchrun ranks' manifests, the exit code and the tables printed for a run and a dry run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from medldm.batch.units import MANIFEST, Unit


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


def previous_parameters(out: Path) -> dict | None:
    """task, model and parameters of the run that wrote OUTPUT/manifest.json (None: no readable manifest)."""
    try:
        m = json.loads((Path(out) / MANIFEST).read_text(encoding="utf-8"))
        return {"task": m.get("task"), "model": m.get("model"), **(m.get("parameters") or {})}
    except (OSError, ValueError, AttributeError):
        return None


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
    merged.update(units=units, summary=summarise(units), world_size=world_size, updated=utc_now())
    if missing:
        merged["missing_ranks"] = missing
    write_json_atomic(out / MANIFEST, merged)
    if remove and not missing:
        for r in range(world_size):
            (out / f"manifest.rank{r}.json").unlink(missing_ok=True)
    return merged


def utc_now() -> str:
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




def format_plan(units: list[Unit], out: Path, task: str, model: str | None, overwrite: bool) -> str:
    """The --dry-run listing: each unit and what a real run would do with it."""
    lines, width = [], max(len(u.id) for u in units)
    for u in units:
        if u.skip or u.fail:
            what = f"{'skip' if u.skip else 'fail'}: {u.skip or u.fail}"
        elif (Path(out) / u.id).is_dir() and not overwrite:
            what = "skip: already done"
        else:
            name = model or (f"{u.modality.lower()}-{task}" if u.modality else "? (pass --modality)")
            what = f"run {task} with model {name}"
        lines.append(f"{u.id:<{width}}  {u.kind:<12} {len(u.inputs):>4} file(s)  {u.modality or '-':<2}  {what}")
    return "\n".join(lines)
