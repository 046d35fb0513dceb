"""Rewrite the model card (README.md) of every shipped model from its model.json, training.json and evaluation rows.

    python pipelines/write_model_cards.py                    # from the rows each model folder keeps
    python pipelines/write_model_cards.py --rows outputs/fid-mr-recon   # take a later evaluation's rows
    python pipelines/write_model_cards.py --readme-table     # the README's results table, printed
    python pipelines/write_model_cards.py --speed PROFILE.json ...   # whole-volume seconds into the cards
    python pipelines/write_model_cards.py --multicoil ROWS.json ...  # benchmarks/multicoil_recon.py --json rows

Each shipped folder keeps the rows its card was written from (evaluation.json). `--rows DIR` replaces them,
whole, by a later `medldm evaluate --out DIR` run's DIR/<name>.json for the models DIR has rows for (say, one
with --fid); the other models' cards are rewritten from their stored rows. The table at the end of
data_cards/evaluation.md is then rewritten from the rows of all shipped models (the prose above it is kept).
train_default_models.py stores an install's rows (no FID) and writes its card, not that table. `--speed` keeps a
model's rows of `benchmarks/profile_inference.py --json` as its speed.json, stated in the card's sampling paragraph;
`--multicoil` a model's rows of `benchmarks/multicoil_recon.py --json` (and the baselines') as its multicoil.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medldm.evaluation.evaluate import markdown_table  # noqa: E402
from medldm.evaluation.card import (MULTICOIL_FILE, NOISE_FILE, ROWS_FILE, SPEED_FILE, model_card,  # noqa: E402
                                    results_table, stored)
from medldm.models.model_config import read_model_files  # noqa: E402
from medldm.sampling.reconstructor import DEFAULT_MODELS, SHIPPED_DIR, shipped_models  # noqa: E402

TABLE_START = "\n| model |"


def given_rows(name: str, rows_dir: Path | None) -> list[dict] | None:
    path = rows_dir / f"{name}.json" if rows_dir else None
    if path is None or not path.is_file():
        return None
    rows = json.loads(path.read_text())
    others = sorted({r.get("model") for r in rows} - {name})
    if others:
        raise SystemExit(f"{path}: rows of {others}, not of {name}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=Path, default=None, help="A `medldm evaluate --out` folder with <name>.json rows.")
    ap.add_argument("--speed", nargs="*", type=Path, default=[],
                    help="`benchmarks/profile_inference.py --json` files: each model's rows (one per number of "
                         "samples, later files win) are kept as its speed.json and stated in its card.")
    ap.add_argument("--multicoil", type=Path, nargs="+", default=None,
                    help="A `benchmarks/multicoil_recon.py --json` file: the rows of each model it ran (with the "
                         "baselines') are kept as that model's multicoil.json and shown in its card.")
    ap.add_argument("--readme-table", action="store_true", help="Only print the README's results table (stored "
                    "rows, or those of --rows where it has them); nothing is written.")
    args = ap.parse_args(argv)
    if args.rows is not None and not args.rows.is_dir():
        raise SystemExit(f"--rows {args.rows}: not a folder")
    order = list(DEFAULT_MODELS)
    names = sorted(shipped_models(), key=lambda n: order.index(n) if n in order else len(order))
    kept = {n: stored(SHIPPED_DIR / n, ROWS_FILE) for n in names}
    given = {n: given_rows(n, args.rows) for n in names}
    rows = {n: kept[n] if given[n] is None else given[n] for n in names}
    if args.readme_table:
        missing = [n for n, r in rows.items() if r is None]
        if missing:
            print(f"no evaluation rows for {', '.join(missing)} (see --rows)", file=sys.stderr)
        print(results_table({n: r for n, r in rows.items() if r is not None}), end="")
        return
    evaluation_md = ROOT / "data_cards" / "evaluation.md"
    if evaluation_md.is_file() and TABLE_START not in evaluation_md.read_text():
        raise SystemExit(f"{evaluation_md}: no '| model |' table to replace")
    for name in names:
        if rows[name] is None:
            print(f"{name}: no evaluation rows in {SHIPPED_DIR / name / ROWS_FILE} or --rows; card left as is")
            continue
        config, record = read_model_files(SHIPPED_DIR / name)
        if record.card is None:
            print(f"{name}: training.json has no card command/machine (installed before they were recorded); "
                  "reinstall with pipelines/train_default_models.py --skip-train")
            continue
        _warn_of_dropped_rows(name, kept[name], rows[name])
        speed = given_speed(name, args.speed) or stored(SHIPPED_DIR / name, SPEED_FILE)
        multicoil = given_multicoil(name, args.multicoil) or stored(SHIPPED_DIR / name, MULTICOIL_FILE)
        card = model_card(config, record, rows[name], record.card["command"], record.card["machine"],
                          stored(SHIPPED_DIR / name, NOISE_FILE), speed, multicoil)
        if speed:
            (SHIPPED_DIR / name / SPEED_FILE).write_text(json.dumps(speed, indent=1))
        if multicoil:
            (SHIPPED_DIR / name / MULTICOIL_FILE).write_text(json.dumps(multicoil, indent=1))
        (SHIPPED_DIR / name / ROWS_FILE).write_text(json.dumps(rows[name], indent=1))
        (SHIPPED_DIR / name / "README.md").write_text(card)
        shutil.copy(SHIPPED_DIR / name / "README.md", ROOT / "data_cards" / f"model-{name}.md")
        print(f"{name}: card written")
    write_evaluation_table(evaluation_md, names, rows)


def given_speed(name: str, files: list[Path]) -> list[dict] | None:
    """``name``'s profile rows from ``files`` (a later file's row replaces an earlier one with the same samples),
    dated by the file's modification day when the row does not say."""
    keep = ("shape", "samples", "device", "threads", "latent_runtime", "refiner_runtime", "total", "peak_rss_gib",
            "steps")
    by_samples: dict[int, dict] = {}
    for path in files:
        day = time.strftime("%Y-%m-%d", time.gmtime(path.stat().st_mtime))
        for r in json.loads(path.read_text()):
            if r["model"] == name:
                by_samples[r["samples"]] = {**{k: r.get(k) for k in keep}, "measured": r.get("measured", day)}
    return [by_samples[k] for k in sorted(by_samples)] or None


