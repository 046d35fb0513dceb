"""Validation helpers shared by the training loops: metrics on held-out images and slice figures."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure  # noqa: E402


def reconstruction_metrics(preds: list[torch.Tensor], refs: list[torch.Tensor]) -> dict[str, float]:
    """Mean PSNR/SSIM over images, each with data_range = max of its reference (fastMRI convention)."""
    psnr, ssim = [], []
    for p, r in zip(preds, refs):
        rng = float(r.max()) or 1.0
        psnr.append(float(peak_signal_noise_ratio(p, r, data_range=rng)))
        ssim.append(float(structural_similarity_index_measure(p, r, data_range=rng)))
    return {"psnr": sum(psnr) / len(psnr), "ssim": sum(ssim) / len(ssim)}


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
