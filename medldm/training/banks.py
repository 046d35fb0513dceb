"""Banks of precomputed VAE latents: (truth, start) pairs for training the latent U-Net without the host.

A U-Net step on latents costs ~0.03 s per 48x48 latent on 2 CPU cores; drawing the patch, degrading it,
computing its guide (TV-POCS: ~0.1 s a patch) and encoding both cost more than that. The bank does that work
once: each data batch of a stream of its own (the refiner stage's patches and physics, seed + 3000) is degraded,
its guide made and both images encoded with the model's frozen VAE. The bank then feeds any number of U-Net
steps, on a CPU or a GPU that no longer waits on the host.

Layout of a bank folder: ``recipe.json`` (what made it: model, VAE digest, degradation, guide, data, seed) and
chunk files ``batches_<a>-<b>.safetensors`` (batches a..b-1 of the stream; float16 ``truth`` and ``start``
latents). A build that stops keeps its chunks and resumes after the last one; a larger ``batches`` extends it.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from medldm.config import LDMRunConfig
from medldm.errors import ConfigError
from medldm.models.bundle import ModelBundle, replace_vae
from medldm.models.device import pick_device
from medldm.models.latent import LatentCodec
from medldm.models.normalisation import Normalisation
from medldm.physics.classical import guide_refusal
from medldm.physics.registry import build_random_operator
from medldm.training import common
from medldm.training.data import PatchBatches, step_stream
from medldm.training.ldm import DegradedPairs
from medldm.training.refiner import GuidedPairs, stage_data

BANK_FORMAT = "medldm-bank/1"
CHUNK_BATCHES = 25  # data batches per chunk file: a stopped build loses at most one chunk
SEED_OFFSET = 3000  # the bank's stream: stage 2 uses the run seed, the refiner stage seed + 2000
VALIDATION_EVERY = 50  # every 50th pair is held out of training (the bridge's validation curve)
_CHUNK = re.compile(r"batches_(\d+)-(\d+)\.safetensors$")


def weights_digest(path: Path) -> str:
    """SHA-256 of a safetensors file's tensors (names, shapes, values as float32), not of its bytes: the same VAE
    saved in float16 (shipped) or float32 (a training run's folder) has one digest."""
    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).float().contiguous()
            h.update(f"{name}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def vae_file(cfg: LDMRunConfig, model_dir: str | Path) -> Path:
    """The weights of the VAE that encodes the bank: ``bridge_stage.vae``'s when set, else the model's own."""
    return Path(cfg.bridge_stage.vae or model_dir) / "vae.safetensors"


def bank_recipe(cfg: LDMRunConfig, bundle: ModelBundle) -> dict:
    """Everything that decides the bank's content, except how many batches it holds."""
    data = stage_data(cfg)
    return {"format": BANK_FORMAT, "model": cfg.name, "vae_weights_sha256": weights_digest(vae_file(cfg, bundle.path)),
            "latent_scale": bundle.latent_scale, "degradation": cfg.degradation.model_dump(),
            "guide": cfg.bridge_stage.guide, "seed": cfg.train.seed + SEED_OFFSET,
            "data": {"datalist": data.datalist, "patch_size": list(data.patch_size), "batch_size": data.batch_size,
                     "augment": data.augment, "slice_axis": data.slice_axis, "modality": data.modality}}


def _chunks(folder: Path) -> list[tuple[int, int, Path]]:
    found = sorted((int(m.group(1)), int(m.group(2)), p) for p in folder.glob("batches_*.safetensors")
                   if (m := _CHUNK.search(p.name)))
    end = 0
    for a, b, p in found:
        if a != end:
            raise ConfigError(f"{folder}: bank chunks are not contiguous ({p.name} starts at batch {a}, expected {end})")
        end = b
    return found


def build_bank(cfg: LDMRunConfig, bundle: ModelBundle, out_dir: str | Path, *, batches: int | None = None,
               workers: int | None = None, device: str | None = None, progress: bool = True) -> Path:
    """Encode ``batches`` data batches (default ``cfg.bridge_stage.bank_batches``) into the bank at ``out_dir``,
    continuing an existing bank of the same recipe. Returns the folder."""
    out = Path(out_dir)
    stage = cfg.bridge_stage
    batches = stage.bank_batches if batches is None else batches
    workers = stage.bank_workers if workers is None else workers
    if bundle.spatial_dims != 2:
        raise ConfigError("latent banks hold 2D slices: a 2D model only")
    if stage.vae:
        bundle = replace_vae(bundle, stage.vae)
    why = guide_refusal(stage.guide, cfg.degradation.task, cfg.data.modality)
    if why:
        raise ConfigError(f"bridge_stage.guide of {cfg.name}: {why}")
    recipe = bank_recipe(cfg, bundle)
    out.mkdir(parents=True, exist_ok=True)
    recipe_path = out / "recipe.json"
    if recipe_path.is_file():
        old = {k: v for k, v in json.loads(recipe_path.read_text()).items() if k in recipe}
        if old != recipe:
            diff = sorted(k for k in recipe if old.get(k) != recipe[k])
            raise ConfigError(f"{out}: a bank of another recipe is there (differs in {', '.join(diff)}); use a new folder")
    done = _chunks(out)[-1][1] if _chunks(out) else 0
    dev = pick_device(device)
    vae = bundle.vae.to(dev).eval()
    codec = LatentCodec(vae, bundle.latent_scale)
    norm = Normalisation.for_modality(cfg.data.modality)
    train_norm = norm if norm.kind == "window" else Normalisation(kind="percentile", scale=1.0)
    random_op = build_random_operator(cfg.degradation.task, cfg.data.modality, **cfg.degradation.kwargs)
    data = stage_data(cfg)
    seed = recipe["seed"]
    pairs = GuidedPairs(DegradedPairs(PatchBatches(data, seed=seed), random_op, train_norm, seed, measurements=True),
                        stage.guide, train_norm)
    seconds = json.loads(recipe_path.read_text()).get("seconds", 0.0) if recipe_path.is_file() else 0.0
    t0 = time.time()
    bar = common.Progress(batches, done, f"bank {cfg.name} ({stage.guide})", progress)
    stream = step_stream(pairs, done, workers) if done < batches else iter(())
    while done < batches:
        stop = min(batches, done + CHUNK_BATCHES)
        truth, start = [], []
        for _ in range(done, stop):
            x, _cond, _ops, _ys, guide = next(stream)
            truth.append(codec.encode(x.to(dev)).half().cpu())
            start.append(codec.encode(guide[:, :1].to(dev)).half().cpu())
            bar.update()
        save_file({"truth": torch.cat(truth).contiguous(), "start": torch.cat(start).contiguous()},
                  str(out / f"batches_{done:06d}-{stop:06d}.safetensors"))
        done = stop
        recipe_path.write_text(json.dumps({**recipe, "batches": done, "pairs": done * data.batch_size,
                                           "seconds": round(seconds + time.time() - t0, 1),
                                           "device_name": common.device_name(dev)}, indent=2))
    bar.close()
    if not recipe_path.is_file():
        recipe_path.write_text(json.dumps({**recipe, "batches": done, "pairs": done * data.batch_size,
                                           "seconds": 0.0}, indent=2))
    return out


class LatentBank:
    """A bank loaded into memory (float16), with seeded minibatches of its training pairs."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / "recipe.json"
        if not path.is_file():
            raise ConfigError(f"{self.folder}: not a latent bank (no recipe.json); make one with medldm train bank")
        self.recipe = json.loads(path.read_text())
        if self.recipe.get("format") != BANK_FORMAT:
            raise ConfigError(f"{path}: unsupported bank format {self.recipe.get('format')!r} (expected {BANK_FORMAT})")
        chunks = _chunks(self.folder)
        if not chunks:
            raise ConfigError(f"{self.folder}: the bank holds no batches yet")
        parts = [load_file(str(p)) for _, _, p in chunks]
        self.truth = torch.cat([p["truth"] for p in parts])
        self.start = torch.cat([p["start"] for p in parts])
        index = np.arange(len(self.truth))
        held = index % VALIDATION_EVERY == 0
        self.train_index, self.val_index = index[~held], index[held]

    def __len__(self) -> int:
        return len(self.truth)

    def batch(self, step: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training minibatch of ``step``: a pure function of (seed, step), so a resumed run repeats it."""
        idx = self.train_index[np.random.default_rng([seed, step]).integers(0, len(self.train_index), size)]
        return self.truth[idx].float(), self.start[idx].float()

    def validation(self, limit: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.val_index[:limit]
        return self.truth[idx].float(), self.start[idx].float()
