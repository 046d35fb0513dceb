"""Which runtime executes a frozen network at inference: torch itself, or OpenVINO's CPU kernels.

On this project's 2-core CPU, OpenVINO ran the pixel refiner 1.75x faster than torch with channels_last (outputs
within 2e-5 on normalised images); it did not beat torch on the VAE or the U-Net, so only the refiner uses it
(``benchmarks/network_backends.py``). OpenVINO is the optional extra ``medldm[fast]``; ``"auto"`` uses it when it is
installed, the network runs on the CPU and the volume is large enough to pay for the conversion; torch otherwise.
"""

from __future__ import annotations

import logging
from importlib import metadata
from typing import TYPE_CHECKING, Callable

from medldm.errors import ModelError

if TYPE_CHECKING:  # torch is imported where a network runs: the batch CLI checks --runtime before loading it
    import torch

RUNTIMES = ("auto", "torch", "openvino")
# Refiner pixel-passes (slices x padded plane x samples x cascades) from which "auto" converts: the conversion
# costs ~3 s and OpenVINO saves ~1 us per pixel-pass here, so a 181x217x181 volume (7.8M) gains and the app's
# 16-slice crops (0.3M) would lose
OPENVINO_MIN_PIXELS = 5_000_000
log = logging.getLogger(__name__)


def openvino_version() -> str | None:
    try:
        return metadata.version("openvino")
    except metadata.PackageNotFoundError:
        return None


class OpenVinoNetwork:
    """``module`` converted once to an OpenVINO model with dynamic batch and plane size, called like the module
    on float32 CPU tensors. Conversion traces the module on a small ``example`` (about 3 s for the refiner); the
    trace keeps no shape-dependent branch, which holds for MONAI's BasicUNet on planes that are multiples of 16,
    as medldm pads them (``slicewise.pad_to_multiple``)."""

    def __init__(self, module: torch.nn.Module, example: torch.Tensor, threads: int | None = None):
        import openvino as ov
        import torch

        with torch.no_grad():
            model = ov.convert_model(module.eval(), example_input=(example,))
        model.reshape([-1, example.shape[1], -1, -1])  # any batch and plane; channels are the network's
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
        self._compiled = ov.Core().compile_model(model, "CPU", config)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        out = self._compiled([x.detach().float().contiguous().numpy()])[0]
        return torch.from_numpy(out)


def wants_openvino(runtime: str, device: torch.device, pixels: int) -> bool:
    """Whether the refiner should run in OpenVINO for ``pixels`` refiner pixel-passes (slices x plane x samples x
    cascades). "auto" only where the conversion (~3 s) pays: OpenVINO installed, the CPU, >= OPENVINO_MIN_PIXELS.
    An explicit "openvino" that cannot run is an error, never a quiet switch to torch."""
    check_runtime(runtime, device)
    if runtime == "auto":
        return openvino_version() is not None and device.type == "cpu" and pixels >= OPENVINO_MIN_PIXELS
    return runtime == "openvino"


def check_runtime(runtime: str, device: torch.device) -> None:
    if runtime not in RUNTIMES:
        raise ModelError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "openvino" and device.type != "cpu":
        raise ModelError(f"the openvino runtime runs on the CPU; this model is on {device}")
    if runtime == "openvino" and openvino_version() is None:
        raise ModelError("the openvino runtime needs OpenVINO: pip install 'medldm[fast]'")


def convert_refiner(refiner: torch.nn.Module, in_channels: int,
                    strict: bool) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """``refiner`` in OpenVINO and "openvino X.Y" for provenance. A conversion failure raises when ``strict``
    (the user asked for OpenVINO); otherwise it is logged and the module itself runs ("torch")."""
    import torch

    try:
        return OpenVinoNetwork(refiner, torch.rand(1, in_channels, 64, 64)), f"openvino {openvino_version()}"
    except Exception as exc:  # noqa: BLE001 - any converter failure: torch still runs the same network
        if strict:
            raise ModelError(f"OpenVINO could not convert the refiner: {type(exc).__name__}: {exc}") from exc
        log.warning("OpenVINO could not convert the refiner (%s: %s); running it in torch", type(exc).__name__, exc)
        return refiner, "torch"
