import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, list_data_collate

from medldm.data.transforms import NormaliseIntensityd, build_dataset, build_eval_transforms, load_datalist
from medldm.errors import ConfigError, InputError
from medldm.models.normalisation import Normalisation


def test_window_round_trip_and_dict():
    n = Normalisation(kind="window")
    x = np.linspace(-1024, 2000, 101, dtype=np.float32)
    y = n.forward(x)
    assert y.min() == 0 and y.max() == 1
    np.testing.assert_allclose(n.inverse(y), x, atol=1e-3)
    assert n.forward(np.array([3000.0]))[0] > 1.0  # not clipped: inverse stays exact outside the window
    assert Normalisation.from_dict(json.loads(json.dumps(n.to_dict()))) == n


def test_percentile_is_scale_only_numpy_and_torch():
    rng = np.random.default_rng(0)
    x = rng.normal(100, 20, (1, 20, 20, 20)).astype(np.float32)
    unfitted = Normalisation(kind="percentile")
    with pytest.raises(ValueError):
        unfitted.forward(x)
    fitted = unfitted.fit(x)
    assert fitted.scale == pytest.approx(np.percentile(x, 99.5))
    np.testing.assert_allclose(fitted.forward(x), x / fitted.scale, rtol=1e-6)  # no offset, no clipping
    np.testing.assert_allclose(fitted.forward(3 * x), 3 * fitted.forward(x), rtol=1e-6)  # linear
    np.testing.assert_allclose(fitted.inverse(fitted.forward(x)), x, rtol=1e-5)
    restored = Normalisation.from_dict({**fitted.to_dict(), "scale": fitted.scale})
    yt = restored.forward(torch.from_numpy(x))
    assert isinstance(yt, torch.Tensor)
    np.testing.assert_allclose(restored.inverse(yt).numpy(), x, rtol=1e-5)


def test_normalisation_validation():
    with pytest.raises(ConfigError):
        Normalisation("zscore")
    with pytest.raises(ConfigError):
        Normalisation.from_dict({"kind": "window", "low": 0, "high": 1, "gain": 2})
    with pytest.raises(ConfigError):
        build_eval_transforms("PET")  # a typo must not silently get MR's normalisation
    zeros = Normalisation().fit(np.zeros((4, 4)))
    assert np.isfinite(zeros.forward(np.zeros((4, 4)))).all()


def test_dict_transforms_store_fitted_parameters():
    x = torch.linspace(0, 1000, 1000).reshape(1, 10, 10, 10)
    d = NormaliseIntensityd("image", Normalisation(kind="percentile"))({"image": x})
    p995 = float(np.percentile(x.numpy(), 99.5))
    assert d["image_norm"] == {"kind": "percentile", "percentile": 99.5, "low": -1024.0, "high": 2000.0,
                               "scale": pytest.approx(p995)}
    assert d["image"].dtype == torch.float32 and d["image"].min() == 0 and d["image"].max() > 1
    torch.testing.assert_close(Normalisation.from_dict(d["image_norm"]).inverse(d["image"]), x)
    d = NormaliseIntensityd("image", Normalisation(kind="window"))({"image": x})
    assert d["image_norm"] == Normalisation(kind="window").to_dict()
    d = NormaliseIntensityd("image", Normalisation(kind="window"))({"image": x.numpy().astype(np.float64)})
    assert d["image"].dtype == np.float32


