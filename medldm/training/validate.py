"""Validation helpers shared by the training loops: metrics on held-out images and slice figures."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from medldm.evaluation import metrics  # noqa: E402


def reconstruction_metrics(preds: list[torch.Tensor], refs: list[torch.Tensor]) -> dict[str, float]:
    """Mean PSNR/SSIM over images (2D slices or volumes) with the evaluation's conventions (``evaluation.metrics``:
    data_range = max of each reference, scikit-image SSIM per slice), so validation and the cards agree."""
    pairs = [(p, r) for p, r in zip(preds, refs) if float(r.max()) > 0]  # an empty slice has no data_range
    psnr = [metrics.psnr(r, p) for p, r in pairs]
    ssim = [metrics.ssim(r, p) for p, r in pairs]
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim))}


def _middle_slice(t: torch.Tensor):
    a = t.detach().float().cpu()
    while a.ndim > 2 and a.shape[0] == 1:  # drop batch / channel dims
        a = a[0]
    if a.ndim == 3:  # (X, Y, Z): show the middle axial slice
        a = a[..., a.shape[-1] // 2]
    return a.numpy().T  # index axes (X, Y) shown with X horizontal


def save_slice_figure(images: list[torch.Tensor], titles: list[str], path: str | Path, vmax: float | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = [_middle_slice(t) for t in images]
    vmax = vmax if vmax is not None else float(max(a.max() for a in arrays[:1]))
    fig, axes = plt.subplots(1, len(arrays), figsize=(3 * len(arrays), 3.2))
    for ax, a, title in zip(list(axes) if len(arrays) > 1 else [axes], arrays, titles):
        ax.imshow(a, cmap="gray", vmin=0, vmax=vmax, origin="lower")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
