"""medldm reconstruct under torchrun: each rank takes every world-th unit on its own device, then rank 0 merges the
rank manifests and every rank exits with the merged code."""

from __future__ import annotations

import os
from pathlib import Path

from medldm.batch.manifest import exit_code, format_table, merge_rank_manifests
from medldm.batch.units import MANIFEST


def rank_device(device: str | None, world: int) -> str | None:
    # One GPU per rank under torchrun: rank-local devices, never all ranks on cuda:0.
    if world <= 1 or device not in (None, "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0) % torch.cuda.device_count()}"


def start_distributed() -> bool:
    """Join torchrun's process group (gloo: only barriers and one small broadcast travel); True if we made it."""
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return False
    # Ranks reach the barrier after their own units, which can take hours apart: the default 30 min is too short.
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    return True


def finish_distributed(owned: bool, out: Path, world: int, rank: int, order: list[str]) -> int:
    import torch.distributed as dist

    dist.barrier()
    code = [0]
    if rank == 0:
        merged = merge_rank_manifests(out, world, order)
        print(format_table(merged["units"]))
        print(f"manifest: {out / MANIFEST}")
        code = [exit_code(merged["units"])]
    # Every rank exits with the merged code: torchrun tears the others down when one exits non-zero first.
    dist.broadcast_object_list(code, src=0)
    if owned:
        dist.destroy_process_group()
    return int(code[0])
