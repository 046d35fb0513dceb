"""medldm: medical image reconstruction with latent diffusion models."""

__version__ = "0.1.0"

__all__ = ["__version__", "Volume", "Reconstructor"]


def __getattr__(name):
    # Lazy imports keep `medldm --help` fast (torch/monai are not needed to print help).
    if name == "Volume":
        from medldm.io.volume import Volume

        return Volume
    if name == "Reconstructor":
        from medldm.sampling.reconstructor import Reconstructor

        return Reconstructor
    raise AttributeError(name)
