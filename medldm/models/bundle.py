"""A saved medldm model: one folder, everything needed to rebuild it, no pickles.

    model.json          format, medldm version, task, modality, configs, normalisation, latent scale,
                        operator defaults, validation metrics, training record
    vae.safetensors     AutoencoderKL state_dict
    unet.safetensors    DiffusionModelUNet state_dict (EMA weights)      [LDM models]
    refiner.safetensors BasicUNet state_dict                             [when the refiner is enabled]
    README.md           the model card (optional)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medldm import __version__
from medldm.config import RefinerConfig, SchedulerConfig, UNetConfig, VAEConfig, parse_config
from medldm.errors import ModelError
from medldm.models.builders import build_refiner, build_unet, build_vae
from medldm.physics.classical import guide_parts

FORMAT = "medldm-model/1"


@dataclass
class ModelBundle:
    """Networks plus the metadata that makes their outputs meaningful."""

    meta: dict[str, Any]
    vae: torch.nn.Module
    unet: torch.nn.Module | None = None
    refiner: torch.nn.Module | None = None
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spatial_dims(self) -> int:
        return int(self.meta["spatial_dims"])

    @property
    def latent_scale(self) -> float:
        scale = self.meta.get("latent_scale")
        if scale is None:
            raise ModelError(f"{self.path}: the VAE has no latent_scale; run its calibration step (medldm train vae does)")
        return float(scale)

    @property
    def refiner_residual_on(self) -> str:
        # models saved before residual_on existed added the correction to the decoded estimate
        return (self.meta.get("refiner") or {}).get("residual_on", "decoded")

    @property
    def refiner_guide(self) -> str:
        """What the refiner sees beside the decoded estimate (the refiner stage's ``guide``; naive before it)."""
        return refiner_guide(self.meta)

    @property
    def flow_start(self) -> str:
        """Where sampling starts: "noise", or the guide whose latent (plus noise) a flow model starts from."""
        return str((self.meta.get("scheduler") or {}).get("start", "noise"))

    @property
    def refiner_cascades(self) -> int:
        """Refiner passes, each followed by data consistency (the refiner stage's ``cascades``; 1 before it)."""
        return int((self.meta.get("refiner_stage") or {}).get("cascades", 1))

    @property
    def vae_config(self) -> VAEConfig:
        return parse_config(self.meta["vae"], VAEConfig, f"{self.path}/model.json:vae")

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
    meta = {**bundle.meta, "format": FORMAT, "medldm_version": __version__,
            "weights_dtype": "float16" if half else "float32"}
    save_file(_state(bundle.vae, half), str(folder / "vae.safetensors"))
    if bundle.unet is not None:
        save_file(_state(bundle.unet, half), str(folder / "unet.safetensors"))
    if bundle.refiner is not None:
        save_file(_state(bundle.refiner, half), str(folder / "refiner.safetensors"))
    tmp = folder / "model.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    tmp.replace(folder / "model.json")
    if card is not None:
        (folder / "README.md").write_text(card)
    bundle.path = folder
    bundle.meta = meta
    return folder


def read_meta(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    meta_path = folder / "model.json"
    if not meta_path.is_file():
        raise ModelError(f"{folder}: not a medldm model folder (no model.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ModelError(f"{meta_path}: unsupported model format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def refiner_guide(meta: dict) -> str:
    """The guide a saved model's refiner sees (its refiner stage's ``guide``; the naive inverse before it)."""
    return str((meta.get("refiner_stage") or {}).get("guide", "naive"))


def load_bundle(folder: str | Path, map_location: str | torch.device = "cpu") -> ModelBundle:
    folder = Path(folder)
    meta = read_meta(folder)
    dims = int(meta["spatial_dims"])
    vae_cfg = parse_config(meta["vae"], VAEConfig, f"{folder}/model.json:vae")
    vae = build_vae(vae_cfg, dims)
    _load_into(vae, folder / "vae.safetensors", map_location)
    unet = refiner = None
    if meta.get("unet") is not None:
        unet = build_unet(parse_config(meta["unet"], UNetConfig, f"{folder}/model.json:unet"), dims, vae_cfg.latent_channels)
        _load_into(unet, folder / "unet.safetensors", map_location)
        parse_config(meta["scheduler"], SchedulerConfig, f"{folder}/model.json:scheduler")
    if meta.get("refiner") is not None and meta["refiner"].get("enabled", False):
        try:
            guide_images = len(guide_parts(refiner_guide(meta)))  # one refiner input channel each
        except ValueError as err:
            raise ModelError(f"{folder}/model.json: refiner_stage.guide: {err}") from None
        refiner = build_refiner(parse_config(meta["refiner"], RefinerConfig, f"{folder}/model.json:refiner"), dims,
                                guide_images)
        _load_into(refiner, folder / "refiner.safetensors", map_location)
    return ModelBundle(meta=meta, vae=vae, unet=unet, refiner=refiner, path=folder).eval()


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