@pytest.fixture(scope="module")
def tiny_datalist(tmp_path_factory):
    """Two small MR and one CT NIfTI volumes with a head-like blob in the middle."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in (40, 36, 20)], indexing="ij"))
    blob = (np.sqrt((g**2).sum(0)) < 0.8).astype(np.float32)
    entries = []
    for i, (mod, scale, off) in enumerate([("MR", 500, 0), ("MR", 80, 0), ("CT", 1000, -1024)]):
        arr = (blob * scale * (1 + 0.1 * rng.standard_normal(blob.shape)) + off).astype(np.float32)
        nib.save(nib.Nifti1Image(arr, np.diag([1.0, 1.0, 2.0, 1.0])), root / f"img/v{i}.nii.gz")
        entries.append({"image": f"img/v{i}.nii.gz", "modality": mod, "source": "tiny", "source_k": [0, 19]})
    path = root / "datalist.json"
    path.write_text(json.dumps({"training": entries[:2] + entries[2:], "validation": entries[1:2]}))
    return path


@pytest.mark.parametrize("cache", ["none", "memory", "disk"])
def test_eval_volumes_collate_and_cache(tiny_datalist, tmp_path, cache):
    ds = build_dataset(tiny_datalist, "training", build_eval_transforms("MR"), cache=cache, cache_dir=tmp_path / "c",
                       modality="MR")
    assert len(ds) == 2
    d = ds[0]
    assert tuple(d["image"].shape) == (1, 40, 36, 20) and d["image"].dtype == torch.float32
    assert float(d["image"].min()) >= 0  # scale-only: background stays 0
    batch = next(iter(DataLoader(ds, batch_size=1, collate_fn=list_data_collate)))
    assert batch["image_norm"]["kind"] == ["percentile"] and batch["image_norm"]["scale"].shape == (1,)
    ct = build_dataset(tiny_datalist, "training", build_eval_transforms("CT"), cache=cache, cache_dir=tmp_path / "c",
                       modality="CT")[0]
    assert 0 <= float(ct["image"].min()) and float(ct["image"].max()) <= 1
    assert ct["image_norm"] == Normalisation(kind="window").to_dict()


def test_target_spacing(tiny_datalist):
    ev = build_dataset(tiny_datalist, "validation", build_eval_transforms("MR", target_spacing=(2.0, 2.0, 2.0)))
    assert tuple(ev[0]["image"].shape) == (1, 20, 18, 20)


def test_bad_inputs(tiny_datalist, tmp_path):
    with pytest.raises(InputError):
        build_dataset(tmp_path / "missing.json", "training", None)
    with pytest.raises(InputError):
        build_dataset(tiny_datalist, "test", None)
    with pytest.raises(ConfigError):
        build_dataset(tiny_datalist, "training", None, cache="disk")


def test_load_datalist_filters_and_limits(tiny_datalist, tmp_path):
    mr = load_datalist(tiny_datalist, "training", "mr")
    assert [Path(it["image"]).name for it in mr] == ["v0.nii.gz", "v1.nii.gz"]
    assert Path(mr[0]["image"]).is_file() and set(mr[0]) == {"image", "modality", "source"}
    assert len(load_datalist(tiny_datalist, "training", "MR", max_items=1)) == 1
    assert len(load_datalist(tiny_datalist, "training", max_items=5)) == 3
    with pytest.raises(InputError):
        load_datalist(tiny_datalist, "validation", "CT")
    # An entry naming no modality counts as any; a modality that is also a file name stays a modality.
    (tmp_path / "CT").touch()
    path = tmp_path / "dl.json"
    path.write_text(json.dumps({"training": [{"image": "a.nii.gz"}, {"image": "b.nii.gz", "modality": "CT"}]}))
    assert [it.get("modality") for it in load_datalist(path, "training", "CT")] == [None, "CT"]


def test_thick_entries_only_for_their_planes(tmp_path):
    path = tmp_path / "dl.json"
    path.write_text(json.dumps({"training": [{"image": "thin.nii.gz"}, {"image": "thick.nii.gz", "thick_axis": 2}]}))
    names = lambda axis: [Path(it["image"]).name for it in load_datalist(path, "training", plane_axis=axis)]  # noqa: E731
    assert names(2) == ["thin.nii.gz", "thick.nii.gz"]  # axial planes: in-plane detail is real
    assert names(0) == names(None) == ["thin.nii.gz"]  # planes through the thick axis, or 3D: left out


def test_source_probabilities():
    from medldm.training.data import source_probabilities

    entries = [{"source": "a"}, {"source": "a"}, {"source": "b"}, {}]
    assert source_probabilities(entries, {}) is None and source_probabilities(entries, {"c": 5.0}) is None
    np.testing.assert_allclose(source_probabilities(entries, {"b": 2.0}), [0.2, 0.2, 0.4, 0.2])


def test_disk_cache_is_keyed_by_pipeline(tiny_datalist, tmp_path):
    resampled = build_eval_transforms("MR", target_spacing=(2.0, 2.0, 2.0))  # another pipeline, other shapes
    build_dataset(tiny_datalist, "validation", resampled, cache="disk", cache_dir=tmp_path)[0]
    ev = build_dataset(tiny_datalist, "validation", build_eval_transforms("MR"), cache="disk", cache_dir=tmp_path)
    assert tuple(ev[0]["image"].shape) == (1, 40, 36, 20)


def test_sources_filter(tmp_path):
    path = tmp_path / "dl.json"
    path.write_text(json.dumps({"training": [{"image": "a.nii.gz", "source": "mni152"},
                                             {"image": "b.nii.gz", "source": "pyradiomics_brain"}, {"image": "c.nii.gz"}]}))
    kept = load_datalist(path, "training", sources=["mni152"])
    assert [Path(it["image"]).name for it in kept] == ["a.nii.gz"]
    assert len(load_datalist(path, "training")) == 3
