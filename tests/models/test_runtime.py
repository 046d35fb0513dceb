"""The networks' runtime: OpenVINO computes what torch computes, and "auto" only converts where it pays.

The tests that compile networks run in a child interpreter of their own (``test_compiling_tests_in_their_own_process``):
OpenVINO's TBB, once it has run in a process, left the long test process fragile (a later forked DataLoader worker
crashed it on 2026-12-07; a segfault after the last test on 2026-12-08, 3 of 4 suite runs before ``runtime``
kept a model alive, 1 of 2 after). The child is what a user's process is: it compiles, runs and must exit cleanly.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from medldm.errors import ModelError
from medldm.models import runtime
from medldm.models.bundle import load_bundle
from medldm.models.upsample import fold_nearest_upsampling
from medldm.sampling.measurement import simulate
from medldm.sampling.reconstructor import Reconstructor
from tests.helpers import make_tiny_bundle
from tests.sampling.test_reconstructor import volume

needs_openvino = pytest.mark.skipif(runtime.openvino_version() is None, reason="medldm[fast] (openvino) not installed")
IN_CHILD = os.environ.get("MEDLDM_TEST_OPENVINO_CHILD") == "1"
# the tests that compile networks: run by test_compiling_tests_in_their_own_process, in a fresh interpreter
compiles = pytest.mark.skipif(not IN_CHILD, reason="compiles networks: runs in a child interpreter of its own")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLDM_CACHE_DIR", str(tmp_path / "cache"))  # never the user's ~/.cache


def _trained_looking(bundle):
    """A tiny bundle whose refiner does something: its last layer is zero when untrained (the identity)."""
    torch.manual_seed(3)
    for p in bundle.refiner.final_conv.parameters():
        p.data.normal_(0, 0.1)
    return bundle


def test_unknown_or_impossible_runtimes_are_refused(tmp_path, monkeypatch):
    bundle = load_bundle(make_tiny_bundle(tmp_path / "m", "denoise"))
    with pytest.raises(ModelError, match="runtime must be one of"):
        Reconstructor(bundle, device="cpu", runtime="onnx")
    monkeypatch.setattr(runtime, "native_bf16", lambda: False)
    with pytest.raises(ModelError, match="bfloat16 instructions"):
        runtime.check_runtime("openvino-bf16", "cpu")
    monkeypatch.setattr(runtime, "openvino_version", lambda: None)
    for name in ("openvino", "openvino-bf16"):
        with pytest.raises(ModelError, match=r"medldm\[fast\]"):
            Reconstructor(bundle, device="cpu", runtime=name)
    # without OpenVINO "auto" is torch, whatever the size
    assert runtime.openvino_plan("auto", torch.device("cpu"), 10**9) is None
    res = Reconstructor(bundle, device="cpu")(volume(), steps=1)
    assert (res.provenance["latent_runtime"], res.provenance["refiner_runtime"]) == ("torch", "torch")


@needs_openvino
def test_auto_plans_by_size_and_by_what_the_cpu_has(monkeypatch):
    cpu = torch.device("cpu")
    assert runtime.openvino_plan("auto", cpu, runtime.OPENVINO_MIN_PIXELS - 1) is None
    monkeypatch.setattr(runtime, "native_bf16", lambda: True)
    assert runtime.openvino_plan("auto", cpu, runtime.OPENVINO_MIN_PIXELS) == ("all", "bf16")
    monkeypatch.setattr(runtime, "native_bf16", lambda: False)  # there only the refiner measured faster
    assert runtime.openvino_plan("auto", cpu, runtime.OPENVINO_MIN_PIXELS) == ("refiner", "f32")
    assert runtime.openvino_plan("torch", cpu, 10**9) is None
    assert runtime.openvino_plan("openvino", cpu, 1) == ("all", "f32")
    with pytest.raises(ModelError, match="runs on the CPU"):
        runtime.openvino_plan("openvino", torch.device("cuda"), 1)


@compiles
@needs_openvino
@pytest.mark.slow
def test_auto_converts_only_volumes_that_pay_for_it(tmp_path, monkeypatch):
    # inside the Reconstructor: slices the networks see (constant ones pass through) x padded plane (32 x 32 for
    # this volume) x samples x cascades
    rec = Reconstructor(load_bundle(make_tiny_bundle(tmp_path / "m", "denoise")), device="cpu")
    seen = int((np.ptp(volume().array[0], axis=(0, 1)) > 0).sum())
    assert 0 < seen <= 9
    monkeypatch.setattr(runtime, "native_bf16", lambda: False)
    monkeypatch.setattr(runtime, "OPENVINO_MIN_PIXELS", seen * 32 * 32 + 1)
    assert rec(volume(), steps=1).provenance["refiner_runtime"] == "torch"
    monkeypatch.setattr(runtime, "OPENVINO_MIN_PIXELS", seen * 32 * 32)
    res = rec(volume(), steps=1)
    assert res.provenance["refiner_runtime"].startswith("openvino") and res.provenance["latent_runtime"] == "torch"
    three_d = load_bundle(make_tiny_bundle(tmp_path / "3d", "denoise", spatial_dims=3))
    with pytest.raises(ModelError, match="2D models"):
        Reconstructor(three_d, device="cpu", runtime="openvino")(volume((40, 40, 20)), steps=1)


@compiles
@pytest.mark.slow  # converts a refiner with OpenVINO (~6 s)
@needs_openvino
def test_openvino_refiner_matches_torch_at_any_batch_and_plane_and_is_converted_once(tmp_path, monkeypatch, caplog):
    import openvino as ov

    bundle = _trained_looking(load_bundle(make_tiny_bundle(tmp_path / "m", "denoise")))
    nets = runtime.convert_networks(bundle, 2, "refiner", "f32", strict=True)
    net = nets.refiner
    assert not (tmp_path / "cache").exists() and nets.refiner_runtime == "torch"  # converted at its first call
    with torch.no_grad():
        net(torch.rand(1, 2, 32, 32))
    assert nets.refiner_runtime.startswith("openvino ") and nets.latent_runtime == "torch"
    assert nets.unet is bundle.unet
    # TBB must never tear down mid-process (that raced with exit and corrupted the heap): a model is kept alive
    assert len(runtime._TBB_KEEPALIVE) == 1
    kept = sorted(p.suffix for p in (tmp_path / "cache" / "openvino").iterdir())
    assert kept == [".bin", ".sha256", ".xml"]  # the converted model, under a digest of weights and versions

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache holds this network")

    monkeypatch.setattr(ov, "convert_model", no_conversion)
    again = runtime.convert_networks(bundle, 2, "refiner", "f32", strict=True).refiner
    with torch.no_grad():
        for shape in [(3, 2, 32, 48), (1, 2, 64, 32)]:
            x = torch.rand(shape)
            np.testing.assert_allclose(net(x).numpy(), bundle.refiner(x).numpy(), atol=1e-5)
            np.testing.assert_array_equal(again(x).numpy(), net(x).numpy())
        # other weights are another network: not read from the cache
        bias = bundle.refiner.final_conv.bias
        kept_bias = bias.clone()
        bias += 1
        with pytest.raises(ModelError, match="could not convert the refiner"):
            runtime.convert_networks(bundle, 2, "refiner", "f32", strict=True).refiner(x)
        bias.copy_(kept_bias)  # (+1 then -1 need not round back to the same bits)
    monkeypatch.undo()
    monkeypatch.setenv("MEDLDM_CACHE_DIR", str(tmp_path / "cache"))
    for xml in (tmp_path / "cache" / "openvino").glob("*.xml"):
        xml.write_text("damaged")  # a damaged entry is converted again and rewritten
    net = runtime.convert_networks(bundle, 2, "refiner", "f32", strict=True).refiner
    x = torch.rand(2, 2, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(net(x).numpy(), bundle.refiner(x).numpy(), atol=1e-5)
    assert "ignoring the cached OpenVINO model" in caplog.text


@compiles
@pytest.mark.slow  # converts a U-Net, a VAE's halves and a refiner (~15 s)
@needs_openvino
def test_every_network_in_openvino_matches_torch_at_any_batch_and_plane(tmp_path):
    """Converted from the networks as the Reconstructor runs them (upsampling folded: the trace takes the plain
    form), timesteps as a DDIM sampler passes them (integers) and as a flow's (fractions)."""
    bundle = _trained_looking(load_bundle(make_tiny_bundle(tmp_path / "m", "denoise")))
    last = [m for m in bundle.unet.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    for p in last.parameters():  # zero when untrained: the U-Net's output would be 0 whatever runs it
        p.data.normal_(0, 0.1)
    for net in (bundle.vae, bundle.unet):
        assert fold_nearest_upsampling(net) > 0
    nets = runtime.convert_networks(bundle, 2, "all", "f32", strict=True)
    ref = runtime.torch_networks(bundle)
    c = bundle.vae_config.latent_channels
    with torch.no_grad():
        for b, h, w in [(3, 8, 12), (1, 16, 8)]:
            z, x = torch.randn(b, c, h, w), torch.rand(b, 1, 4 * h, 4 * w)
            zin = torch.cat([z, torch.randn_like(z), torch.zeros_like(z[:, :1])], 1)
            for t in (torch.full((b,), 700, dtype=torch.long), torch.rand(b) * 1000):
                np.testing.assert_allclose(nets.unet(zin, t).numpy(), ref.unet(zin, t).numpy(), atol=1e-4)
            np.testing.assert_allclose(nets.encode(x).numpy(), ref.encode(x).numpy(), atol=1e-4)
            np.testing.assert_allclose(nets.decode(z).numpy(), ref.decode(z).numpy(), atol=1e-4)
            nets.release_memory()  # as after every volume: the next call allocates again, same outputs
            np.testing.assert_allclose(nets.decode(z).numpy(), ref.decode(z).numpy(), atol=1e-4)
        ref.release_memory()  # torch keeps nothing: a no-op
        x = torch.rand(2, 2, 32, 32)
        np.testing.assert_allclose(nets.refiner(x).numpy(), bundle.refiner(x).numpy(), atol=1e-5)
    assert nets.latent_runtime == nets.refiner_runtime and nets.latent_runtime.startswith("openvino ")
    assert len(list((tmp_path / "cache" / "openvino").glob("*.xml"))) == 4  # four networks, four cache entries
    from monai.networks.nets import diffusion_model_unet

    assert diffusion_model_unet.get_timestep_embedding.__module__ == diffusion_model_unet.__name__  # left as it was
    if runtime.native_bf16():  # the timestep embedding stays float32 (bfloat16 rounds t x frequency near 1000)
        bf16 = runtime.convert_networks(bundle, 2, "all", "bf16", strict=True)
        zin = torch.cat([z, torch.randn_like(z), torch.zeros_like(z[:, :1])], 1)
        t = torch.full((z.shape[0],), 999)
        with torch.no_grad():
            out, want = bf16.unet(zin, t), ref.unet(zin, t)
        assert float((out - want).pow(2).mean().sqrt()) < 0.02 * float(want.pow(2).mean().sqrt())


@compiles
@pytest.mark.slow
@needs_openvino
def test_a_network_that_fails_to_convert_runs_in_torch_and_the_others_stay_converted(tmp_path, monkeypatch, caplog):
    bundle = _trained_looking(load_bundle(make_tiny_bundle(tmp_path / "m", "denoise")))
    convert = runtime._convert

    def fail_on_the_decoder(module, examples, precision):
        if type(module).__name__ == "Decode":
            raise RuntimeError("no rule for this op")
        return convert(module, examples, precision)

    monkeypatch.setattr(runtime, "_convert", fail_on_the_decoder)
    nets = runtime.convert_networks(bundle, 2, "all", "f32", strict=False)
    z = torch.randn(2, bundle.vae_config.latent_channels, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(nets.decode(z).numpy(), bundle.vae.decode(z).numpy(), atol=1e-6)
        nets.encode(torch.rand(2, 1, 32, 32))
    assert "could not convert the VAE decoder" in caplog.text
    assert nets.latent_runtime == f"openvino {runtime.openvino_version()} + torch"  # the U-Net never ran
    with pytest.raises(ModelError, match="could not convert the VAE decoder"):
        runtime.convert_networks(bundle, 2, "all", "f32", strict=True).decode(z)


@compiles
@needs_openvino
@pytest.mark.slow
@pytest.mark.parametrize("task", ["denoise", "recon"])
def test_reconstruction_in_openvino_equals_torch_and_says_so(tmp_path, task):
    """The whole path, the cascaded refiner with data consistency between passes included (recon); the runtimes
    need not agree bit for bit, only to float rounding."""
    bundle = _trained_looking(load_bundle(make_tiny_bundle(tmp_path / task, task)))
    if task == "recon":
        bundle.config.refiner.cascades = 2
        data = simulate(volume((24, 20, 6)), "recon", seed=0, accelerations=[4], center_fractions=[0.08])
    else:
        data = volume()
    ref = Reconstructor(bundle, device="cpu", runtime="torch")(data, steps=1)
    ov = Reconstructor(bundle, device="cpu", runtime="openvino")(data, steps=1)
    assert ref.provenance["refiner_runtime"] == "torch" and ov.provenance["refiner_runtime"].startswith("openvino")
    assert ov.provenance["latent_runtime"] == ov.provenance["refiner_runtime"]
    scale = float(np.abs(ref.volume.array).max())
    np.testing.assert_allclose(ov.volume.array, ref.volume.array, atol=1e-4 * scale)
    if runtime.native_bf16():  # bfloat16 keeps 8 bits of mantissa: near, not equal
        bf16 = Reconstructor(bundle, device="cpu", runtime="openvino-bf16")(data, steps=1)
        assert bf16.provenance["latent_runtime"].endswith(" bf16")
        err = np.abs(bf16.volume.array - ref.volume.array)
        assert err.max() < 0.05 * scale and err.mean() < 0.005 * scale
    assert Reconstructor(bundle, device="cpu", runtime="openvino")(data, steps=1, refine=False).provenance[
        "refiner_runtime"] is None
    rec = Reconstructor(bundle, device="cpu", runtime="openvino")
    assert rec(data, steps=1, use_diffusion=False).provenance["latent_runtime"].startswith("openvino")
    assert rec._converted and all(n.unet.runtime is None for n in rec._converted.values())  # never converted


@pytest.mark.slow
@needs_openvino
@pytest.mark.skipif(IN_CHILD, reason="the child itself")
def test_compiling_tests_in_their_own_process():
    """This module's compiling tests pass in a fresh interpreter, and that interpreter exits with 0: a process that
    compiled and ran networks ends cleanly (exit code 139 there is the crash ``runtime._keep_tbb_alive`` is for)."""
    env = {**os.environ, "MEDLDM_TEST_OPENVINO_CHILD": "1"}
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow", __file__],
                           capture_output=True, text=True, env=env, timeout=900,
                           cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    summary = child.stdout.strip().splitlines()[-1] if child.stdout.strip() else ""
    assert child.returncode == 0, f"exit code {child.returncode}:\n{child.stdout[-6000:]}\n{child.stderr[-3000:]}"
    assert summary.startswith("6 passed"), summary
