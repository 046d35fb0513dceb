"""Each committed model reproduces the validation figure in its own training.json (and so in its card)."""

import json
from pathlib import Path

import pytest

from medldm.data.prepare import prepare_data
from medldm.evaluation.check import run_check
from medldm.models.model_config import read_model_files
from medldm.sampling.reconstructor import DEFAULT_MODELS, SHIPPED_DIR, Reconstructor, shipped_models

NAMES = shipped_models()


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    needs_ct = any(read_model_files(SHIPPED_DIR / n)[0].modality == "CT" for n in NAMES)
    return prepare_data(tmp_path_factory.mktemp("data"), n_synthetic=0, include_ct=needs_ct, include_real_t1=False,
                        progress=False)


@pytest.mark.slow
@pytest.mark.skipif(not NAMES, reason="no shipped models installed")
@pytest.mark.parametrize("name", NAMES)
def test_shipped_model_reproduces_its_card(name, datalist):
    rec = Reconstructor.load(name, device="cpu")
    expected = rec.bundle.record.validation_check
    got = run_check(rec, datalist, {k: expected[k] for k in ("volume", "crop", "setting", "steps", "seed")})
    assert got["psnr"] == pytest.approx(expected["psnr"], abs=0.3)
    assert got["ssim"] == pytest.approx(expected["ssim"], abs=0.01)


def test_shipped_models_folder_is_consistent():
    for name in NAMES:
        config, record = read_model_files(SHIPPED_DIR / name)
        assert config.name == name and (SHIPPED_DIR / name / "README.md").is_file()
        assert record.validation_check


@pytest.mark.parametrize("name", NAMES)
def test_each_card_is_written_from_the_rows_its_folder_keeps(name):
    """So that pipelines/write_model_cards.py rewrites every card on a fresh clone, FID rows and all."""
    from medldm.evaluation.card import MULTICOIL_FILE, NOISE_FILE, ROWS_FILE, SPEED_FILE, model_card, stored

    config, record = read_model_files(SHIPPED_DIR / name)
    rows = json.loads((SHIPPED_DIR / name / ROWS_FILE).read_text())
    card = model_card(config, record, rows, record.card["command"], record.card["machine"],
                      *(stored(SHIPPED_DIR / name, f) for f in (NOISE_FILE, SPEED_FILE, MULTICOIL_FILE)))
    assert (SHIPPED_DIR / name / "README.md").read_text() == card


def test_data_cards_hold_the_shipped_cards_and_their_rows():
    from medldm.evaluation.evaluate import markdown_table
    from medldm.evaluation.card import ROWS_FILE

    docs = Path(__file__).parents[1] / "data_cards"
    for name in NAMES:
        assert (docs / f"model-{name}.md").read_text() == (SHIPPED_DIR / name / "README.md").read_text()
    order = list(DEFAULT_MODELS)
    rows = [r for n in sorted(NAMES, key=order.index) for r in json.loads((SHIPPED_DIR / n / ROWS_FILE).read_text())]
    assert (docs / "evaluation.md").read_text().endswith("\n" + markdown_table(rows))
