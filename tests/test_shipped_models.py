"""Each committed model reproduces the validation figure in its own model.json (and so in its card)."""

import json

import pytest

from medldm.data.prepare import prepare_data
from medldm.evaluation.check import run_check
from medldm.sampling.reconstructor import SHIPPED_DIR, Reconstructor, shipped_models

NAMES = shipped_models()


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    needs_ct = any(json.loads((SHIPPED_DIR / n / "model.json").read_text())["modality"] == "CT" for n in NAMES)
    return prepare_data(tmp_path_factory.mktemp("data"), n_synthetic=0, include_ct=needs_ct, include_real_t1=False,
                        progress=False)


@pytest.mark.skipif(not NAMES, reason="no shipped models installed")
@pytest.mark.parametrize("name", NAMES)
def test_shipped_model_reproduces_its_card(name, datalist):
    rec = Reconstructor.load(name, device="cpu")
    expected = rec.meta["validation_check"]
    got = run_check(rec, datalist, {k: expected[k] for k in ("volume", "crop", "setting", "steps", "seed")})
    assert got["psnr"] == pytest.approx(expected["psnr"], abs=0.3)
    assert got["ssim"] == pytest.approx(expected["ssim"], abs=0.01)


def test_shipped_models_folder_is_consistent():
    for name in NAMES:
        meta = json.loads((SHIPPED_DIR / name / "model.json").read_text())
        assert meta["name"] == name and (SHIPPED_DIR / name / "README.md").is_file()
        assert "validation_check" in meta
