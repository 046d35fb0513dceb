"""Seconds per call of a shipped model's networks (U-Net step, VAE encode, VAE decode, refiner) on one batch of
slices, for the ways torch can run them on this machine (figures printed, not a test):

- eager float32, channels_last, channels_last with the upsampling convolutions folded to the low resolution
  (``medldm.models.upsample``; what torch runs in medldm on the CPU), bfloat16 autocast (CPU), torch.compile
  (inductor), OpenVINO in float32 and bfloat16 (``medldm[fast]``; bfloat16 where the CPU has its instructions:
  what medldm's runtime "auto" picks there, ``medldm.models.runtime``) and ONNX Runtime when installed.

Each variant's largest absolute difference from eager float32 is printed beside its time: a backend is only
worth adopting if it is faster *and* its outputs agree (the README table must not move by more than 0.05 dB).

    python benchmarks/network_backends.py [--model mr-denoise] [--slice 181x217] [--batch 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medldm.models.bundle import load_bundle  # noqa: E402
from medldm.models.runtime import vae_halves  # noqa: E402
from medldm.models.upsample import fold_nearest_upsampling  # noqa: E402
from medldm.sampling.reconstructor import resolve_model  # noqa: E402
from medldm.sampling.slicewise import pad_to_multiple  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def networks(bundle, batch: int, shape: tuple[int, int]):
    """(name, module, example inputs) for each network, at the padded size medldm feeds it."""
    x = pad_to_multiple(torch.rand(batch, 1, *shape))[0]
    down = bundle.vae_config.downsample
    z = torch.randn(batch, bundle.vae_config.latent_channels, x.shape[-2] // down, x.shape[-1] // down)
    zin = torch.cat([z, torch.randn_like(z), torch.zeros_like(z[:, :1])], 1)  # z_t, condition latent, its level
    t = torch.full((batch,), 500, dtype=torch.long)

    encode, decode = vae_halves(bundle.vae)
    nets = [("unet step", bundle.unet, (zin, t)), ("vae encode", encode, (x,)),
            ("vae decode", decode, (z,))]
    if bundle.refiner is not None:
        g = next(m for m in bundle.refiner.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
        nets.append(("refiner pass", bundle.refiner, (torch.rand(batch, g, *x.shape[-2:]),)))
    return nets


def variants(module, inputs, wanted):
    yield "eager fp32", lambda: module(*inputs)
    cl_inputs = tuple(i.contiguous(memory_format=torch.channels_last) if i.ndim == 4 else i for i in inputs)
    cl_module = module.to(memory_format=torch.channels_last)
    yield "channels_last", lambda: cl_module(*cl_inputs)
    folded = copy.deepcopy(cl_module)
    fold_nearest_upsampling(folded)  # what medldm runs since 2026-12-07 (c)
    yield "channels_last+folded", lambda: folded(*cl_inputs)
    module.to(memory_format=torch.contiguous_format)

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return module(*inputs).float()
    yield "bf16 autocast", bf16
    compiled = torch.compile(module)
    yield "torch.compile", lambda: compiled(*inputs)
    # converting is slow: only for the runtimes asked for, and only where they are installed
    if "openvino" in wanted and importlib.util.find_spec("openvino"):
        import openvino as ov  # OpenVINO CPU kernels, from a traced module

        converted = ov.convert_model(module, example_input=inputs)  # unfolded: OV has no rule for tensordot
        from medldm.models.runtime import native_bf16

        for precision in ("f32", "bf16") if native_bf16() else ("f32",):  # bf16 needs avx512_bf16 or AMX
            ov_net = ov.compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                         "PERFORMANCE_HINT": "LATENCY",
                                                         "INFERENCE_NUM_THREADS": torch.get_num_threads()})
            yield ("openvino" if precision == "f32" else "openvino bf16"), \
                lambda ov_net=ov_net: torch.from_numpy(ov_net([i.numpy() for i in inputs])[0])
    if "onnxruntime" not in wanted or not importlib.util.find_spec("onnxruntime"):
        return
    import onnxruntime as ort

    path = Path(tempfile.mkdtemp()) / "net.onnx"
    torch.onnx.export(module, inputs, str(path), dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: v.numpy() for i, v in zip(sess.get_inputs(), inputs)}
    yield "onnxruntime", lambda: torch.from_numpy(sess.run(None, feeds)[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mr-denoise")
    ap.add_argument("--slice", default="181x217")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--networks", nargs="+", default=["unet step", "vae encode", "vae decode", "refiner pass"])
    ap.add_argument("--variants", nargs="+", default=["eager fp32", "channels_last", "channels_last+folded",
                                                      "bf16 autocast", "torch.compile", "openvino", "openvino bf16",
                                                      "onnxruntime"],
                    help="bf16 autocast is very slow on CPUs without bfloat16 instructions (30-60 s per call)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    bundle = load_bundle(resolve_model(args.model)[0]).eval()
    shape = tuple(int(v) for v in args.slice.split("x"))
    print(f"{args.model}, batch {args.batch} of {shape}, {torch.get_num_threads()} threads\n")
    print("| network | variant | seconds per call | vs eager | max abs diff |\n|---|---|---|---|---|")
    for name, module, inputs in networks(bundle, args.batch, shape):
        if name not in args.networks:
            continue
        base = None
        for variant, fn in variants(module, inputs, args.variants):
            if variant not in args.variants and variant != "eager fp32":
                continue
            try:
                seconds, out = timed(fn, args.repeats)
            except Exception as exc:  # noqa: BLE001 - a backend that cannot run this network is a finding
                print(f"| {name} | {variant} | failed: {type(exc).__name__}: {str(exc)[:80]} | | |", flush=True)
                continue
            if base is None:
                base = (seconds, out)
            diff = float((out.float() - base[1].float()).abs().max())
            print(f"| {name} | {variant} | {seconds:.3f} | {base[0] / seconds:.2f}x | {diff:.2e} |", flush=True)


if __name__ == "__main__":
    main()
