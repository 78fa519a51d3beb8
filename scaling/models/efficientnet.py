"""EfficientNet (Tan & Le 2019): MBConv networks scaled in width, depth and resolution.

One baseline (B0, the `STAGES` table) and one rule for scaling it, as in the reference code
(tensorflow/tpu `efficientnet_model.py` / `efficientnet_builder.py`):

- MBConv block: 1x1 expansion conv (skipped when the expansion ratio is 1), depthwise kxk conv
  (the stride lives here), squeeze-and-excitation (global pool, 1x1 reduce to 0.25 x the block's
  *input* channels, swish, 1x1 expand, sigmoid gate; both with biases), 1x1 projection with no
  activation; identity skip when stride is 1 and channels are unchanged. Every conv is bias-free
  and followed by BatchNorm (momentum 0.99, epsilon 1e-3, as the TF code); activations are swish.
- Stochastic depth ("drop connect"): on a block with an identity skip, the residual branch is
  dropped per example with rate 0.2 * i / n for block i of n (from 0), rescaled by 1/(1 - rate)
  when kept; off in eval mode. `drop_connect_rate` sets the final rate.
- Scaling: `width_coefficient` multiplies every channel count (stem and 1280-wide head conv
  included) through `scaling.scale.round_filters` (multiples of 8); `depth_coefficient` multiplies
  the blocks of every stage through `scaling.scale.round_repeats` (ceil). `phi` sets both by
  compound scaling from B0 (depth 1.2**phi, width 1.1**phi; feed images of
  `scale.round_resolution(224, 1.15**phi)`). Resolution is the data's `image_size`: the network
  is resolution-agnostic (global average pooling) and convs pad as TensorFlow's 'SAME' (output =
  ceil(in/stride); an even-sized input is padded less on the near side when a conv strides), so
  the defaults compute timm's `tf_efficientnet_b0` (tests/test_reference.py);
  `padding='symmetric'` pads (k - 1) // 2 on every side, as timm's PyTorch-trained
  `efficientnet_b0` (whose BatchNorm epsilon, 1e-5, also differs).
- Classifier: global average pool, dropout (`dropout`, the variant's rate), `self.head` Linear.
- Depthwise convolutions: XLA's grouped convolution is slow on CPU (forward and backward alike).
  By default (`depthwise='shift'`) they run on CPU in float32 as oneDNN's depthwise kernels
  (`scaling.ops.onednn`, as PyTorch does), and otherwise as a sum of k*k shifted slices times
  per-channel weights (`scaling.ops.depthwise`, 4-5x faster training and up to 10x faster
  evaluation than XLA's on CPU), with a backward pass of their own on CPU; the FLOP counters of
  `scaling.flops` still see one convolution. `depthwise='conv'` uses XLA's convolution
  throughout (faster to compile; may suit GPUs, where cuDNN has depthwise kernels).
- `bn_momentum` (0.99 as the reference) can be lowered for short runs: at 0.99 the running
  statistics that evaluation uses need a few hundred steps to settle.

Names: `efficientnet_b0` ... `efficientnet_b7` take the paper's (width, depth, resolution,
dropout) coefficients (`VARIANTS`) and 1000 classes; `efficientnet` is the B0 baseline meant to
be scaled by settings. `small_images=True`, or the `_cifar` suffix (`efficientnet_b0_cifar`,
`efficientnet_cifar`; 10 classes, 32x32 by default), adapts a network to 32x32 inputs: the stem
conv has stride 1 instead of 2 and the first stride-2 stage (24 channels in B0) has stride 1,
so the total stride is 8 instead of 32 and a 32x32 image ends at 4x4 rather than 1x1. Nothing
else changes: the same blocks, channels and parameters; multiply-adds grow 12x (B0 at 32x32:
9.7M -> 116M, against ResNet-20's 41M and WRN-16-4's 393M).
"""

import functools
import math
import numbers
import re

import jax.numpy as jnp
from flax import nnx

from scaling import ScalingError
from scaling.models.layers import DepthwiseConv, bias_free_conv, conv_init, depthwise_init
from scaling.models.registry import Family, register
from scaling.ops.conv import conv_general_dilated_pointwise
from scaling.scale import compound_coefficients, round_filters, round_repeats

