"""Which runtime executes a 2D model's frozen networks at inference: torch itself, or OpenVINO's CPU kernels.

``runtime`` is one of:

- "torch": every network in torch (float32 on the CPU): the reference.
- "openvino": every network (U-Net, VAE encoder and decoder, refiner) converted to OpenVINO, float32.
- "openvino-bf16": the same in bfloat16 arithmetic, on CPUs with bfloat16 instructions (avx512_bf16 or AMX).
- "auto" (the default): on the CPU, for volumes large enough to pay for converting (``OPENVINO_MIN_PIXELS``) and
  with OpenVINO installed (the optional extra ``medldm[fast]``): "openvino-bf16" where the CPU has bfloat16
  instructions, else the refiner alone in OpenVINO float32; torch otherwise.

Why (``benchmarks/network_backends.py``): on a 2-core AMD EPYC with avx512_bf16, per 16-slice batch of 181x217,
OpenVINO bf16 ran the U-Net 2.2x, the encoder 2.3x, the decoder 2.4x and the refiner 1.9x faster than what
torch runs (channels_last, folded upsampling; refiner: OpenVINO float32); on a CPU without bfloat16
instructions OpenVINO float32 beat torch on the refiner only (1.75x). bfloat16's outputs differ by ~1e-3 of the
image's scale; the held-out figures they give are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from medldm.errors import ModelError

if TYPE_CHECKING:  # torch is imported where a network runs: the batch CLI checks --runtime before loading it
    import torch

    from medldm.models.bundle import ModelBundle

RUNTIMES = ("auto", "torch", "openvino", "openvino-bf16")
# Pixel-passes (slices x padded plane x samples x refiner cascades) from which "auto" converts: converting costs
# ~3 s per network (once per machine: the result is kept in cache_dir()) and saves ~1 us per pixel-pass here, so a
# 181x217x181 volume (7.8M) gains and the app's 16-slice crops (0.3M) would lose
OPENVINO_MIN_PIXELS = 5_000_000
# part of a converted model's cache key with the versions: raise it when what is traced changes (the U-Net's
# embedding given as an input, the folded upsampling's plain form), so no older conversion is read back
CONVERSION_FORMAT = 2
log = logging.getLogger(__name__)


def openvino_version() -> str | None:
    try:
        return metadata.version("openvino")
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether OpenVINO runs bfloat16 natively on this CPU (False without OpenVINO)."""
    if openvino_version() is None:
        return False
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@dataclass(frozen=True)
class Networks:
    """What runs each network of a model: ``unet(x, t)``, ``encode(images) -> latent mean``, ``decode(latent)``
    and ``refiner(x)`` (None without one)."""

    unet: Callable
    encode: Callable
    decode: Callable
    refiner: Callable | None

    @property
    def latent_runtime(self) -> str:
        """What ran the U-Net and the VAE, for provenance (networks never called are left out)."""
        ran = {_runtime_of(n) for n in (self.unet, self.encode, self.decode)} - {None}
        return " + ".join(sorted(ran)) or "torch"

    @property
    def refiner_runtime(self) -> str | None:
        return None if self.refiner is None else _runtime_of(self.refiner) or "torch"

    def release_memory(self) -> None:
        """Hand back what the OpenVINO networks keep between calls (torch keeps nothing)."""
        for net in (self.unet, self.encode, self.decode, self.refiner):
            if isinstance(net, LazyOpenVino):
                net.release_memory()


def _runtime_of(net) -> str | None:
    return net.runtime if isinstance(net, LazyOpenVino) else "torch"


def torch_networks(bundle: ModelBundle) -> Networks:
    vae = bundle.vae
    return Networks(unet=bundle.unet, encode=lambda x: vae.encode(x)[0], decode=vae.decode, refiner=bundle.refiner)


class LazyOpenVino:
    """A network converted at its first call, so one a path never calls (the U-Net without diffusion) is never
    converted. A failed conversion raises when ``strict`` (the user asked for OpenVINO); otherwise it is logged and
    the torch module runs. ``runtime``: what ran it (None before the first call)."""

    def __init__(self, what: str, convert: Callable[[], Callable], module: Callable, name: str, strict: bool):
        self.what, self._convert, self._module, self._name, self._strict = what, convert, module, name, strict
        self._net: Callable | None = None
        self.runtime: str | None = None

    def __call__(self, *xs):
        if self._net is None:
            try:
                self._net, self.runtime = self._convert(), self._name
            except Exception as exc:  # noqa: BLE001 - any converter failure: torch runs the same network
                if self._strict:
                    raise ModelError(f"OpenVINO could not convert the {self.what}: {type(exc).__name__}: "
                                     f"{exc}") from exc
                log.warning("OpenVINO could not convert the %s (%s: %s); running it in torch", self.what,
                            type(exc).__name__, exc)
                self._net, self.runtime = self._module, "torch"
        return self._net(*xs)

    def release_memory(self) -> None:
        if isinstance(self._net, (OpenVinoNetwork, _UNetWithTorchEmbedding)):
            self._net.release_memory()


