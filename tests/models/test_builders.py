import pytest
import torch

from medldm.config import RefinerConfig
from medldm.errors import ModelError
from medldm.models.builders import apply_refiner, build_refiner, widen_refiner_input

TINY = RefinerConfig(features=[4, 4, 8, 8, 8, 4])


def _trained_like(net):
    """Weights as after training: the zero-initialised last layer made non-zero."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


def test_a_widened_refiner_computes_what_it_did_until_trained_on_its_new_guide_image():
    net = _trained_like(build_refiner(TINY, 2))
    x = torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    before = net(x)
    wide = widen_refiner_input(net, 2)
    assert wide.conv_0.conv_0.conv.in_channels == 3
    extra = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(wide(torch.cat([x, extra], 1)), before)
    assert wide.conv_0.conv_0.conv.weight.requires_grad  # the added channel is trainable
    assert widen_refiner_input(wide, 2) is wide  # already that wide: unchanged
    with pytest.raises(ModelError, match="already sees 2 guide images"):
        widen_refiner_input(wide, 1)
    reloaded = build_refiner(TINY, 2, guide_channels=2)  # what load_bundle builds for a two-image guide
    reloaded.load_state_dict(wide.state_dict())


def test_the_correction_is_added_to_the_first_guide_image():
    net = build_refiner(TINY, 2, guide_channels=2)  # untrained: zero correction
    decoded, naive, tv = (torch.full((1, 1, 32, 32), v) for v in (1.0, 2.0, 3.0))
    out = apply_refiner(net, "naive", decoded, torch.cat([naive, tv], 1))
    torch.testing.assert_close(out, naive)
    torch.testing.assert_close(apply_refiner(net, "decoded", decoded, torch.cat([naive, tv], 1)), decoded)
