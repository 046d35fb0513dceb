"""Test helpers: tiny model bundles with random (but seeded) weights, built in milliseconds.

They exercise every code path of sampling, batch processing and serving without training; tests that
need a *trained* model train the tiny configs instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from medldm.config import RefinerConfig, SchedulerConfig, UNetConfig, VAEConfig
from medldm.models.builders import build_refiner, build_unet, build_vae
from medldm.models.bundle import ModelBundle, save_bundle
from medldm.models.model_config import ModelConfig, ModelRefinerConfig
from medldm.models.normalisation import Normalisation

TINY_VAE = VAEConfig(channels=[8, 16], num_res_blocks=1, latent_channels=2, norm_num_groups=4)
TINY_UNET = UNetConfig(channels=[16, 32], attention_levels=[False, True], num_head_channels=8, norm_num_groups=8)
TINY_REFINER = RefinerConfig(features=[4, 4, 8, 8, 16, 4])


def make_tiny_bundle(folder: str | Path, task: str = "denoise", modality: str = "MR", seed: int = 0,
                     slice_axis: int | None = None, scheduler: str = "ddpm", refiner: bool = True,
                     spatial_dims: int = 2, patch=None, flow_start: str = "noise") -> Path:
    """``spatial_dims=3``: a 3D model whose training patch (default 32x32x16) the tests' volumes exceed.
    ``flow_start``: a flow model (rflow) that starts from that guide's latent instead of noise."""
    torch.manual_seed(seed)
    vae = build_vae(TINY_VAE, spatial_dims)
    unet = build_unet(TINY_UNET, spatial_dims, TINY_VAE.latent_channels)
    ref = build_refiner(TINY_REFINER, spatial_dims) if refiner else None
    kwargs = {"factors": [2]} if task == "sr" else {}
    config = ModelConfig(
        name=f"tiny-{modality.lower()}-{task}", kind="ldm", task=task, modality=modality,
        spatial_dims=spatial_dims, slice_axis=(0 if task == "sr" else 2) if slice_axis is None else slice_axis,
        patch_size=list(patch or ([32, 32] if spatial_dims == 2 else [32, 32, 16])),
        vae=TINY_VAE, latent_scale=1.0, normalisation=Normalisation.for_modality(modality).to_dict(), unet=TINY_UNET,
        scheduler=SchedulerConfig(kind="rflow" if flow_start != "noise" else scheduler, start=flow_start),
        refiner=ModelRefinerConfig(**TINY_REFINER.model_dump()).model_copy(update={"enabled": refiner}),
        degradation={"task": task, "kwargs": kwargs}, cond_noise_max=0.1)
    return save_bundle(ModelBundle(config=config, vae=vae, unet=unet, refiner=ref), folder)



def make_tiny_feature_net(path: str | Path, features: int = 8) -> Path:
    """A TorchScript stand-in for the FID Inception net (user-supplied weights path): fast, 8 features."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, features))
    torch.jit.script(net.eval()).save(str(path))
    return Path(path)


def load_script(folder: str, name: str):
    """A script of ``benchmarks/`` or ``pipelines/`` as a module. They are scripts run by path (``python
    benchmarks/fuzz_dicom.py``), not an installed package; their functions are tested here, from one place."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # importable by name: the fuzzers' spawned workers unpickle its functions
    spec.loader.exec_module(module)
    return module
