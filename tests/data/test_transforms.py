import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, list_data_collate

from medldm.data.transforms import (
    Normalisation,
    build_dataset,
    build_eval_transforms,
    build_train_transforms,
    ct_normalise,
    mr_normalise,
)
from medldm.errors import ConfigError, InputError


def test_window_round_trip_and_dict():
    n = Normalisation.window(-1024, 2000)
    x = np.linspace(-1024, 2000, 101, dtype=np.float32)
    y = n.forward(x)
    assert y.min() == 0 and y.max() == 1
    np.testing.assert_allclose(n.inverse(y), x, atol=1e-3)
    assert n.forward(np.array([3000.0]))[0] == 1.0  # clipped above the window
    m = Normalisation.from_dict(json.loads(json.dumps(n.to_dict())))
    assert m == n


def test_percentile_fit_round_trip_numpy_and_torch():
    rng = np.random.default_rng(0)
    x = rng.normal(100, 20, (1, 20, 20, 20)).astype(np.float32)
    unfitted = Normalisation.percentile(0.5, 99.5)
    with pytest.raises(ConfigError):
        unfitted.forward(x)
    y, fitted = unfitted.fit_forward(x)
    assert fitted.lower == pytest.approx(np.percentile(x, 0.5)) and y.min() == 0 and y.max() == 1
    inside = (x > fitted.lower) & (x < fitted.upper)
    np.testing.assert_allclose(fitted.inverse(y)[inside], x[inside], rtol=1e-5)
    restored = Normalisation.from_dict(fitted.to_dict())
    t = torch.from_numpy(x)
    yt = restored.forward(t)
    assert isinstance(yt, torch.Tensor)
    np.testing.assert_allclose(restored.inverse(yt).numpy()[inside], x[inside], rtol=1e-5)


def test_normalisation_validation():
    with pytest.raises(ConfigError):
        Normalisation("zscore")
    with pytest.raises(ConfigError):
        Normalisation.from_dict({"kind": "window", "lower": 0, "upper": 1, "gain": 2})
    const = Normalisation.percentile().fit(np.full((4, 4), 5.0))
    assert np.isfinite(const.forward(np.full((4, 4), 5.0))).all()


def test_dict_transforms_store_fitted_parameters():
    x = torch.linspace(0, 1000, 1000).reshape(1, 10, 10, 10)
    d = mr_normalise()({"image": x})
    assert d["image"].max() == 1 and d["image_norm"]["kind"] == "percentile" and "upper" in d["image_norm"]
    d = ct_normalise()({"image": x})
    assert d["image_norm"] == {"kind": "window", "lower": -1024.0, "upper": 2000.0, "p_low": 0.5, "p_high": 99.5, "clip": True}


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


def test_2d_patches(tiny_datalist):
    tf = build_train_transforms(2, (32, 32), "MR", num_samples=5)
    ds = build_dataset(tiny_datalist, "training", tf, modality="MR")
    assert len(ds) == 2
    samples = ds[0]
    assert isinstance(samples, list) and len(samples) == 5
    for s in samples:
        assert tuple(s["image"].shape) == (1, 32, 32) and s["image"].dtype == torch.float32
        assert 0 <= float(s["image"].min()) and float(s["image"].max()) <= 1
        assert s["slice_axis"] == 2 and s["image"].max() > 0  # empty slices are skipped
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=list_data_collate)))
    assert tuple(batch["image"].shape) == (10, 1, 32, 32)
    assert batch["image_norm"]["kind"] == ["percentile"] * 10


def test_2d_random_planes_with_padding(tiny_datalist):
    tf = build_train_transforms(2, 48, "MR", num_samples=6, slice_axes=(0, 1, 2), crop_foreground=False)
    for s in build_dataset(tiny_datalist, "training", tf, modality="MR")[1]:
        assert tuple(s["image"].shape) == (1, 48, 48)


@pytest.mark.parametrize("cache", ["none", "memory", "disk"])
def test_3d_patches_and_caching(tiny_datalist, tmp_path, cache):
    tf = build_train_transforms(3, (16, 16, 24), "CT", num_samples=3)  # 24 > 20 slices: padded
    ds = build_dataset(tiny_datalist, "training", tf, cache=cache, cache_dir=tmp_path / "c", modality="CT")
    samples = ds[0]
    assert len(samples) == 3
    for s in samples:
        assert tuple(s["image"].shape) == (1, 16, 16, 24)
        assert float(s["image"].min()) >= 0 and float(s["image"].max()) <= 1
        assert s["image_norm"]["kind"] == "window"


def test_target_spacing_and_eval(tiny_datalist):
    tf = build_train_transforms(3, 8, "MR", target_spacing=(2.0, 2.0, 2.0), num_samples=1)
    assert tuple(build_dataset(tiny_datalist, "training", tf, modality="MR")[0][0]["image"].shape) == (1, 8, 8, 8)
    ev = build_dataset(tiny_datalist, "validation", build_eval_transforms("MR"))
    assert tuple(ev[0]["image"].shape) == (1, 40, 36, 20)


def test_bad_inputs(tiny_datalist, tmp_path):
    with pytest.raises(ConfigError):
        build_train_transforms(4, 8, "MR")
    with pytest.raises(ConfigError):
        build_train_transforms(2, (8, 8, 8), "MR")
    with pytest.raises(InputError):
        build_dataset(tmp_path / "missing.json", "training", None)
    with pytest.raises(InputError):
        build_dataset(tiny_datalist, "test", None)
    with pytest.raises(ConfigError):
        build_dataset(tiny_datalist, "training", None, cache="disk")