class OpenVinoNetwork:
    """``module`` converted to an OpenVINO model with dynamic batch and plane size, called like the module on
    float32 CPU tensors (any input is passed as float32). Conversion traces the
    module on small ``examples`` (~3 s for the refiner); the trace keeps no shape-dependent branch, which holds for
    MONAI's networks on planes that are multiples of 16, as medldm pads them (``slicewise.pad_to_multiple``). With
    ``cache_dir`` the converted model is kept there under a digest of the weights, the example inputs' channels and
    the versions, and read back (~0.2 s) by later processes. ``precision``: "f32" or "bf16"."""

    def __init__(self, module: torch.nn.Module, examples: tuple[torch.Tensor, ...], cache_dir: Path | None = None,
                 precision: str = "f32"):
        import openvino as ov
        import torch

        examples = tuple(e.float() for e in examples)
        path = None if cache_dir is None else Path(cache_dir) / f"{_digest(module, examples)}.xml"
        model = _read_cached(path)
        if model is None:
            with torch.no_grad():
                model = ov.convert_model(module.eval(), example_input=examples)
            # any batch and plane; channels are the network's
            model.reshape({i: [-1, *e.shape[1:2], *([-1] * (e.ndim - 2))] for i, e in enumerate(examples)})
            _write_cached(model, path)
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": torch.get_num_threads()}  # what torch was told to use
        _keep_tbb_alive(config["INFERENCE_NUM_THREADS"])
        self._compiled = ov.Core().compile_model(model, "CPU", config)

    def __call__(self, *xs: torch.Tensor) -> torch.Tensor:
        import torch

        out = self._compiled([x.detach().float().contiguous().numpy() for x in xs])[0]
        return torch.from_numpy(out)

    def release_memory(self) -> None:
        """Free the intermediate buffers OpenVINO keeps for the next call (the four networks of mr-recon kept ~1 GiB
        at 16 slices of 181 x 217); a later call allocates them again."""
        self._compiled.release_memory()


def _keep_tbb_alive(threads: int) -> None:
    """Hold one tiny compiled model for the rest of the process, never released.

    Why: OpenVINO runs on TBB, and when the last compiled model of a process is released TBB tears its thread pool
    and hwloc topology down from one of its own threads. That teardown raced with process exit (and with the next
    compilation) and corrupted the C heap: the test process died in a segfault after all tests passed (3 of 4
    suite runs here, and CI), and glibc's checking allocator (``GLIBC_TUNABLES=glibc.malloc.check=3`` with
    libc_malloc_debug preloaded) caught ``free(): invalid next size`` in hwloc_topology_destroy in 3 of 16 runs of
    a script that compiled and ran one small network; with such a model kept alive, 0 of 12 (also 0 of 12 with
    networks compiled and released five times over). The long test process still crashed once in 2 runs with it,
    so the tests that compile run in a child interpreter (tests/models/test_runtime.py). The kept model is one ReLU
    on one float."""
    if _TBB_KEEPALIVE:
        return
    import ctypes

    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([1], np.float32)
    compiled = ov.Core().compile_model(ov.Model([ops.relu(x)], [x]), "CPU", {"INFERENCE_NUM_THREADS": threads})
    compiled(np.zeros(1, np.float32))
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(compiled))  # not even interpreter shutdown releases it
    _TBB_KEEPALIVE.append(compiled)


_TBB_KEEPALIVE: list = []


