"""The notebooks run top to bottom (small settings via MEDLDM_NOTEBOOK_QUICK=1)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from medldm.sampling.reconstructor import shipped_models

NB = Path(__file__).parents[1] / "notebooks"
NEEDS = {"01_quickstart": "mr-denoise", "03_evaluate_and_compare": "mr-recon", "04_registry_and_serving": "mr-denoise"}


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(NB.glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    need = NEEDS.get(path.stem)
    if need and need not in shipped_models():
        pytest.skip(f"needs the shipped model {need}")
    monkeypatch.setenv("MEDLDM_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MEDLDM_NOTEBOOK_OUT", str(tmp_path / "outputs"))  # each notebook writes only there
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NB)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == [path.stem]
    left = {p.name for p in NB.iterdir()} - {p.name for p in NB.glob("*.ipynb")} - {".ipynb_checkpoints"}
    assert not left - BEFORE, f"left behind in notebooks/: {sorted(left - BEFORE)}"


BEFORE = {p.name for p in NB.iterdir()}  # whatever was there before the tests (a user's own outputs/)
