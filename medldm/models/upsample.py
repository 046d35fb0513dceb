"""Nearest x2 upsampling followed by a 3-wide convolution, computed at the low resolution (exact).

After a nearest x2 upsampling, each output pixel's 3-tap window along an axis covers only two distinct input
pixels: for the even phase (x[i-1], x[i], x[i]) and for the odd one (x[i], x[i], x[i+1]). So the 3^d kernel folds
into 2^d kernels of size 2^d, one per output phase, applied to the *low*-resolution input and interleaved:
4/9 of the multiply-adds in 2D (8/27 in 3D) for the same output up to float rounding. In the VAE decoders this
convolution is the most expensive layer (64 -> 64 channels at the full resolution)."""

import itertools

import torch
import torch.nn.functional as F
from monai.networks.blocks import UpSample
from torch import nn

# _FOLD[phase] maps the 3 taps (offsets -1, 0, +1) onto the 2 low-resolution taps that phase sees
_FOLD = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
                      [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def fold_kernel(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, ..., 3) -> (2^d * out, in, 2, ..., 2): the kernel of each output phase, phase-major."""
    d = weight.dim() - 2
    fold = _FOLD.to(weight)
    k = weight
    for _ in range(d):  # contract the first remaining 3-tap axis; (phase, 2-tap) pairs pile up at the end
        k = torch.tensordot(k, fold, dims=([2], [2]))
    # (out, in, a1, p1, a2, p2, ...) -> (a1, a2, ..., out, in, p1, p2, ...)
    phases = [2 + 2 * i for i in range(d)]
    taps = [3 + 2 * i for i in range(d)]
    k = k.permute(*phases, 0, 1, *taps)
    return k.reshape(2 ** d * weight.shape[0], weight.shape[1], *([2] * d))


class FoldedNearestUpsampleConv(nn.Module):
    """Same output as ``conv(nearest_upsample_x2(x))`` for a 3-wide, stride-1, zero-padded ``conv``. Keeps the
    original ``postconv`` module (so the state_dict keys are MONAI's) and folds its current weights each call
    (a few microseconds), so weights loaded later are used as they are."""

    def __init__(self, postconv: nn.Module):
        super().__init__()
        self.postconv = postconv

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        del emb  # MONAI's diffusion U-Net passes its timestep embedding to every upsampler (WrappedUpsample)
        conv = self.postconv.conv
        if torch.jit.is_tracing():  # OpenVINO converts a trace: the plain form (it fuses that itself; the phase
            return conv(F.interpolate(x, scale_factor=2, mode="nearest"))  # copies below would trace wrongly)
        d = x.dim() - 2
        w = fold_kernel(conv.weight)
        b = None if conv.bias is None else conv.bias.repeat(2 ** d)
        y = F.conv2d if d == 2 else F.conv3d
        out = y(x, w, b, padding=1)  # 2-wide kernels, zero padding 1: sizes n + 1, the phase-a output starts at a
        n_out = conv.out_channels
        size = x.shape[2:]
        out = out.unflatten(1, (2 ** d, n_out))
        result = torch.empty((x.shape[0], n_out, *(2 * s for s in size)), dtype=out.dtype, device=x.device,
                             memory_format=_memory_format(x))
        # view each output axis 2n as (n, 2) so one phase is a strided slice
        split = result.view(x.shape[0], n_out, *itertools.chain.from_iterable((s, 2) for s in size))
        for k, phase in enumerate(itertools.product((0, 1), repeat=d)):
            src = out[:, k][(Ellipsis, *(slice(a, a + s) for a, s in zip(phase, size)))]
            dst = split[(slice(None), slice(None), *itertools.chain.from_iterable(
                (slice(None), a) for a in phase))]
            dst.copy_(src)
        return result


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _foldable(module: nn.Module) -> bool:
    """A MONAI UpSample that is exactly nearest x2 then a plain 3-wide convolution (the VAE decoders')."""
    if not isinstance(module, UpSample):
        return False
    children = dict(module.named_children())
    up, post = children.get("upsample_non_trainable"), children.get("postconv")
    if set(children) != {"upsample_non_trainable", "postconv"} or not isinstance(up, nn.Upsample):
        return False
    conv = getattr(post, "conv", None)
    if len(list(post.children())) != 1 or not isinstance(conv, (nn.Conv2d, nn.Conv3d)):
        return False
    d = conv.weight.dim() - 2
    scale = up.scale_factor if isinstance(up.scale_factor, tuple) else (up.scale_factor,) * d
    return (up.mode == "nearest" and up.size is None and all(float(s) == 2.0 for s in scale)
            and conv.kernel_size == (3,) * d and conv.stride == (1,) * d and conv.padding == (1,) * d
            and conv.dilation == (1,) * d and conv.groups == 1 and conv.padding_mode == "zeros")


def fold_nearest_upsampling(net: nn.Module) -> int:
    """Replace, in place, every foldable upsampling block of ``net``; returns how many were replaced."""
    count = 0
    for name, child in list(net.named_children()):
        if _foldable(child):
            setattr(net, name, FoldedNearestUpsampleConv(child.postconv))
            count += 1
        else:
            count += fold_nearest_upsampling(child)
    return count
