"""ResNet backbone with frozen batch norm, returning C3-C5 and their padding masks.

Mirrors torchvision's ResNet v1.5 (stride in the 3x3 conv) as used by the
authors (models/backbone.py: Backbone, FrozenBatchNorm2d). Images are NHWC.

norm="frozen_batch_norm" is the published backbone (ImageNet weights, stem and
layer1 never train). norm="group_norm" is for training from scratch, where
there are no batch statistics to freeze: trainable GroupNorm (32 groups, at
least 4 channels each) after every conv, the last norm of every residual branch
starting at zero scale (so each block starts as the identity), and every stage
trains.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddetr_jax.models import initializers
from ddetr_jax.models.conv import conv_or_matmul


class FrozenStat(nnx.Variable):
    """Frozen batch-norm statistics and affine terms: never trained."""


RESNET_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class FrozenBatchNorm(nnx.Module):
    """y = (x - mean) / sqrt(var + 1e-5) * weight + bias, all four frozen."""

    def __init__(self, features: int):
        self.weight = FrozenStat(initializers.ones(None, (features,)))
        self.bias = FrozenStat(initializers.zeros(None, (features,)))
        self.running_mean = FrozenStat(initializers.zeros(None, (features,)))
        self.running_var = FrozenStat(initializers.ones(None, (features,)))

    def __call__(self, x):
        scale = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + 1e-5)
        shift = self.bias[...] - self.running_mean[...] * scale
        return x * scale.astype(x.dtype) + shift.astype(x.dtype)


def _conv(in_features, out_features, kernel, stride=1, dilation=1, *, rngs):
    """Bias-free conv with PyTorch padding (dilation * (kernel // 2))."""
    pad = dilation * (kernel // 2)
    return nnx.Conv(in_features, out_features, (kernel, kernel), strides=stride,
                    padding=((pad, pad), (pad, pad)), kernel_dilation=dilation, use_bias=False,
                    kernel_init=initializers.variance_scaling(2.0, "fan_out", "normal"),
                    conv_general_dilated=conv_or_matmul, rngs=rngs)


NORMS = ("frozen_batch_norm", "group_norm")
GROUPS = 32


class ConvBN(nnx.Module):
    """Conv then norm (see the module doc); zero_scale starts a group norm at 0."""

    def __init__(self, in_features, out_features, kernel, stride=1, dilation=1, *,
                 norm="frozen_batch_norm", zero_scale=False, rngs):
        self.conv = _conv(in_features, out_features, kernel, stride, dilation, rngs=rngs)
        if norm == "group_norm":
            self.bn = nnx.GroupNorm(out_features, num_groups=min(GROUPS, out_features // 4),
                                    epsilon=1e-5, rngs=rngs, bias_init=initializers.zeros,
                                    scale_init=(initializers.zeros if zero_scale
                                                else initializers.ones))
        else:
            self.bn = FrozenBatchNorm(out_features)

    def __call__(self, x):
        return self.bn(self.conv(x))


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4), projection shortcut when shapes change."""

    expansion = 4

    def __init__(self, in_features, width, stride, dilation, *, norm, rngs):
        out_features = width * self.expansion
        self.conv1 = ConvBN(in_features, width, 1, norm=norm, rngs=rngs)
        self.conv2 = ConvBN(width, width, 3, stride, dilation, norm=norm, rngs=rngs)
        self.conv3 = ConvBN(width, out_features, 1, norm=norm, zero_scale=True, rngs=rngs)
        self.downsample = (ConvBN(in_features, out_features, 1, stride, norm=norm, rngs=rngs)
                           if stride != 1 or in_features != out_features else None)

    def __call__(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = jax.nn.relu(self.conv1(x))
        y = jax.nn.relu(self.conv2(y))
        return jax.nn.relu(self.conv3(y) + shortcut)


class BasicBlock(nnx.Module):
    """3x3 (stride, dilation) -> 3x3 (dilation), for ResNet-18/34."""

    expansion = 1

    def __init__(self, in_features, width, stride, dilation, *, norm, rngs):
        self.conv1 = ConvBN(in_features, width, 3, stride, dilation, norm=norm, rngs=rngs)
        self.conv2 = ConvBN(width, width, 3, 1, dilation, norm=norm, zero_scale=True, rngs=rngs)
        self.downsample = (ConvBN(in_features, width, 1, stride, norm=norm, rngs=rngs)
                           if stride != 1 or in_features != width else None)

    def __call__(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = jax.nn.relu(self.conv1(x))
        return jax.nn.relu(self.conv2(y) + shortcut)


def _pool_taps(x):
    """x: (B, H, W, C) -> the 9 taps of every 3x3 stride-2 window (padding 1,
    -inf outside), row-major: [(B, ceil(H/2), ceil(W/2), C)] * 9."""
    height, width = x.shape[1:3]
    rows, cols = 2 * -(-height // 2) - 1, 2 * -(-width // 2) - 1
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return [padded[:, dy:dy + rows:2, dx:dx + cols:2] for dy in range(3) for dx in range(3)]


@jax.custom_vjp
def _max_pool_3x3_s2(x):
    """x: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C); PyTorch MaxPool2d(3, 2, 1).

    The maximum of nine strided views. Its gradient goes, as PyTorch's, to the
    first maximum of each window in row-major order: nine masked, strided
    adds that XLA fuses into one loop (XLA:CPU's select-and-scatter for
    reduce_window took 25 ms at the quickstart's stem, this 3 ms).
    """
    return functools.reduce(jnp.maximum, _pool_taps(x))


def _max_pool_fwd(x):
    out = _max_pool_3x3_s2(x)
    return out, (x, out)


def _max_pool_bwd(residuals, grad_out):
    x, out = residuals
    height, width = x.shape[1:3]
    zero = jnp.zeros((), grad_out.dtype)
    taken = jnp.zeros(out.shape, bool)
    grad = jnp.zeros(x.shape[:1] + (height + 2, width + 2) + x.shape[3:], grad_out.dtype)
    for tap_index, tap in enumerate(_pool_taps(x)):
        dy, dx = divmod(tap_index, 3)
        first = (tap == out) & ~taken
        taken = taken | first
        spread = ((0, 0, 0), (dy, height + 1 - dy - 2 * (out.shape[1] - 1), 1),
                  (dx, width + 1 - dx - 2 * (out.shape[2] - 1), 1), (0, 0, 0))
        grad = grad + jax.lax.pad(jnp.where(first, grad_out, zero), zero, spread)
    return (grad[:, 1:height + 1, 1:width + 1],)


_max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


class ResNet(nnx.Module):
    """ResNet-{18,34,50,101} trunk returning the outputs of layer2, layer3, layer4.

    width: channels of the stem and layer1 (64 in the published ResNets; the
    stages have width, 2, 4 and 8 times it, times the block expansion).

    dilation=True makes layer4 dilated with stride 1 (DC5: stride 16), as
    torchvision's replace_stride_with_dilation=[False, False, True]: the first
    block of layer4 keeps dilation 1, the others use 2.
    """

    def __init__(self, depth: int = 50, dilation: bool = False, norm: str = "frozen_batch_norm",
                 width: int = 64, *, rngs: nnx.Rngs):
        if depth not in RESNET_LAYERS:
            raise ValueError(f"depth: expected one of {sorted(RESNET_LAYERS)}, got {depth}")
        if norm not in NORMS:
            raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
        block = Bottleneck if depth >= 50 else BasicBlock
        self.freeze_early = norm == "frozen_batch_norm"
        widths = (width, 2 * width, 4 * width, 8 * width)
        self.stem = ConvBN(3, width, 7, 2, norm=norm, rngs=rngs)
        in_features = width
        stages = []
        for index, (count, width) in enumerate(zip(RESNET_LAYERS[depth], widths)):
            stride = 1 if index == 0 else 2
            dilations = [1] * count
            if index == 3 and dilation:
                stride, dilations = 1, [1] + [2] * (count - 1)
            blocks = []
            for b in range(count):
                blocks.append(block(in_features, width, stride if b == 0 else 1, dilations[b],
                                    norm=norm, rngs=rngs))
                in_features = width * block.expansion
            stages.append(nnx.List(blocks))
        self.layers = nnx.List(stages)
        self.channels = tuple(w * block.expansion for w in widths[1:])
        self.strides = (8, 16, 16 if dilation else 32)

    def __call__(self, images):
        """images: (B, H, W, 3) -> [C3 (B, H/8, W/8, c3), C4, C5].

        With frozen batch norm the stem and layer1 never train (the authors'
        train_backbone rule): no gradient flows into them.
        """
        x = _max_pool_3x3_s2(jax.nn.relu(self.stem(images)))
        outputs = []
        for index, stage in enumerate(self.layers):
            for blk in stage:
                x = blk(x)
            if index == 0 and self.freeze_early:
                x = jax.lax.stop_gradient(x)
            outputs.append(x)
        return outputs[1:]


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of every output index, as PyTorch F.interpolate(mode='nearest').

    floor(i * (in / out)) computed in float32, clamped to in - 1.
    """
    if in_size == out_size:
        return np.arange(out_size)
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def resize_mask(pad_mask, height: int, width: int):
    """pad_mask: (B, H, W) bool -> (B, height, width) nearest-neighbour resize."""
    rows = nearest_indices(pad_mask.shape[1], height)
    cols = nearest_indices(pad_mask.shape[2], width)
    return pad_mask[:, rows][:, :, cols]
