import json

import pytest

from medldm.errors import ModelError
from medldm.models.bundle import load_bundle
from tests.helpers import make_tiny_bundle


def test_a_saved_refiner_takes_as_many_guide_images_as_its_meta_names_or_the_load_says_why(tmp_path):
    folder = make_tiny_bundle(tmp_path / "m", "recon", "MR")
    assert load_bundle(folder).refiner.conv_0.conv_0.conv.in_channels == 2
    meta_file = folder / "model.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "refiner_stage": {"guide": "naive+tv-pocs"}}))
    with pytest.raises(ModelError, match="refiner.safetensors: weights do not match the config"):
        load_bundle(folder)  # the weights were saved for one guide image
    meta_file.write_text(json.dumps({**meta, "refiner_stage": {"guide": "naive+"}}))
    with pytest.raises(ModelError, match="model.json: refiner_stage.guide: unknown refiner guide"):
        load_bundle(folder)
