"""A saved medldm model: one folder, everything needed to rebuild it, no pickles.

    model.json          ModelConfig: format, task, modality, network configs, normalisation, latent scale,
                        refiner guide and cascades, degradation (medldm.models.model_config)
    training.json       TrainingRecord: steps, seconds, stage legs, validation metrics, card command
    vae.safetensors     AutoencoderKL state_dict
    unet.safetensors    DiffusionModelUNet state_dict (EMA weights)      [LDM models]
    refiner.safetensors BasicUNet state_dict                             [when the refiner is enabled]
    README.md           the model card (optional)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medldm import __version__
from medldm.config import VAEConfig
from medldm.errors import ModelError
from medldm.models.builders import build_refiner, build_unet, build_vae
from medldm.models.model_config import FORMAT, ModelConfig, TrainingRecord, read_model_files, write_model_files
from medldm.physics.classical import guide_parts

__all__ = ["FORMAT", "ModelBundle", "load_bundle", "replace_vae", "save_bundle"]


@dataclass
class ModelBundle:
    """Networks plus the configuration that makes their outputs meaningful and the record of their training."""

    config: ModelConfig
    vae: torch.nn.Module
    unet: torch.nn.Module | None = None
    refiner: torch.nn.Module | None = None
    path: Path | None = None
    record: TrainingRecord = field(default_factory=TrainingRecord)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spatial_dims(self) -> int:
        return self.config.spatial_dims

    @property
    def latent_scale(self) -> float:
        if self.config.latent_scale is None:
            raise ModelError(f"{self.path}: the VAE has no latent_scale; run its calibration step (medldm train vae does)")
        return self.config.latent_scale

    @property
    def refiner_residual_on(self) -> str:
        return self.config.refiner.residual_on if self.config.refiner else "naive"

    @property
    def refiner_guide(self) -> str:
        """What the refiner sees beside the decoded estimate (its refiner stage's ``guide``)."""
        return self.config.refiner.guide if self.config.refiner else "naive"

    @property
    def flow_start(self) -> str:
        """Where sampling starts: "noise", or the guide whose latent (plus noise) a flow model starts from."""
        return self.config.scheduler.start if self.config.scheduler else "noise"

    @property
    def refiner_cascades(self) -> int:
        """Refiner passes, each followed by data consistency (the refiner stage's ``cascades``)."""
        return self.config.refiner.cascades if self.config.refiner else 1

    @property
    def vae_config(self) -> VAEConfig:
        return self.config.vae

    def to(self, device) -> "ModelBundle":
        for net in (self.vae, self.unet, self.refiner):
            if net is not None:
                net.to(device)
        return self

    def eval(self) -> "ModelBundle":
        for net in (self.vae, self.unet, self.refiner):
            if net is not None:
                net.eval()
        return self


def _state(module: torch.nn.Module, half: bool = False) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; contiguous clones are cheap at these sizes.
    out = {}
    for k, v in module.state_dict().items():
        v = v.detach().cpu().contiguous().clone()
        out[k] = v.half() if half and v.is_floating_point() else v
    return out


def save_bundle(bundle: ModelBundle, folder: str | Path, card: str | None = None, half: bool = False) -> Path:
    """Write the folder. ``half`` stores weights as float16 (shipped models: half the size; loading
    casts back to float32, which changes outputs by far less than the models' own error)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = bundle.config.model_copy(update={"format": FORMAT, "medldm_version": __version__,
                                              "weights_dtype": "float16" if half else "float32"})
    save_file(_state(bundle.vae, half), str(folder / "vae.safetensors"))
    if bundle.unet is not None:
        save_file(_state(bundle.unet, half), str(folder / "unet.safetensors"))
    if bundle.refiner is not None:
        save_file(_state(bundle.refiner, half), str(folder / "refiner.safetensors"))
    write_model_files(folder, config, bundle.record)
    if card is not None:
        (folder / "README.md").write_text(card)
    bundle.path = folder
    bundle.config = config
    return folder


def load_bundle(folder: str | Path, map_location: str | torch.device = "cpu") -> ModelBundle:
    """Read and validate model.json (and training.json) once, then build the networks and load their weights."""
    folder = Path(folder)
    config, record = read_model_files(folder)
    dims = config.spatial_dims
    vae = build_vae(config.vae, dims)
    _load_into(vae, folder / "vae.safetensors", map_location)
    unet = refiner = None
    if config.unet is not None:
        unet = build_unet(config.unet, dims, config.vae.latent_channels)
        _load_into(unet, folder / "unet.safetensors", map_location)
    if config.refiner_enabled:
        refiner = build_refiner(config.refiner, dims, len(guide_parts(config.refiner.guide)))  # a channel per image
        _load_into(refiner, folder / "refiner.safetensors", map_location)
    return ModelBundle(config=config, vae=vae, unet=unet, refiner=refiner, path=folder, record=record).eval()


def replace_vae(bundle: ModelBundle, vae_folder: str | Path) -> ModelBundle:
    """``bundle`` with the VAE, latent scale and VAE training record of another model folder (a ``medldm train vae``
    run's, say). The U-Net learnt the old VAE's latents, so only a stage that retrains it uses this
    (``bridge_stage.vae``); the refiner is kept, to be retrained on the new decodes."""
    other = load_bundle(vae_folder)
    mine, theirs = bundle.config, other.config
    if (theirs.spatial_dims, theirs.modality, theirs.normalisation.model_copy(update={"latent_fit_on": "input"})) != (
            mine.spatial_dims, mine.modality, mine.normalisation.model_copy(update={"latent_fit_on": "input"})):
        raise ModelError(f"{vae_folder}: its VAE is for {theirs.spatial_dims}D {theirs.modality} with normalisation "
                         f"{theirs.normalisation.model_dump()}, the model is {mine.spatial_dims}D {mine.modality} with "
                         f"{mine.normalisation.model_dump()}")
    bundle.vae = other.vae
    bundle.config = mine.model_copy(update={"vae": theirs.vae, "latent_scale": other.latent_scale})
    bundle.record.training = {**bundle.record.training, "vae_training": other.record.training, "vae_source": str(vae_folder)}
    return bundle


def _load_into(module: torch.nn.Module, path: Path, map_location) -> None:
    if not path.is_file():
        raise ModelError(f"{path}: weights file missing")
    state = load_file(str(path), device=str(map_location))
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that disagree with the config (e.g. a refiner's guide images)
        raise ModelError(f"{path}: weights do not match the config: {str(err).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ModelError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
