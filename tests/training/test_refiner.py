import mlflow
import pytest
import torch

from medldm.config import load_config
from medldm.models.bundle import load_bundle
from medldm.training.ldm import train_ldm
from medldm.training.refiner import train_refiner
from medldm.training.vae import train_vae
from tests.training.test_train_ldm import CONFIGS


@pytest.fixture(scope="module")
def tiny_ldm(tiny_datalist, tmp_path_factory):
    over = {"data.datalist": str(tiny_datalist), "tracking.enabled": False}
    vae = train_vae(load_config(CONFIGS / "vae-mr-tiny.yaml", "vae", over), tmp_path_factory.mktemp("vae"))
    cfg = load_config(CONFIGS / "ldm-mr-denoise-tiny.yaml", "ldm", {**over, "vae_path": str(vae)})
    return cfg, train_ldm(cfg, tmp_path_factory.mktemp("ldm"))


def _state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_only_the_refiner_changes_and_the_run_is_logged(tiny_ldm, mlflow_tmp, tmp_path):
    cfg, model = tiny_ldm
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": True})})
    before = load_bundle(model)
    after = load_bundle(train_refiner(cfg, model, tmp_path / "refined", max_steps=3))
    for name in ("vae", "unet"):
        for k, v in getattr(before, name).state_dict().items():
            torch.testing.assert_close(getattr(after, name).state_dict()[k], v, rtol=0, atol=0)
    # init "identity": a fresh refiner whose last layer starts at zero, and three Adam steps move it
    assert cfg.refiner_stage.init == "identity"
    untrained = load_bundle(train_refiner(cfg, model, tmp_path / "zero", max_steps=0)).refiner
    assert not untrained.final_conv.weight.any() and after.refiner.final_conv.weight.abs().sum() > 0
    stage = after.meta["refiner_stage"]
    assert stage["steps"] == 3 and stage["sample_steps"] == cfg.refiner_stage.sample_steps
    run = mlflow.get_run(stage["mlflow_run_id"])
    assert "train/refiner_l1" in run.data.metrics and run.data.tags["medldm.stage"] == "refiner"


def test_resume_ends_where_one_run_ends(tiny_ldm, tmp_path):
    cfg, model = tiny_ldm
    straight = load_bundle(train_refiner(cfg, model, tmp_path / "straight", max_steps=3)).refiner
    train_refiner(cfg, model, tmp_path / "legs", max_steps=2)
    resumed = load_bundle(train_refiner(cfg, model, tmp_path / "legs", max_steps=3, resume=True))
    assert resumed.meta["refiner_stage"]["steps"] == 3
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.refiner.state_dict()[k], v, rtol=0, atol=0)


def test_a_model_without_refiner_is_refused(tiny_ldm, tmp_path):
    from medldm.errors import ModelError
    from medldm.models.bundle import save_bundle

    cfg, model = tiny_ldm
    bare = load_bundle(model)
    bare.refiner = None
    bare.meta["refiner"] = {**bare.meta["refiner"], "enabled": False}
    save_bundle(bare, tmp_path / "bare")
    with pytest.raises(ModelError, match="refiner"):
        train_refiner(cfg, tmp_path / "bare", tmp_path / "out", max_steps=1)


def test_stage_data_takes_the_stage_patches_and_checks_them(tiny_ldm):
    from pydantic import ValidationError

    from medldm.training.refiner import stage_data

    cfg, _ = tiny_ldm
    stage = cfg.refiner_stage.model_copy(update={"patch_size": [32, 16]})
    data = stage_data(cfg.model_copy(update={"refiner_stage": stage}))
    assert data.patch_size == [32, 16] and data.augment and data.datalist == cfg.data.datalist
    bad = cfg.model_copy(update={"refiner_stage": cfg.refiner_stage.model_copy(update={"patch_size": [32]})})
    with pytest.raises(ValidationError, match="patch_size"):
        stage_data(bad)
