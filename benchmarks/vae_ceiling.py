"""VAE(truth) of one or more model folders on the held-out volumes: the ceiling of every latent-only output.

Each volume of the datalist's validation split (the MNI152 slab and the real ITK T1, as `medldm evaluate` crops
them) is normalised, encoded and decoded slice by slice along the model's slice axis (the mean of the
posterior, as inference does), and scored with the evaluation's metrics (PSNR / SSIM, foreground mask).
A VAE-only folder (`medldm train vae`) and a full model folder both work, so a new VAE can be compared with the
shipped one before anything is trained on it. Figures printed, not a test.

    python benchmarks/vae_ceiling.py --model medldm/shipped/mr-recon runs/vae-mr-wide/model [--crop 128,128,16]
        [--scales 0.9 0.95 1 1.05 1.1]

`--scales` also encodes the normalised truth times each factor (and divides the decode by it): inference
normalises by the degraded input's percentile, a few % off the truth's, so a VAE must not depend on the scale.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medldm.evaluation import metrics as M  # noqa: E402
from medldm.evaluation.run import validation_volumes  # noqa: E402
from medldm.models.bundle import load_bundle  # noqa: E402
from medldm.models.latent import LatentCodec  # noqa: E402
from medldm.sampling.slicewise import pad_to_multiple  # noqa: E402


@torch.no_grad()
def vae_truth(bundle, truth: np.ndarray, batch: int = 16, scale: float = 1.0) -> np.ndarray:
    """Encode and decode ``truth`` (X, Y, Z) slice-wise along the model's slice axis, in its units; ``scale``
    multiplies the normalised slices before encoding (the decode is divided by it)."""
    t = torch.from_numpy(truth)[None, None]
    norm = bundle.config.normalisation.unfitted().fit(t)
    axis = bundle.config.slice_axis
    slices = norm.forward(t)[0, 0].movedim(axis, 0)[:, None]
    padded, (h, w) = pad_to_multiple(slices)
    codec = LatentCodec(bundle.vae, bundle.config.latent_scale or 1.0, intensity=1 / scale)
    out = torch.cat([codec.decode(codec.encode(padded[i:i + batch])) for i in range(0, len(padded), batch)])
    return norm.inverse(out[:, 0, :h, :w].movedim(0, axis)).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", required=True, help="model folders (VAE-only or full)")
    ap.add_argument("--datalist", default="data/datalist.json")
    ap.add_argument("--crop", default="128,128,16", help="centre crop like medldm evaluate; 'none' for whole volumes")
    ap.add_argument("--scales", nargs="+", type=float, default=[1.0], help="intensity factors of the normalised truth")
    args = ap.parse_args()
    crop = None if args.crop == "none" else tuple(int(c) for c in args.crop.split(","))
    torch.set_grad_enabled(False)
    vols = None
    print("| model | case | " + " | ".join(f"x{s:g}: PSNR / SSIM" for s in args.scales) + " | seconds |")
    print("|---|---|" + "---|" * len(args.scales) + "---|")
    for folder in args.model:
        bundle = load_bundle(folder)
        vols = vols or validation_volumes(args.datalist, bundle.config.modality, crop)
        for name, vol in vols.items():
            truth = vol.array[0].astype(np.float32)
            t0, cells = time.time(), []
            for scale in args.scales:
                m = M.all_metrics(truth, vae_truth(bundle, truth, scale=scale), M.foreground_mask(truth))
                cells.append(f"{m['psnr']:.2f} / {m['ssim']:.3f}")
            print(f"| {folder} | {name} | {' | '.join(cells)} | {time.time() - t0:.1f} |")


if __name__ == "__main__":
    main()