# The B0 baseline, stage by stage: (expansion ratio, kernel, stride, output channels, blocks).
STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_WIDTH, TOP_WIDTH = 32, 1280  # stem conv3x3 stride 2; conv1x1 before pooling
SE_RATIO = 0.25  # of the block's input channels
# variant -> (width coefficient, depth coefficient, resolution, dropout), from the paper.
VARIANTS = {
    0: (1.0, 1.0, 224, 0.2),
    1: (1.0, 1.1, 240, 0.2),
    2: (1.1, 1.2, 260, 0.3),
    3: (1.2, 1.4, 300, 0.3),
    4: (1.4, 1.8, 380, 0.4),
    5: (1.6, 2.2, 456, 0.4),
    6: (1.8, 2.6, 528, 0.5),
    7: (2.0, 3.1, 600, 0.5),
}

# Convs: He-normal on fan-out (`layers.conv_init`, `layers.depthwise_init`), as the reference.
# Classifier: uniform(-1/sqrt(classes), 1/sqrt(classes)), as the reference dense initializer.
dense_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


class Layers:
    """The conv/norm/dense constructors shared by one network's blocks."""

    def __init__(self, dtype, depthwise, padding, bn_momentum, rngs):
        self.dtype, self.depthwise, self.padding = dtype, depthwise, padding
        self.rngs = rngs
        self.conv = functools.partial(
            bias_free_conv,
            padding=padding,
            convolution=conv_general_dilated_pointwise,
            dtype=dtype,
            rngs=rngs,
        )
        self.norm = functools.partial(
            nnx.BatchNorm, momentum=bn_momentum, epsilon=1e-3, dtype=dtype, rngs=rngs
        )
        self.dense = functools.partial(nnx.Linear, kernel_init=conv_init, dtype=dtype, rngs=rngs)


class MBConv(nnx.Module):
    """Mobile inverted bottleneck with squeeze-and-excitation and stochastic depth."""

    def __init__(self, cin, cout, *, expand, kernel, stride, drop_rate, layers):
        mid = cin * expand
        self.expand = nnx.data(layers.conv(cin, mid, (1, 1)) if expand != 1 else None)
        self.expand_norm = nnx.data(layers.norm(mid) if expand != 1 else None)
        self.depthwise = DepthwiseConv(
            mid,
            kernel,
            stride,
            impl=layers.depthwise,
            padding=layers.padding,
            kernel_init=depthwise_init,
            dtype=layers.dtype,
            rngs=layers.rngs,
        )
        self.depthwise_norm = layers.norm(mid)
        squeezed = max(1, int(cin * SE_RATIO))
        self.se_reduce = layers.dense(mid, squeezed)
        self.se_expand = layers.dense(squeezed, mid)
        self.project = layers.conv(mid, cout, (1, 1))
        self.project_norm = layers.norm(cout)
        self.skip = stride == 1 and cin == cout
        self.drop = nnx.Dropout(drop_rate, broadcast_dims=(1, 2, 3), rngs=layers.rngs)

    def __call__(self, x):
        y = x
        if self.expand is not None:
            y = nnx.swish(self.expand_norm(self.expand(y)))
        y = nnx.swish(self.depthwise_norm(self.depthwise(y)))
        s = jnp.mean(y, axis=(1, 2))
        s = nnx.sigmoid(self.se_expand(nnx.swish(self.se_reduce(s))))
        y = y * s[:, None, None, :]
        y = self.project_norm(self.project(y))
        return x + self.drop(y) if self.skip else y


