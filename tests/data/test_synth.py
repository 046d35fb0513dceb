import json
import random

import numpy as np
import pytest
import torch

from medldm.data.synth import SynthConfig, SyntheticSubjectGenerator, split_excluding_source_band
from medldm.errors import InputError


@pytest.fixture(scope="module")
def gen(tissue_maps_2mm):
    return SyntheticSubjectGenerator(tissue_maps_2mm, seed=7)


def test_tissue_maps_partition(tissue_maps_2mm):
    total = sum(tissue_maps_2mm[t].array for t in ("gm", "wm", "csf"))
    assert total.min() >= 0 and total.max() <= 1 + 1e-5
    assert tissue_maps_2mm["csf"].array.max() > 0.9  # ventricles exist


def test_deterministic_and_global_rng_untouched(gen, tissue_maps_2mm):
    np.random.seed(123)
    random.seed(123)
    torch.manual_seed(123)
    np_state, py_state, torch_state = np.random.get_state(), random.getstate(), torch.random.get_rng_state()
    a = gen.sample(3)
    b = SyntheticSubjectGenerator(tissue_maps_2mm, seed=7).sample(3)
    gen.sample(5)
    c = gen.sample(3)  # order of calls does not matter
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_array_equal(a.array, c.array)
    assert a.meta["synth"] == b.meta["synth"]
    after = np.random.get_state()
    assert np_state[0] == after[0] and np.array_equal(np_state[1], after[1]) and np_state[2:] == after[2:]
    assert random.getstate() == py_state
    assert torch.equal(torch.random.get_rng_state(), torch_state)


def test_indices_and_seeds_differ(gen, tissue_maps_2mm):
    a, b = gen.sample(0), gen.sample(1)
    other = SyntheticSubjectGenerator(tissue_maps_2mm, seed=8).sample(0)
    assert np.abs(a.array - b.array).mean() > 1e-3
    assert np.abs(a.array - other.array).mean() > 1e-3


def test_range_shape_affine_meta(gen, tissue_maps_2mm):
    ref = tissue_maps_2mm["gm"]
    for i in range(3):
        v = gen.sample(i)
        assert v.array.dtype == np.float32 and v.array.shape == ref.array.shape
        assert v.array.min() >= 0.0 and v.array.max() <= 1.0 and v.array.max() > 0.9
        np.testing.assert_allclose(v.affine, ref.affine)
        assert v.modality == "MR"
        s = v.meta["synth"]
        json.dumps(s)  # recorded parameters are plain JSON
        assert s["contrast"] in ("T1", "T2", "PD", "random") and s["index"] == i and s["seed"] == 7
        assert len(s["blur_sigma_mm"]) == 3 and len(s["rotation_deg"]) == 3


def test_contrast_orderings(tissue_maps_2mm):
    g = SyntheticSubjectGenerator(tissue_maps_2mm, seed=0, config=SynthConfig(contrast_probs=(("T1", 1.0),)))
    m = g.sample(0).meta["synth"]["means"]
    assert m["wm"] > m["gm"] > m["csf"]
    g = SyntheticSubjectGenerator(tissue_maps_2mm, seed=0, config=SynthConfig(contrast_probs=(("T2", 1.0),)))
    m = g.sample(0).meta["synth"]["means"]
    assert m["csf"] > m["gm"] > m["wm"]


def test_missing_tissue_raises(tissue_maps_2mm):
    with pytest.raises(InputError):
        SyntheticSubjectGenerator({"gm": tissue_maps_2mm["gm"]}, seed=0)


def test_split_parts_do_not_depend_on_held_out_anatomy(tissue_maps_2mm):
    """Changing the anatomy inside the held-out band must not change any kept voxel (up to the single
    global percentile scale, which is the only quantity computed over the whole volume). The band's
    air is not altered: kept slices may sample it (documented in the synthetic data card)."""
    band = (37, 55)
    cfg = SynthConfig(gamma_std=0.0)
    altered = {k: v.with_array(v.array.copy()) for k, v in tissue_maps_2mm.items()}
    total = sum(tissue_maps_2mm[t].array for t in ("gm", "wm", "csf"))
    inside = np.zeros(total.shape, bool)
    inside[..., band[0]:band[1]] = total[..., band[0]:band[1]] > 0
    for t, val in (("gm", 0.0), ("wm", 0.0), ("csf", 1.0)):
        altered[t].array[inside] = val
    for index in range(3):
        a = SyntheticSubjectGenerator(tissue_maps_2mm, seed=1, config=cfg).sample(index)
        b = SyntheticSubjectGenerator(altered, seed=1, config=cfg).sample(index)
        parts = split_excluding_source_band(a, band, min_slices=1)
        assert parts, "every subject keeps some slices"
        for p in parts:
            k0, k1 = p.meta["output_k"]
            assert not p.meta["source_k"] or p.meta["source_k"][1] < band[0] or p.meta["source_k"][0] >= band[1]
            pa, pb = a.array[..., k0:k1], b.array[..., k0:k1]
            both = (pa > 1e-3) & (pa < 1) & (pb > 1e-3) & (pb < 1)
            assert np.array_equal(pa == 0, pb == 0)
            ratio = pa[both] / pb[both]
            np.testing.assert_allclose(ratio, np.median(ratio), rtol=1e-3)
        # and the dropped slices do see the change (the test would be vacuous otherwise)
        assert np.abs(a.array - b.array).max() > 0.1


def test_split_identity_volume(tissue_maps_2mm):
    v = tissue_maps_2mm["gm"]
    parts = split_excluding_source_band(v, (37, 55), min_slices=8)
    assert [p.meta["output_k"] for p in parts] == [[0, 37], [55, 95]]
    world_z0 = v.affine @ np.array([0, 0, 55, 1.0])
    np.testing.assert_allclose(parts[1].affine @ np.array([0, 0, 0, 1.0]), world_z0)
