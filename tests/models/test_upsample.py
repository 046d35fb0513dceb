"""Folding nearest x2 + 3x3 convolution to the low resolution changes the cost, never the output."""

import copy

import pytest
import torch
from monai.networks.blocks import Convolution, UpSample
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

from medldm.models.upsample import FoldedNearestUpsampleConv, fold_kernel, fold_nearest_upsampling


def _vae(dims: int) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(spatial_dims=dims, in_channels=1, out_channels=1, channels=(8, 16, 16), latent_channels=3,
                         num_res_blocks=1, norm_num_groups=8, attention_levels=(False, False, False)).eval().double()


@pytest.mark.parametrize("dims, size", [(2, (7, 10)), (3, (5, 6, 3))])
def test_folded_decoder_equals_monai(dims, size):
    vae = _vae(dims)
    folded = copy.deepcopy(vae)
    assert fold_nearest_upsampling(folded) == 2  # the decoder's two upsamplings
    assert folded.state_dict().keys() == vae.state_dict().keys()  # saved and loaded as MONAI's module
    z = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        expected, got = vae.decode(z), folded.decode(z)
    assert got.shape == expected.shape == (2, 1, *(4 * s for s in size))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_channels_last_stays_channels_last_and_equal():
    vae = _vae(2).float().to(memory_format=torch.channels_last)
    folded = copy.deepcopy(vae)
    fold_nearest_upsampling(folded)
    z = torch.randn(3, 3, 9, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = folded.decoder.blocks[2](folded.decoder.blocks[1](folded.decoder.blocks[0](z)))
        expected = vae.decoder.blocks[2](vae.decoder.blocks[1](vae.decoder.blocks[0](z)))
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


def test_unet_upsamplers_fold_and_take_the_timestep_embedding():
    torch.manual_seed(1)
    unet = DiffusionModelUNet(spatial_dims=2, in_channels=3, out_channels=2, channels=(8, 16, 16),
                              attention_levels=(False, False, False), num_res_blocks=1, norm_num_groups=8).double()
    folded = copy.deepcopy(unet)
    assert fold_nearest_upsampling(folded) == 2
    x, t = torch.randn(2, 3, 12, 8, dtype=torch.float64), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(folded(x, t), unet(x, t), rtol=0, atol=1e-11)


def test_gradients_match_so_training_through_it_is_the_same():
    up = UpSample(2, 4, 4, scale_factor=2, mode="nontrainable", interp_mode="nearest", align_corners=None,
                  pre_conv=None, post_conv=Convolution(2, 4, 5, kernel_size=3, conv_only=True)).double()
    assert fold_nearest_upsampling(torch.nn.Sequential(copy.deepcopy(up))) == 1
    folded = FoldedNearestUpsampleConv(copy.deepcopy(up.postconv))
    x = torch.randn(2, 4, 5, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 10, 14, dtype=torch.float64)
    grads = [torch.autograd.grad((m(x) * g).sum(), (x, *m.postconv.parameters())) for m in (up, folded)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_what_is_not_nearest_x2_with_a_plain_3x3_conv_is_left_alone():
    def conv(k=3, strides=1):  # MONAI's wrapper, as in its networks: padding k // 2
        return Convolution(2, 4, 4, kernel_size=k, strides=strides, conv_only=True)

    def up(scale=2, mode="nearest", post=None):
        return UpSample(2, 4, 4, scale_factor=scale, mode="nontrainable", interp_mode=mode, pre_conv=None,
                        align_corners=None if mode == "nearest" else True, post_conv=post or conv())
    kept = [up(mode="bilinear"), up(scale=3), up(post=conv(k=5)), up(post=conv(strides=2)),
            UpSample(2, 4, 4, scale_factor=2, mode="deconv")]
    assert fold_nearest_upsampling(torch.nn.Sequential(up())) == 1  # the same builder, foldable settings
    net = torch.nn.Sequential(*kept)
    assert fold_nearest_upsampling(net) == 0
    assert all(a is b for a, b in zip(net, kept))


def test_fold_kernel_sums_each_phase_taps():
    w = torch.arange(9.0).reshape(1, 1, 3, 3)  # rows [0 1 2], [3 4 5], [6 7 8]
    k = fold_kernel(w).reshape(2, 2, 2, 2)  # (row phase, column phase, row tap, column tap)
    # even rows see (row -1, rows 0 and +1 summed); even columns likewise
    torch.testing.assert_close(k[0, 0], torch.tensor([[0.0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]))
    torch.testing.assert_close(k[1, 1], torch.tensor([[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8.0]]))
