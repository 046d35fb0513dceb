"""evaluate_cases: every row a task needs (baselines, supervised U-Net, VAE ceiling, ablations, FID), tables written."""

import numpy as np
import pytest

from medldm.evaluation.cases import make_cases
from medldm.evaluation.evaluate import evaluate_cases
from medldm.evaluation.fid import InceptionFeatures
from medldm.io.volume import Volume
from medldm.sampling.reconstructor import Reconstructor
from medldm.evaluation.supervised import build_supervised_unet
from tests.conftest import phantom
from tests.helpers import make_tiny_bundle, make_tiny_feature_net


@pytest.mark.slow
def test_recon_rows_supervised_and_fid(tmp_path, capsys):
    rec = Reconstructor.load(make_tiny_bundle(tmp_path / "m", "recon", "MR"), device="cpu")
    vol = Volume((phantom((32, 32, 4)) * 100)[None].astype(np.float32), np.eye(4), "MR")
    cases = make_cases("recon", "MR", {"p": vol})
    sup = (build_supervised_unet((4, 4, 8, 8, 16, 4)).eval(),
           {"normalisation": rec.config.normalisation.unfitted().to_dict(), "slice_axis": 2})
    rows = evaluate_cases(rec, cases, tmp_path / "eval", steps=2, samples=2, supervised=sup,
                          fid=InceptionFeatures(make_tiny_feature_net(tmp_path / "f.pt")))
    per_case = {(r["case"], r["method"]) for r in rows}
    for case in ("p/4x", "p/8x"):
        for method in ("zero-filled", "TV-POCS", "TV-POCS (warm)", "supervised U-Net", "VAE(truth)", "medldm latent",
                       "medldm no diffusion", "medldm diffusion", "medldm (default)", "medldm +latent DC",
                       "medldm mean of 2"):
            assert (case, method) in per_case, (case, method)
        by = {r["method"]: r for r in rows if r["case"] == case}
        assert by["medldm (default)"]["psnr"] == by["medldm diffusion"]["psnr"]  # the model's default path
    fid = {r["method"]: r["fid"] for r in rows if r["case"] == "all cases"}
    assert set(fid) == {"zero-filled", "TV-POCS", "TV-POCS (warm)", "supervised U-Net", "medldm (default)"}
    assert all(np.isfinite(v) for v in fid.values())
    header = (tmp_path / "eval" / "tiny-mr-recon.md").read_text().splitlines()[0]
    assert " fid " in header and " psnr " in header
    assert (tmp_path / "eval" / "tiny-mr-recon.csv").read_text().splitlines()[0].count("fid") == 1
    said = capsys.readouterr().err.splitlines()  # a line per row as it is made, not silence until the end
    assert sum(line.startswith("tiny-mr-recon p/4x ") for line in said) == len([r for r in rows if r["case"] == "p/4x"])


def test_variants_default_row_is_the_models_default_path():
    from medldm.evaluation.evaluate import variants

    assert variants("denoise", 1, True)["medldm (default)"] == {"same_as": "medldm diffusion"}
    rows = variants("denoise", 1, False)
    assert rows["medldm (default)"] == {"same_as": "medldm no diffusion"}
    assert rows["medldm no diffusion"]["use_diffusion"] is False and rows["medldm diffusion"]["use_diffusion"] is True
    # every other row states its path, so a model's default does not change what an ablation row means
    assert all("use_diffusion" in kw for name, kw in rows.items() if name != "medldm (default)")
