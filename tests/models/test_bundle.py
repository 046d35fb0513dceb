import json

import pytest

from medldm.errors import ModelError
from medldm.models.bundle import load_bundle
from tests.helpers import make_tiny_bundle


def test_a_saved_refiner_takes_as_many_guide_images_as_its_config_names_or_the_load_says_why(tmp_path):
    folder = make_tiny_bundle(tmp_path / "m", "recon", "MR")
    assert load_bundle(folder).refiner.conv_0.conv_0.conv.in_channels == 2
    config_file = folder / "model.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "refiner": {**config["refiner"], "guide": "naive+tv-pocs"}}))
    with pytest.raises(ModelError, match="refiner.safetensors: weights do not match the config"):
        load_bundle(folder)  # the weights were saved for one guide image
    config_file.write_text(json.dumps({**config, "refiner": {**config["refiner"], "guide": "naive+"}}))
    with pytest.raises(ModelError, match="model.json: invalid model configuration.*refiner.guide"):
        load_bundle(folder)
