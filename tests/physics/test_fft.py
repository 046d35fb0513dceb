import numpy as np
import torch

from medldm.physics.fft import fft2c, fftnc, ifft2c, ifftnc
from tests.physics.conftest import gen


def test_roundtrip_and_orthonormal():
    x = torch.randn(2, 1, 8, 6, generator=gen(), dtype=torch.complex128)
    k = fft2c(x)
    assert torch.allclose(ifft2c(k), x, atol=1e-12)
    assert torch.allclose(torch.linalg.vector_norm(k), torch.linalg.vector_norm(x))
    assert torch.allclose(fftnc(x, (-2, -1)), k)


def test_dc_at_centre_and_matches_numpy_convention():
    x = torch.ones(1, 1, 8, 8, 4, dtype=torch.float64)
    k = fftnc(x, (2, 3, 4))
    assert abs(k[0, 0, 4, 4, 2]) > 0 and torch.count_nonzero(k.abs() > 1e-9) == 1
    a = np.random.default_rng(0).standard_normal((6, 5))
    ref = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(a), norm="ortho"))
    assert np.allclose(fft2c(torch.tensor(a)).numpy(), ref)
    assert torch.allclose(ifftnc(fftnc(x, (2, 3, 4)), (2, 3, 4)).real, x)


def test_hermitian_part_is_the_spectrum_of_the_real_part_for_odd_and_even_sizes():
    from medldm.physics.fft import hermitian_part, mirror_frequencies

    for shape in [(1, 1, 7, 6), (1, 1, 8, 5)]:
        v = torch.randn(shape, generator=gen(1), dtype=torch.complex128)
        dims = (2, 3)
        expected = fftnc(ifftnc(v, dims).real.to(torch.complex128), dims)
        assert torch.allclose(hermitian_part(v, dims), expected, rtol=0, atol=1e-12)
        assert torch.equal(mirror_frequencies(mirror_frequencies(v, dims), dims), v)


def test_uncentre_gives_torch_fft_layout():
    from medldm.physics.fft import uncentre

    for shape in [(1, 1, 7, 6), (1, 1, 8, 5)]:
        x = torch.randn(shape, generator=gen(2), dtype=torch.complex128)
        assert torch.allclose(uncentre(fftnc(x, (2, 3)), (2, 3)), torch.fft.fftn(x, dim=(2, 3), norm="ortho"),
                              rtol=0, atol=1e-12)