class EfficientNet(nnx.Module):
    """Stem, the `STAGES` of MBConv blocks scaled in width and depth, 1x1 conv, pool, classifier."""

    def __init__(
        self,
        *,
        width_coefficient=1.0,
        depth_coefficient=1.0,
        dropout=0.2,
        drop_connect_rate=0.2,
        small_images=False,
        depthwise="shift",
        padding="same",
        bn_momentum=0.99,
        num_classes=1000,
        dtype=None,
        in_channels=3,
        rngs: nnx.Rngs,
    ):
        if width_coefficient <= 0 or depth_coefficient <= 0:
            raise ScalingError("width_coefficient and depth_coefficient must be positive")
        if num_classes < 1:
            raise ScalingError(f"num_classes must be positive, got {num_classes}")
        rates = dict(dropout=dropout, drop_connect_rate=drop_connect_rate, bn_momentum=bn_momentum)
        for key, rate in rates.items():
            if not 0 <= rate < 1:
                raise ScalingError(f"{key} must be in [0, 1), got {rate}")
        layers = Layers(dtype, depthwise, padding, bn_momentum, rngs)
        width = lambda c: round_filters(c, width_coefficient)  # noqa: E731

        stem_width = width(STEM_WIDTH)
        self.stem = layers.conv(in_channels, stem_width, (3, 3), strides=1 if small_images else 2)
        self.stem_norm = layers.norm(stem_width)

        stages = [
            (e, k, s, width(c), round_repeats(n, depth_coefficient)) for e, k, s, c, n in STAGES
        ]
        if small_images:  # the first stride-2 stage keeps the resolution too
            first = next(i for i, stage in enumerate(stages) if stage[2] == 2)
            stages[first] = (*stages[first][:2], 1, *stages[first][3:])
        num_blocks = sum(stage[4] for stage in stages)
        cin, blocks = stem_width, []
        for expand, kernel, stride, cout, repeats in stages:
            for j in range(repeats):
                drop_rate = drop_connect_rate * len(blocks) / num_blocks
                blocks.append(
                    MBConv(
                        cin,
                        cout,
                        expand=expand,
                        kernel=kernel,
                        stride=stride if j == 0 else 1,
                        drop_rate=drop_rate,
                        layers=layers,
                    )
                )
                cin = cout
        self.blocks = nnx.List(blocks)

        top_width = width(TOP_WIDTH)
        self.top = layers.conv(cin, top_width, (1, 1))
        self.top_norm = layers.norm(top_width)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(
            top_width, num_classes, kernel_init=dense_init, dtype=dtype, rngs=rngs
        )

    def __call__(self, x):
        x = nnx.swish(self.stem_norm(self.stem(x)))
        for b in self.blocks:
            x = b(x)
        x = nnx.swish(self.top_norm(self.top(x)))
        x = jnp.mean(x, axis=(1, 2))
        return self.head(self.dropout(x)).astype(jnp.float32)


def parse(name):
    """(variant or None, cifar) for a name of this family."""
    m = re.fullmatch(r"efficientnet(?:_b(\d+))?(_cifar)?", name)
    variant = None if m[1] is None else int(m[1])
    if variant is not None and variant not in VARIANTS:
        raise ScalingError(f"unknown EfficientNet variant b{variant}; valid: b0 ... b7")
    return variant, bool(m[2])


def create(name, **kw):
    """Build `efficientnet[_bN][_cifar]`, or B0 grown by compound scaling (`phi`)."""
    variant, cifar = parse(name)
    width, depth, _, dropout = VARIANTS[variant or 0]
    if (phi := kw.pop("phi", None)) is not None:
        _check_phi(phi)
        if variant:
            raise ScalingError(
                f"phi scales the B0 baseline; use efficientnet or efficientnet_b0, not {name}"
            )
        if "width_coefficient" in kw or "depth_coefficient" in kw:
            raise ScalingError("give phi or width_coefficient/depth_coefficient, not both")
        c = compound_coefficients(phi)
        width, depth = c.width, c.depth
    defaults = dict(width_coefficient=width, depth_coefficient=depth, dropout=dropout)
    if cifar:
        defaults.update(small_images=True, num_classes=10)
    return EfficientNet(**{**defaults, **kw})


def _check_phi(phi) -> None:
    """Compound scaling grows B0: phi = 0 is B0 and each unit about doubles the multiply-adds
    (fractions too: configs/efficientnet_compound.py takes 0.5). A negative phi is no
    EfficientNet (-100 would silently build one-block stages of 8 channels), and NaN, infinity or
    a string fail later with no name for the cause."""
    if isinstance(phi, bool) or not isinstance(phi, numbers.Real) or not 0 <= phi < math.inf:
        raise ScalingError(f"phi must be a finite number >= 0 (0 is B0), got {phi!r}")


def default_image_size(name):
    variant, cifar = parse(name)
    return 32 if cifar else VARIANTS[variant or 0][2]


register(
    Family(
        name="efficientnet",
        pattern=r"efficientnet(_b\d+)?(_cifar)?",
        build=create,
        constructor=EfficientNet,
        examples=tuple(f"efficientnet_b{v}" for v in VARIANTS) + ("efficientnet_cifar",),
        image_size=default_image_size,
        names="efficientnet, efficientnet_b{0-7}, efficientnet[_b{0-7}]_cifar",
        width="width_coefficient",
        depth="depth_coefficient",
        extra_settings=("phi",),
    )
)
