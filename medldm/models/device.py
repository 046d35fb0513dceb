"""Where and in which precision the networks run: shared by inference (sampling, evaluation) and training."""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch


def pick_device(requested: str | None = None) -> torch.device:
    """The requested device, else CUDA (this DDP process's GPU) when there is one, else the CPU."""
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but CUDA is not available")
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on CUDA when enabled; the CPU always runs float32."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
