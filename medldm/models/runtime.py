"""Which runtime executes a frozen network at inference: torch itself, or OpenVINO's CPU kernels.

On this project's 2-core CPU, OpenVINO ran the pixel refiner 1.75x faster than torch with channels_last (outputs
within 2e-5 on normalised images); it did not beat torch on the VAE or the U-Net, so only the refiner uses it
(``benchmarks/network_backends.py``). OpenVINO is the optional extra ``medldm[fast]``; ``"auto"`` uses it when it is
installed, the network runs on the CPU and the volume is large enough to pay for the conversion; torch otherwise.
"""

from __future__ import annotations

import hashlib
import logging
import os
from importlib import metadata
from pathlib import Path
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
    """``module`` converted to an OpenVINO model with dynamic batch and plane size, called like the module on
    float32 CPU tensors. Conversion traces the module on a small ``example`` (about 3 s for the refiner); the trace
    keeps no shape-dependent branch, which holds for MONAI's BasicUNet on planes that are multiples of 16, as
    medldm pads them (``slicewise.pad_to_multiple``). With ``cache_dir`` the converted model is kept there under a
    digest of the weights, the input channels and the versions, and read back (~0.2 s) by later processes."""

    def __init__(self, module: torch.nn.Module, example: torch.Tensor, cache_dir: Path | None = None):
        import openvino as ov
        import torch

        path = None if cache_dir is None else Path(cache_dir) / f"{_digest(module, example.shape[1])}.xml"
        model = _read_cached(path)
        if model is None:
            with torch.no_grad():
                model = ov.convert_model(module.eval(), example_input=(example,))
            model.reshape([-1, example.shape[1], -1, -1])  # any batch and plane; channels are the network's
            _write_cached(model, path)
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": torch.get_num_threads()}  # what torch was told to use
        self._compiled = ov.Core().compile_model(model, "CPU", config)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        out = self._compiled([x.detach().float().contiguous().numpy()])[0]
        return torch.from_numpy(out)


def cache_dir() -> Path:
    """Where converted networks are kept: ``$MEDLDM_CACHE_DIR/openvino``, default ``~/.cache/medldm/openvino``."""
    root = os.environ.get("MEDLDM_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "medldm") / "openvino"


def _digest(module: torch.nn.Module, in_channels: int) -> str:
    import torch

    h = hashlib.sha256(f"{openvino_version()} {torch.__version__} {type(module).__name__} {in_channels}".encode())
    for name, tensor in module.state_dict().items():
        h.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _read_cached(path: Path | None):
    """The kept model when its files are whole (their digest matches the one written last), else None. A damaged
    file is never handed to OpenVINO: its reader then tries every frontend it has, TensorFlow's included, and
    one of those left the process unstable (a later forked DataLoader worker crashed the test process)."""
    if path is None or not path.is_file():
        return None
    import openvino as ov

    try:
        whole = path.with_suffix(".sha256").read_text() == _file_digest(path)
    except OSError:
        whole = False
    if not whole:
        log.warning("ignoring the cached OpenVINO model %s (incomplete or damaged); converting again", path)
        return None
    return ov.Core().read_model(str(path))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    for part in (path, path.with_suffix(".bin")):
        h.update(part.read_bytes())
    return h.hexdigest()


def _write_cached(model, path: Path | None) -> None:
    """IR files written under temporary names and renamed, the digest of both last: it marks a whole entry."""
    if path is None:
        return
    import openvino as ov

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.xml")
        ov.save_model(model, str(tmp), compress_to_fp16=False)  # float16 weights would change the outputs
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(tmp, path)
        digest = path.with_name(f".{path.stem}.{os.getpid()}.sha256")
        digest.write_text(_file_digest(path))
        os.replace(digest, path.with_suffix(".sha256"))
    except OSError as exc:  # a read-only home: the conversion still runs, only not kept
        log.warning("could not keep the converted OpenVINO model in %s (%s)", path.parent, exc)


def wants_openvino(runtime: str, device: torch.device, pixels: int) -> bool:
    """Whether the refiner should run in OpenVINO for ``pixels`` refiner pixel-passes (slices x plane x samples x
    cascades). "auto" only where the conversion (~3 s) pays: OpenVINO installed, the CPU, >= OPENVINO_MIN_PIXELS.
    An explicit "openvino" that cannot run is an error, never a quiet switch to torch."""
    check_runtime(runtime, device)
    if runtime == "auto":
        return openvino_version() is not None and device.type == "cpu" and pixels >= OPENVINO_MIN_PIXELS
    return runtime == "openvino"


def check_runtime(runtime: str, device: torch.device | str | None) -> None:
    """A ModelError unless ``runtime`` can run on ``device`` (None: the CPU, or CUDA where the batch CLI picks it)."""
    if runtime not in RUNTIMES:
        raise ModelError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "openvino" and str(device or "cpu").split(":")[0] != "cpu":
        raise ModelError(f"the openvino runtime runs on the CPU; this model is on {device}")
    if runtime == "openvino" and openvino_version() is None:
        raise ModelError("the openvino runtime needs OpenVINO: pip install 'medldm[fast]'")


def convert_refiner(refiner: torch.nn.Module, in_channels: int,
                    strict: bool) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """``refiner`` in OpenVINO and "openvino X.Y" for provenance. A conversion failure raises when ``strict``
    (the user asked for OpenVINO); otherwise it is logged and the module itself runs ("torch")."""
    import torch

    try:
        net = OpenVinoNetwork(refiner, torch.rand(1, in_channels, 64, 64), cache_dir=cache_dir())
        return net, f"openvino {openvino_version()}"
    except Exception as exc:  # noqa: BLE001 - any converter failure: torch still runs the same network
        if strict:
            raise ModelError(f"OpenVINO could not convert the refiner: {type(exc).__name__}: {exc}") from exc
        log.warning("OpenVINO could not convert the refiner (%s: %s); running it in torch", type(exc).__name__, exc)
        return refiner, "torch"
