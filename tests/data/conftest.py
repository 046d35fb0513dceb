import pytest


@pytest.fixture(scope="session")
def tissue_maps_2mm():
    # 2 mm templates (99x117x95) keep each synthetic sample ~0.1 s; loaded once for the whole session.
    from medldm.data.sources import load_mni152_tissue_maps

    return load_mni152_tissue_maps(resolution=2)
