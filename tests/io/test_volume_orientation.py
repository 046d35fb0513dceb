"""io.volume's orientation rule: reorienting permutes and flips axes only, and every voxel keeps its world position."""

import numpy as np
import pytest
from nibabel.orientations import aff2axcodes, axcodes2ornt, io_orientation

from medldm.errors import InputError
from medldm.io.volume import RAS, Volume, reorient, to_ras


def _affine():
    a = np.diag([0.9, 1.1, 2.5, 1.0])
    a[:3, 3] = [-40.0, 12.0, 7.5]
    return a


@pytest.mark.parametrize("codes", ["LPS", "SAR", "PIL", "RAS"])
def test_reorient_keeps_world_positions_and_round_trips(codes):
    rng = np.random.default_rng(0)
    array = rng.normal(size=(2, 5, 6, 7)).astype(np.float32)
    affine = _affine()
    moved, moved_affine = reorient(array, affine, axcodes2ornt(codes))
    assert "".join(aff2axcodes(moved_affine)) == codes
    # each voxel of the new grid holds the value found at its world position on the old grid
    old_index = np.linalg.inv(affine) @ moved_affine
    for idx in [(0, 0, 0), (4, 2, 1), tuple(s - 1 for s in moved.shape[1:])]:
        src = np.rint(old_index @ [*idx, 1])[:3].astype(int)
        np.testing.assert_array_equal(moved[(slice(None), *idx)], array[(slice(None), *src)])
    back, back_affine = reorient(moved, moved_affine, io_orientation(affine))
    np.testing.assert_array_equal(back, array)
    np.testing.assert_allclose(back_affine, affine)


def test_to_ras_leaves_ras_and_2d_volumes_alone_and_refuses_a_degenerate_affine():
    vol = Volume(np.zeros((1, 4, 5, 6), np.float32), _affine())
    assert to_ras(vol) == (vol, None)
    flat = Volume(np.zeros((1, 4, 5), np.float32))
    assert to_ras(flat)[1] is None
    lps = Volume(np.arange(120, dtype=np.float32).reshape(1, 4, 5, 6), np.diag([-1.0, -1.0, 1.0, 1.0]))
    ras, orientation = to_ras(lps)
    np.testing.assert_array_equal(io_orientation(ras.affine), RAS)
    np.testing.assert_array_equal(ras.array, lps.array[:, ::-1, ::-1, :])
    np.testing.assert_array_equal(orientation, axcodes2ornt("LPS"))
    with pytest.raises(InputError, match="zero axis"):
        to_ras(Volume(np.zeros((1, 4, 5, 6), np.float32), np.diag([1.0, 0.0, 1.0, 1.0])))
