"""Rewrite the model card (README.md) of every shipped model from its model.json and its saved evaluation rows.

    python pipelines/write_model_cards.py [--rows outputs/evaluation-full]
    python pipelines/write_model_cards.py --readme-table   # the README's results table, printed

Used after changing the card template, or to put a later `medldm evaluate --out DIR` run (its DIR/<name>.json
rows: supervised U-Net, FID) into the cards; train_default_models.py writes the same cards at install time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medldm.models.card import model_card, results_table  # noqa: E402
from medldm.sampling.reconstructor import DEFAULT_MODELS, SHIPPED_DIR, shipped_models  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=Path, default=None, help="A `medldm evaluate --out` folder with <name>.json rows.")
    ap.add_argument("--readme-table", action="store_true", help="Only print the README's results table from the rows.")
    args = ap.parse_args(argv)
    rows_dir = args.rows or ROOT / "outputs" / "shipped-eval"
    if args.readme_table:
        order = list(DEFAULT_MODELS)
        names = sorted(shipped_models(), key=lambda n: order.index(n) if n in order else len(order))
        rows = {n: json.loads((rows_dir / f"{n}.json").read_text()) for n in names if (rows_dir / f"{n}.json").is_file()}
        print(results_table(rows), end="")
        return
    for name in shipped_models():
        rows_path = rows_dir / f"{name}.json"
        if not rows_path.is_file():
            print(f"{name}: no evaluation rows at {rows_path}; card left as is")
            continue
        meta = json.loads((SHIPPED_DIR / name / "model.json").read_text())
        if "card" not in meta:
            print(f"{name}: model.json has no card command/machine (installed before they were recorded); "
                  "reinstall with pipelines/train_default_models.py --skip-train")
            continue
        card = model_card(meta, json.loads(rows_path.read_text()), meta["card"]["command"], meta["card"]["machine"])
        (SHIPPED_DIR / name / "README.md").write_text(card)
        shutil.copy(SHIPPED_DIR / name / "README.md", ROOT / "data_cards" / f"model-{name}.md")
        print(f"{name}: card written")


if __name__ == "__main__":
    main()
