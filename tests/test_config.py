import pytest

from medldm.config import LDMRunConfig, VAERunConfig, load_config
from medldm.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_shipped_configs_all_load():
    from pathlib import Path

    files = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
    assert files
    for f in files:
        cfg = load_config(f)
        assert isinstance(cfg, (VAERunConfig, LDMRunConfig)), f


def test_unknown_field_names_field_and_file(tmp_path):
    p = write(tmp_path, "kind: vae\nname: x\nvae: {channels: [8, 16], latnt_channels: 3, norm_num_groups: 4}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "vae.latnt_channels" in str(e.value) and str(p) in str(e.value)


def test_wrong_type_is_reported(tmp_path):
    p = write(tmp_path, "kind: vae\nname: x\ntrain: {steps: many}\n")
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(p)


def test_impossible_values_rejected(tmp_path):
    p = write(tmp_path, "kind: vae\nname: x\nvae: {channels: [10, 16], norm_num_groups: 4}\n")
    with pytest.raises(ConfigError, match="divisible"):
        load_config(p)
    p = write(tmp_path, "kind: vae\nname: x\ndata: {spatial_dims: 3, patch_size: [32, 32]}\n")
    with pytest.raises(ConfigError, match="patch_size"):
        load_config(p)
    p = write(tmp_path, "kind: vae\nname: x\ndata: {source_weights: {mni152: 0}}\n")
    with pytest.raises(ConfigError, match="source weights must be > 0"):
        load_config(p)


def test_kind_mismatch_and_missing_file(tmp_path):
    p = write(tmp_path, "kind: vae\nname: x\n")
    with pytest.raises(ConfigError, match="kind"):
        load_config(p, "ldm")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_apply_and_validate(tmp_path):
    p = write(tmp_path, "kind: vae\nname: x\n")
    assert load_config(p, overrides={"train.steps": 7}).train.steps == 7
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(p, overrides={"train.steps": -1})


def test_perceptual_loss_requires_local_weights(tmp_path):
    p = write(tmp_path, "kind: vae\nname: x\ntrain: {perceptual_weight: 0.1}\n")
    with pytest.raises(ConfigError, match="never downloads"):
        load_config(p)
