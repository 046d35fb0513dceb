"""Figures people look at instead of tables: three planes of input, baselines, medldm, truth, error, std."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def planes(vol: np.ndarray) -> list[np.ndarray]:
    """Middle axial (XY), coronal (XZ) and sagittal (YZ) planes, oriented for display."""
    x, y, z = (s // 2 for s in vol.shape)
    return [vol[:, :, z].T, vol[:, y, :].T, vol[x, :, :].T]


def case_figure(truth: np.ndarray, naive: np.ndarray, outputs: dict[str, np.ndarray], std: np.ndarray | None,
                path: str | Path, title: str = "", max_methods: int = 5) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = [k for k in outputs if not k.startswith("medldm") or k == "medldm (default)"][:max_methods]
    default = outputs.get("medldm (default)")
    cols = [("input (naive inverse)", naive)] + [(k, outputs[k]) for k in keep] + [("ground truth", truth)]
    if default is not None:
        cols.append(("|error| medldm x3", np.abs(default - truth) * 3))
    if std is not None:
        cols.append(("std (uncertainty) x3", std * 3))
    lo, hi = float(np.percentile(truth, 0.5)), float(np.percentile(truth, 99.5))
    fig, axes = plt.subplots(3, len(cols), figsize=(2.2 * len(cols), 6.8), squeeze=False)
    for j, (name, vol) in enumerate(cols):
        err_like = name.startswith(("|error|", "std"))
        for i, plane in enumerate(planes(vol)):
            ax = axes[i, j]
            ax.imshow(plane, cmap="magma" if err_like else "gray", vmin=0 if err_like else lo,
                      vmax=(hi - lo) if err_like else hi, origin="lower", aspect="auto")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
