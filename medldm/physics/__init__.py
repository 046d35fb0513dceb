"""Degradation physics: one operator contract for denoising, reconstruction and super-resolution."""

from medldm.physics.base import Operator, RandomOperator
from medldm.physics.ct import LowDoseCT, RandomLowDoseCT, RandomSparseViewCT, SparseViewCT, hu_to_mu, mu_to_hu
from medldm.physics.fft import fft2c, fftnc, ifft2c, ifftnc
from medldm.physics.kspace import CartesianUndersampling, RandomCartesianUndersampling
from medldm.physics.noise import RandomRicianNoise, RicianNoise, estimate_rician_sigma
from medldm.physics.registry import build_operator, build_random_operator
from medldm.physics.sense import MultiCoilCartesian, RandomMultiCoilUndersampling
from medldm.physics.resolution import (
    InPlaneDownsample,
    RandomInPlaneDownsample,
    RandomThickSlice,
    ThickSlice,
    coarse_to_fine_affine,
    fine_to_coarse_affine,
)
from medldm.physics.transforms import DegradeD

__all__ = [
    "Operator", "RandomOperator",
    "fft2c", "ifft2c", "fftnc", "ifftnc",
    "CartesianUndersampling", "RandomCartesianUndersampling", "MultiCoilCartesian", "RandomMultiCoilUndersampling",
    "RicianNoise", "RandomRicianNoise", "estimate_rician_sigma",
    "LowDoseCT", "SparseViewCT", "RandomLowDoseCT", "RandomSparseViewCT", "hu_to_mu", "mu_to_hu",
    "ThickSlice", "InPlaneDownsample", "RandomThickSlice", "RandomInPlaneDownsample",
    "coarse_to_fine_affine", "fine_to_coarse_affine",
    "build_operator", "build_random_operator",
    "DegradeD",
]
