"""model.json is typed and versioned: validated once, old formats converted, unknown ones refused."""

import json

import pytest

from medldm.errors import ModelError
from medldm.models.bundle import load_bundle, save_bundle
from medldm.models.model_config import FORMAT, convert_folder, convert_v1, read_model_files
from medldm.sampling.reconstructor import SHIPPED_DIR, shipped_models
from tests.helpers import make_tiny_bundle


def _v1(config: dict, record: dict) -> dict:
    """The format-1 layout of a current folder: one file, the refiner stage's legs nested newest first."""
    legs = [leg for leg in record["legs"] if leg["stage"] == "refiner"]
    nested = None
    for leg in legs:
        nested = {**{k: v for k, v in leg.items() if k != "stage"}, **({"continued": nested} if nested else {})}
    refiner = {k: v for k, v in config["refiner"].items() if k not in ("guide", "cascades")}
    return {**config, "format": "medldm-model/1", "refiner": refiner, "training": record["training"],
            "metrics": record["metrics"], **({"refiner_stage": nested} if nested else {})}


def test_a_format_1_folder_loads_and_converts_to_the_same_configuration(tmp_path):
    folder = make_tiny_bundle(tmp_path / "m", "recon", "MR")
    bundle = load_bundle(folder)
    bundle.config.refiner.guide, bundle.config.refiner.cascades = "tv-pocs", 2
    legs = [{"stage": "refiner", "steps": 5, "guide": "naive", "init": "identity"},
            {"stage": "refiner", "steps": 7, "guide": "tv-pocs", "cascades": 2, "init": "model"}]
    bundle.record.legs, bundle.record.training = legs, {"steps": 11}
    save_bundle(bundle, folder)
    current = {name: json.loads((folder / name).read_text()) for name in ("model.json", "training.json")}
    old = _v1(current["model.json"], current["training.json"])
    old["refiner_stage"]["cascades"] = 2  # format 1 kept the inference settings in the newest leg only
    (folder / "model.json").write_text(json.dumps(old))
    (folder / "training.json").unlink()

    config, record = read_model_files(folder)
    assert config.format == FORMAT and config.refiner.guide == "tv-pocs" and config.refiner.cascades == 2
    assert [leg["steps"] for leg in record.stage_legs("refiner")] == [5, 7]  # oldest first, no nesting
    assert load_bundle(folder).refiner_cascades == 2
    assert convert_folder(folder) and not convert_folder(folder)
    assert json.loads((folder / "model.json").read_text()) == current["model.json"]
    assert json.loads((folder / "training.json").read_text())["legs"] == [
        {**leg, "cascades": 2} if leg["steps"] == 7 else leg for leg in legs]


def test_an_unknown_format_or_a_bad_field_is_refused_naming_the_file_and_field(tmp_path):
    folder = make_tiny_bundle(tmp_path / "m", "denoise", "MR")
    path = folder / "model.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "format": "medldm-model/9"}))
    with pytest.raises(ModelError, match=r"model.json: unknown model format 'medldm-model/9'.*upgrade medldm"):
        load_bundle(folder)
    path.write_text(json.dumps({**config, "slice_axis": 5}))
    with pytest.raises(ModelError, match=r"model.json: invalid model configuration \(slice_axis"):
        load_bundle(folder)
    path.write_text(json.dumps({**config, "unet": None}))
    with pytest.raises(ModelError, match="an ldm model needs unet"):
        load_bundle(folder)
    no_guide = {**config, "normalisation": {**config["normalisation"], "latent_fit_on": "guide"}}
    path.write_text(json.dumps(no_guide))  # its refiner sees the naive inverse: no clean estimate to fit on
    with pytest.raises(ModelError, match="latent_fit_on 'guide' needs"):
        load_bundle(folder)
    path.write_text(json.dumps({**config, "surprise": 1}))
    with pytest.raises(ModelError, match="surprise"):
        load_bundle(folder)
    path.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_bundle(folder)


def test_a_saved_model_keeps_its_history_out_of_model_json(tmp_path):
    folder = make_tiny_bundle(tmp_path / "m", "denoise", "MR")
    bundle = load_bundle(folder)
    bundle.record.training["steps"] = 3
    bundle.record.metrics["val_psnr"] = 30.0
    save_bundle(bundle, folder)
    config = json.loads((folder / "model.json").read_text())
    assert not {"training", "metrics", "legs", "card", "refiner_stage"} & set(config)
    assert load_bundle(folder).record.metrics == {"val_psnr": 30.0}


@pytest.mark.parametrize("name", shipped_models())
def test_the_shipped_models_are_in_the_current_format(name):
    assert json.loads((SHIPPED_DIR / name / "model.json").read_text())["format"] == FORMAT
    config, record = read_model_files(SHIPPED_DIR / name)
    assert config.name == name and record.card and record.validation_check


def test_convert_v1_flattens_both_stages_oldest_first():
    meta = {"format": "medldm-model/1", "refiner": {"enabled": True},
            "bridge_stage": {"steps": 2, "continued": {"steps": 1}},
            "refiner_stage": {"steps": 4, "guide": "nlm", "continued": {"steps": 3}}}
    config, record = convert_v1(meta)
    # a refiner saved before residual_on existed added its correction to the decoded estimate, and still does
    assert config["refiner"] == {"enabled": True, "residual_on": "decoded", "guide": "nlm", "cascades": 1}
    assert [(leg["stage"], leg["steps"]) for leg in record["legs"]] == [
        ("bridge", 1), ("bridge", 2), ("refiner", 3), ("refiner", 4)]


def test_format_2_reads_as_diffusion_by_default_and_converts(tmp_path):
    folder = make_tiny_bundle(tmp_path / "m", "denoise", "MR")
    cfg = json.loads((folder / "model.json").read_text())
    assert cfg["format"] == FORMAT == "medldm-model/3" and cfg["default_use_diffusion"] is True
    del cfg["default_use_diffusion"]
    (folder / "model.json").write_text(json.dumps({**cfg, "format": "medldm-model/2"}))
    config, _ = read_model_files(folder)
    assert config.format == FORMAT and config.default_use_diffusion is True  # what format-2 models did
    assert convert_folder(folder) and json.loads((folder / "model.json").read_text())["format"] == FORMAT


def test_a_guide_fitted_latent_path_loads_where_a_classical_guide_exists_and_is_refused_elsewhere(tmp_path):
    folder = make_tiny_bundle(tmp_path / "m", "denoise", "MR")
    path = folder / "model.json"
    config = json.loads(path.read_text())
    nlm = {**config, "refiner": {**config["refiner"], "guide": "nlm"},
           "normalisation": {**config["normalisation"], "latent_fit_on": "guide"}}
    path.write_text(json.dumps(nlm))
    assert load_bundle(folder).config.normalisation_reference == "nlm"
    path.write_text(json.dumps({**nlm, "normalisation": {**nlm["normalisation"], "kind": "window"}}))
    with pytest.raises(ModelError, match="percentile normalisation"):
        load_bundle(folder)
