"""Train and install the supervised U-Net baseline of each shipped model (the evaluation's supervised row).

    python pipelines/train_supervised_baselines.py [--only mr-recon ...] [--minutes 6] [--profile gpu]

Each baseline sees the same LDM config's data, degradations and patch stream (configs/ldm-<name>-<profile>.yaml)
for a wall-clock budget, has the size of that config's refiner, and is installed as float16 safetensors into
medldm/shipped/supervised/<name>/ (``--no-install`` keeps it in runs/ only).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medldm.config import load_config  # noqa: E402
from medldm.sampling.reconstructor import DEFAULT_MODELS  # noqa: E402
from medldm.training.refiner import stage_data  # noqa: E402
from medldm.evaluation.supervised import SUPERVISED_DIR  # noqa: E402
from medldm.training.supervised import train_supervised  # noqa: E402

NAMES = list(DEFAULT_MODELS)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=NAMES, choices=NAMES)
    ap.add_argument("--minutes", type=float, default=6.0, help="Wall-clock training budget per baseline.")
    ap.add_argument("--profile", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--no-install", action="store_true")
    args = ap.parse_args(argv)
    runs = ROOT / "runs" / ("gpu" if args.profile == "gpu" else "")
    for name in args.only:
        cfg_path = ROOT / "configs" / f"ldm-{name}-{args.profile}.yaml"
        if not cfg_path.is_file():
            ap.error(f"{name} has no {args.profile} profile ({cfg_path.relative_to(ROOT)} missing)")
        cfg = load_config(cfg_path, "ldm")
        # with a refiner stage, the baseline sees that stage's patches and augmentation (a like-for-like row)
        run_dir = train_supervised(cfg, runs / f"supervised-{name}", minutes=args.minutes,
                                   features=tuple(cfg.refiner.features),
                                   data=stage_data(cfg) if cfg.refiner_stage.enabled else None)
        if args.no_install:
            continue
        dest = SUPERVISED_DIR / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(run_dir, dest)
        print(f"installed {name} supervised baseline -> {dest}")


if __name__ == "__main__":
    main()