def cache_dir() -> Path:
    """Where converted networks are kept: ``$MEDLDM_CACHE_DIR/openvino``, default ``~/.cache/medldm/openvino``."""
    root = os.environ.get("MEDLDM_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "medldm") / "openvino"


def _digest(module: torch.nn.Module, examples: tuple[torch.Tensor, ...]) -> str:
    import torch

    import monai

    inputs = " ".join(f"{e.ndim}d{e.shape[1] if e.ndim > 1 else ''}" for e in examples)
    h = hashlib.sha256(f"{CONVERSION_FORMAT} {openvino_version()} {torch.__version__} {monai.__version__} "
                       f"{type(module).__name__} {inputs}".encode())
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


def openvino_plan(runtime: str, device: torch.device, pixels: int) -> tuple[str, str] | None:
    """(which networks OpenVINO runs: "all" or "refiner", precision "f32" or "bf16") for ``pixels`` pixel-passes
    (slices x padded plane x samples x refiner cascades), or None: torch runs them all. "auto" converts only where
    it pays (OpenVINO installed, the CPU, >= OPENVINO_MIN_PIXELS); an explicit OpenVINO runtime that cannot run is
    an error (``check_runtime``), never a quiet switch to torch."""
    check_runtime(runtime, device)
    if runtime == "auto":
        if openvino_version() is None or device.type != "cpu" or pixels < OPENVINO_MIN_PIXELS:
            return None
        return ("all", "bf16") if native_bf16() else ("refiner", "f32")
    return {"torch": None, "openvino": ("all", "f32"), "openvino-bf16": ("all", "bf16")}[runtime]


def check_runtime(runtime: str, device: torch.device | str | None) -> None:
    """A ModelError unless ``runtime`` can run on ``device`` (None: the CPU, or CUDA where the batch CLI picks it)."""
    if runtime not in RUNTIMES:
        raise ModelError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime.startswith("openvino") and str(device or "cpu").split(":")[0] != "cpu":
        raise ModelError(f"the {runtime} runtime runs on the CPU; this model is on {device}")
    if runtime.startswith("openvino") and openvino_version() is None:
        raise ModelError(f"the {runtime} runtime needs OpenVINO: pip install 'medldm[fast]'")
    if runtime == "openvino-bf16" and not native_bf16():
        raise ModelError("the openvino-bf16 runtime needs a CPU with bfloat16 instructions (avx512_bf16 or AMX); "
                         "this one has none: use openvino or auto")


def convert_networks(bundle: ModelBundle, refiner_channels: int, which: str, precision: str,
                     strict: bool) -> Networks:
    """``bundle``'s networks with ``which`` ("all" or "refiner") in OpenVINO at ``precision``, each converted at
    its first call (:class:`LazyOpenVino`; with the torch module as its fallback unless ``strict``)."""
    import torch

    nets = torch_networks(bundle)
    name = f"openvino {openvino_version()}" + (" bf16" if precision == "bf16" else "")

    def lazy(what, module, convert):
        return LazyOpenVino(what, convert, module, name, strict)

    refiner = nets.refiner if bundle.refiner is None else lazy(
        "refiner", bundle.refiner, lambda: _convert(bundle.refiner, (torch.rand(1, refiner_channels, 64, 64),),
                                                    precision))
    if which == "refiner":
        return Networks(nets.unet, nets.encode, nets.decode, refiner)
    down = bundle.vae_config.downsample
    z = torch.randn(1, bundle.vae_config.latent_channels, 16, 16)  # the latent of a 16 * down square image
    encoder, decoder = vae_halves(bundle.vae)
    x = torch.rand(1, 1, 16 * down, 16 * down)
    return Networks(lazy("U-Net", bundle.unet, lambda: _UNetWithTorchEmbedding(bundle.unet, precision)),
                    lazy("VAE encoder", nets.encode, lambda: _convert(encoder, (x,), precision)),
                    lazy("VAE decoder", nets.decode, lambda: _convert(decoder, (z,), precision)), refiner)


class _UNetWithTorchEmbedding:
    """MONAI's diffusion U-Net in OpenVINO with its sinusoidal timestep embedding computed in torch, in float32, and
    passed in: in bfloat16, t x frequency near t = 1000 is rounded to steps of 4, which moved the U-Net's output by
    4% (rms, relative) at t = 999 against 0.7% with the embedding given (mr-recon, 4 slices of 181 x 217)."""

    def __init__(self, unet, precision: str):
        import torch
        from monai.networks.nets import diffusion_model_unet as dmu

        self._embed, self._dim = dmu.get_timestep_embedding, unet.block_out_channels[0]
        channels = next(m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
        examples = (torch.randn(1, channels, 16, 16), self._embed(torch.full((1,), 500.0), self._dim))
        self._net = _convert(_embedding_given(unet), examples, precision)

    def __call__(self, x, t):
        return self._net(x, self._embed(t, self._dim))

    def release_memory(self) -> None:
        self._net.release_memory()


def _embedding_given(unet):
    """A module running ``unet``'s own forward with the timestep embedding as its second input: the forward's code
    with ``get_timestep_embedding`` bound to the identity in a copy of its globals (MONAI's module is untouched, so
    a torch U-Net elsewhere in the process is unaffected)."""
    import types

    import torch

    forward = type(unet).forward
    names = {**forward.__globals__, "get_timestep_embedding": lambda embedding, *args, **kwargs: embedding}
    given = types.FunctionType(forward.__code__, names, forward.__name__, forward.__defaults__, forward.__closure__)
    given.__kwdefaults__ = forward.__kwdefaults__

    class EmbeddingGiven(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, x, embedding):
            return given(self.unet, x, embedding)

    return EmbeddingGiven()


def _convert(module, examples, precision):
    return OpenVinoNetwork(module, examples, cache_dir=cache_dir(), precision=precision)


def vae_halves(vae: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Modules for the VAE's encoder (images -> latent mean, as ``LatentCodec`` uses it) and decoder: what a
    converter traces."""
    import torch

    class Encode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, x):
            return self.vae.encode(x)[0]

    class Decode(Encode):
        def forward(self, z):
            return self.vae.decode(z)

    return Encode(), Decode()