def given_multicoil(name: str, paths: list[Path] | None) -> dict | None:
    """``benchmarks/multicoil_recon.py --json`` files (e.g. without and with noise) as one, narrowed to ``name``'s
    rows and the baselines' (model "-"); None when ``name`` has no rows there."""
    runs = [json.loads(p.read_text()) for p in paths or []]
    rows = [r for run in runs for r in run["rows"] if r["model"] in (name, "-")]
    if not any(r["model"] == name for r in rows):
        return None
    return {"command": " && ".join(run["command"] for run in runs), "measured": max(run["measured"] for run in runs),
            "slices": runs[0]["slices"], "rows": rows}


def _warn_of_dropped_rows(name: str, old: list[dict] | None, new: list[dict]) -> None:
    kept = {(r["case"], r["method"]) for r in new}
    dropped = [f"{c}: {m}" for c, m in dict.fromkeys((r["case"], r["method"]) for r in old or []) if (c, m) not in kept]
    if dropped:
        print(f"{name}: the new rows lack {len(dropped)} stored ones ({'; '.join(dropped[:4])}"
              f"{'; ...' if len(dropped) > 4 else ''})")


def write_evaluation_table(path: Path, names: list[str], rows: dict[str, list[dict] | None]) -> None:
    """Replace the table at the end of `path` by every named model's rows."""
    if not path.is_file() or any(rows[n] is None for n in names):
        print(f"{path}: left as is (it needs rows for every shipped model)")
        return
    text = path.read_text()
    path.write_text(text[:text.rfind(TABLE_START) + 1] + markdown_table([r for n in names for r in rows[n]]))
    print(f"{path}: table rewritten from {len(names)} models' rows")


if __name__ == "__main__":
    main()
