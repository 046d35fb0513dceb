import numpy as np
import pytest
import torch
from monai.data import MetaTensor, list_data_collate
from monai.transforms import Compose, EnsureChannelFirstd

from medldm.errors import ConfigError
from medldm.physics import DegradeD, build_operator, build_random_operator
from tests.physics.conftest import phantom2d


def items(n=3, z=None):
    base = phantom2d(16)[0]
    if z:
        base = base[..., None].expand(1, 16, 16, z).contiguous()
    return [{"image": (base * (1 + i)).numpy()} for i in range(n)]


def test_reproducible_with_set_random_state(rng_guard):
    rop = build_random_operator("recon", "MR", phase=True, sigma=(0.01, 0.02))
    a = DegradeD(random_operator=rop).set_random_state(3)
    b = DegradeD(random_operator=rop).set_random_state(3)
    out_a, out_b = [a(d) for d in items()], [b(d) for d in items()]
    for u, v in zip(out_a, out_b):
        assert np.array_equal(u["condition"], v["condition"]) and u["degradation"] == v["degradation"]
    assert out_a[0]["degradation"] != out_a[1]["degradation"]  # one draw per item
    c = DegradeD(random_operator=rop).set_random_state(4)
    assert c(items()[0])["degradation"] != out_a[0]["degradation"]
    d = out_a[0]
    assert d["condition"].shape == d["image"].shape and d["condition"].dtype == np.float32
    assert d["noise_level"] == d["degradation"]["sigma"]
    # the recorded params replay the exact condition
    op = build_operator("recon", "MR", d["degradation"])
    again = op.naive_inverse(op(torch.as_tensor(d["image"])[None]))[0].numpy()
    assert np.array_equal(again, d["condition"])


def test_seed_key_fixes_validation_pairs():
    rop = build_random_operator("denoise", "MR")
    t = DegradeD(random_operator=rop, seed_key="seed").set_random_state(0)
    first = t({"image": items(1)[0]["image"], "seed": 123})
    second = t({"image": items(1)[0]["image"], "seed": 123})
    assert np.array_equal(first["condition"], second["condition"])
    drawn = t(items(1)[0])
    assert isinstance(drawn["seed"], int) and drawn["seed"] != 123


def test_metatensor_3d_sr_and_ct_collate():
    img = MetaTensor(torch.as_tensor(items(1, z=12)[0]["image"]), affine=torch.diag(torch.tensor([1.0, 1, 3, 1])))
    out = DegradeD(random_operator=build_random_operator("sr", "MR", factors=(3,))).set_random_state(1)(
        {"image": img})
    assert isinstance(out["condition"], MetaTensor) and out["condition"].shape == img.shape
    assert torch.equal(out["condition"].affine, img.affine) and "noise_level" not in out
    ct = DegradeD(random_operator=build_random_operator("denoise", "CT", views=20),
                  measurement_key="sinogram").set_random_state(2)
    batch = list_data_collate([ct({"image": 1000 * d["image"] - 1000}) for d in items(2)])
    assert batch["condition"].shape == (2, 1, 16, 16) and batch["sinogram"].shape[-1] == 20
    assert len(batch["degradation"]["I0"]) == 2


def test_bad_arguments():
    with pytest.raises(ConfigError):
        DegradeD(random_operator=None)
    with pytest.raises(ConfigError):
        DegradeD(keys=["a", "b"], random_operator=build_random_operator("denoise", "MR"))
    assert Compose([EnsureChannelFirstd("image", channel_dim="no_channel"),
                    DegradeD(random_operator=build_random_operator("denoise", "MR"))])(
        {"image": np.ones((8, 8), np.float32)})["condition"].shape == (1, 8, 8)
