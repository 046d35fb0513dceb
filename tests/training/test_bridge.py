"""Latent banks and the bridge stage: deterministic, resumable banks; a flow U-Net trained on them that changes
nothing but the U-Net and its scheduler; resume equal to one run; mismatched banks refused."""

import json

import pytest
import torch
from safetensors.torch import load_file

from medldm.errors import ConfigError
from medldm.models.bundle import load_bundle
from medldm.training.banks import LatentBank, build_bank
from medldm.training.bridge import train_bridge
from tests.training.test_refiner import tiny_ldm  # noqa: F401  (the module's trained tiny model)


def _cfg(cfg, **stage):
    return cfg.model_copy(update={"bridge_stage": cfg.bridge_stage.model_copy(update=stage)})


def test_bank_resumes_to_the_bank_one_build_makes(tiny_ldm, tmp_path):  # noqa: F811
    cfg, model = tiny_ldm
    bundle = load_bundle(model)
    build_bank(cfg, bundle, tmp_path / "one", batches=3, progress=False)
    build_bank(cfg, bundle, tmp_path / "legs", batches=2, progress=False)
    build_bank(cfg, bundle, tmp_path / "legs", batches=3, progress=False)  # continues after batch 2
    one, legs = LatentBank(tmp_path / "one"), LatentBank(tmp_path / "legs")
    assert len(one) == len(legs) == 3 * cfg.data.batch_size
    assert torch.equal(one.truth, legs.truth) and torch.equal(one.start, legs.start)
    recipe = json.loads((tmp_path / "legs" / "recipe.json").read_text())
    assert recipe["batches"] == 3 and recipe["guide"] == "naive" and recipe["degradation"]["task"] == "denoise"
    # the naive guide's latent is the VAE's encoding of the degraded patch, not of the truth
    assert not torch.equal(one.truth, one.start)
    # a bank is a pure function of (recipe, step): the same minibatch for the same step
    assert all(torch.equal(a, b) for a, b in zip(one.batch(5, 4, seed=0), one.batch(5, 4, seed=0)))
    with pytest.raises(ConfigError, match="another recipe"):
        build_bank(_cfg(cfg, guide="nlm"), bundle, tmp_path / "one", batches=4, progress=False)


@pytest.mark.slow
def test_bridge_trains_the_unet_alone_and_resumes_exactly(tiny_ldm, tmp_path):  # noqa: F811
    cfg, model = tiny_ldm
    build_bank(cfg, load_bundle(model), tmp_path / "bank", batches=2, progress=False)
    before = load_bundle(model)
    straight = load_bundle(train_bridge(_cfg(cfg, max_steps=3, val_every=2), model, tmp_path / "bank", tmp_path / "s"))
    assert straight.config.scheduler.kind == "rflow" and straight.flow_start == "naive"
    assert straight.record.stage_legs("bridge")[-1]["steps"] == 3 and straight.record.stage_legs("bridge")[-1]["bank"]["guide"] == "naive"
    for name in ("vae", "refiner"):
        for k, v in getattr(before, name).state_dict().items():
            torch.testing.assert_close(getattr(straight, name).state_dict()[k], v, rtol=0, atol=0)
    assert any(not torch.equal(v, straight.unet.state_dict()[k]) for k, v in before.unet.state_dict().items())
    train_bridge(_cfg(cfg, max_steps=2, val_every=2), model, tmp_path / "bank", tmp_path / "legs")
    resumed = load_bundle(train_bridge(_cfg(cfg, max_steps=3, val_every=2), model, tmp_path / "bank", tmp_path / "legs",
                                       resume=True))
    for k, v in straight.unet.state_dict().items():
        torch.testing.assert_close(resumed.unet.state_dict()[k], v, rtol=0, atol=0)
    history = json.loads((tmp_path / "s" / "history.json").read_text())
    assert {"sample_mse", "start_mse", "spread"} <= set(history[-1])
    with pytest.raises(ConfigError, match="resuming with other"):
        train_bridge(_cfg(cfg, max_steps=4, lr=1e-3), model, tmp_path / "bank", tmp_path / "legs", resume=True)


def test_a_bank_of_another_guide_or_vae_is_refused(tiny_ldm, tmp_path):  # noqa: F811
    cfg, model = tiny_ldm
    build_bank(cfg, load_bundle(model), tmp_path / "bank", batches=1, progress=False)
    with pytest.raises(ConfigError, match="guide"):
        train_bridge(_cfg(cfg, guide="nlm", max_steps=1), model, tmp_path / "bank", tmp_path / "out")
    chunk = next((tmp_path / "bank").glob("batches_*.safetensors"))
    assert set(load_file(str(chunk))) == {"truth", "start"}


def test_the_vae_digest_is_of_its_weights_not_its_file(tmp_path):
    """A shipped VAE (float16) and the same VAE in a training run's folder (float32) must fit the same bank."""
    from safetensors.torch import save_file

    from medldm.training.banks import weights_digest

    w = {"b": torch.randn(3, 2).half(), "a": torch.randn(4).half()}
    save_file(w, tmp_path / "f16.safetensors")
    save_file({k: v.float() for k, v in reversed(list(w.items()))}, tmp_path / "f32.safetensors")
    save_file({**w, "a": w["a"] + 1}, tmp_path / "other.safetensors")
    assert (tmp_path / "f16.safetensors").read_bytes() != (tmp_path / "f32.safetensors").read_bytes()
    assert weights_digest(tmp_path / "f16.safetensors") == weights_digest(tmp_path / "f32.safetensors")
    assert weights_digest(tmp_path / "f16.safetensors") != weights_digest(tmp_path / "other.safetensors")


@pytest.mark.slow
def test_another_vae_encodes_the_bank_and_ships_with_the_fresh_flow(tiny_ldm, tmp_path):  # noqa: F811
    from medldm.training.banks import weights_digest
    from tests.helpers import make_tiny_bundle

    cfg, model = tiny_ldm
    other = make_tiny_bundle(tmp_path / "other", "denoise", "MR", seed=7)  # its VAE stands in for a new VAE run
    wide = _cfg(cfg, vae=str(other), init="fresh", max_steps=1, val_every=1)
    build_bank(wide, load_bundle(model), tmp_path / "bank", batches=1, progress=False)
    recipe = json.loads((tmp_path / "bank" / "recipe.json").read_text())
    assert recipe["vae_weights_sha256"] == weights_digest(other / "vae.safetensors")
    with pytest.raises(ConfigError, match="init: fresh"):
        train_bridge(_cfg(wide, init="model"), model, tmp_path / "bank", tmp_path / "no")
    with pytest.raises(ConfigError, match="vae_weights_sha256"):  # the model's own VAE did not make this bank
        train_bridge(_cfg(cfg, max_steps=1), model, tmp_path / "bank", tmp_path / "no")
    out = load_bundle(train_bridge(wide, model, tmp_path / "bank", tmp_path / "out"))
    for k, v in load_bundle(other).vae.state_dict().items():
        torch.testing.assert_close(out.vae.state_dict()[k], v, rtol=0, atol=0)
    assert out.config.latent_scale == load_bundle(other).config.latent_scale
    assert out.record.training["vae_source"] == str(other) and out.refiner is not None
