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
  (`scaling.onednn`, as PyTorch does), and otherwise as a sum of k*k shifted slices times
  per-channel weights (`DepthwiseConv`, 4-5x faster training and up to 10x faster evaluation
  than XLA's on CPU), with a backward pass of their own on CPU; the FLOP counters of
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

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype
from jax import lax

from scaling import ScalingError, onednn
from scaling.models import resnet
from scaling.models.resnet import bias_free_conv, conv_padding
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
NAMES = "efficientnet, efficientnet_b{0-7}, efficientnet[_b{0-7}]_cifar"

# The reference initialisers: He-normal on fan-out for convs. A depthwise kernel is
# (k, k, 1, channels) in Flax, so its fan-out per output channel (k*k, as TF and timm count it)
# is Flax's fan-in.
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
depthwise_init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
# On CPU, convolutions with their gradients written out, 1x1 ones as matrix products (MBConv
# blocks are mostly 1x1 convolutions; also CoAtNet's).
conv_general_dilated = functools.partial(resnet.conv_general_dilated, pointwise=True)
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
            convolution=conv_general_dilated,
            dtype=dtype,
            rngs=rngs,
        )
        self.norm = functools.partial(
            nnx.BatchNorm, momentum=bn_momentum, epsilon=1e-3, dtype=dtype, rngs=rngs
        )
        self.dense = functools.partial(nnx.Linear, kernel_init=conv_init, dtype=dtype, rngs=rngs)


def _depthwise_xla(x, kernel, stride, padding):
    """Depthwise convolution as one XLA grouped convolution."""
    k = kernel.shape[0]
    return lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        [_pads(size, k, stride, padding)[0] for size in x.shape[1:3]],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


def _pads(size, k, stride, padding):
    """The padding (before, after) of one spatial side, and the output size: TensorFlow's 'SAME'
    (`padding='same'`) or (k - 1) // 2 on both sides (`'symmetric'`, as PyTorch code pads)."""
    if padding == "symmetric":
        before = (k - 1) // 2
        return (before, before), (size + 2 * before - k) // stride + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return (total // 2, total - total // 2), out


def _taps(x, k, stride, out_shape):
    """The k*k shifted, strided slices of a padded NHWC `x`, each of `out_shape`'s size."""
    (oh, ow), (n, c) = out_shape, (x.shape[0], x.shape[-1])
    for i in range(k):
        for j in range(k):
            end = (n, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c)
            yield lax.slice(x, (0, i, j, 0), end, (1, stride, stride, 1))


def _correlate(padded, kernel, stride, out_shape):
    """Sum over the taps of `padded`'s shifted slices times per-channel weights, in float32."""
    k, c = kernel.shape[0], kernel.shape[-1]
    out = jnp.zeros((padded.shape[0], *out_shape, c), jnp.float32)
    for tap, weight in zip(
        _taps(padded, k, stride, out_shape), kernel.reshape(k * k, c), strict=True
    ):
        out = out + tap.astype(jnp.float32) * weight.astype(jnp.float32)
    return out


def _shift_sum(x, kernel, stride, padding):
    k, (h, w) = kernel.shape[0], x.shape[1:3]
    (ph, oh), (pw, ow) = _pads(h, k, stride, padding), _pads(w, k, stride, padding)
    padded = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
    return _correlate(padded, kernel, stride, (oh, ow)).astype(x.dtype)


def _kernel_gradient(x, dy, k, stride, padding):
    """d(loss)/d(kernel) of `_shift_sum`: for each tap, the sum over batch and pixels of the
    tap's slice times `dy`. A loop over the examples adds each one's products to k*k
    accumulators the size of one output image: XLA's reductions over the batch read the k*k
    slices only after writing each out whole (12 MB apiece for 16x16x96 at batch 128) and ran
    5-10x slower. Examples go in `groups` side by side (the device count, when it divides the
    batch) so that a batch sharded over devices stays sharded."""
    (n, h, w, c), (oh, ow) = x.shape, dy.shape[1:3]
    (ph, _), (pw, _) = _pads(h, k, stride, padding), _pads(w, k, stride, padding)
    groups = math.gcd(n, jax.device_count())
    xs = x.reshape(groups, n // groups, h, w, c)
    dys = dy.reshape(groups, n // groups, oh, ow, c)

    def add_example(i, sums):
        image = jnp.pad(lax.dynamic_index_in_dim(xs, i, 1, False), ((0, 0), ph, pw, (0, 0)))
        d = lax.dynamic_index_in_dim(dys, i, 1, False).astype(jnp.float32)
        taps = _taps(image, k, stride, (oh, ow))
        return tuple(s + t.astype(jnp.float32) * d for s, t in zip(sums, taps, strict=True))

    zeros = tuple(jnp.zeros((groups, oh, ow, c), jnp.float32) for _ in range(k * k))
    sums = lax.fori_loop(0, n // groups, add_example, zeros)
    return jnp.stack([s.sum((0, 1, 2)) for s in sums]).reshape(k, k, 1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shift(x, kernel, stride, padding):
    """The same convolution as a sum over the k*k taps of shifted, strided slices of the padded
    input times per-channel weights: elementwise work that XLA fuses into one loop, 5-15x faster
    than its grouped convolution on CPU. Accumulates in float32. The backward pass keeps only
    `x`: left to autodiff, XLA saved all k*k slices for the kernel gradient (9 copies of the
    input for a 3x3 kernel) and summed each over the batch in a separate reduction."""
    return _shift_sum(x, kernel, stride, padding)


def _depthwise_shift_fwd(x, kernel, stride, padding):
    return _shift_sum(x, kernel, stride, padding), (x, kernel)


def _depthwise_shift_bwd(stride, padding, residuals, dy):
    x, kernel = residuals
    k, (h, w), (oh, ow) = kernel.shape[0], x.shape[1:3], dy.shape[1:3]
    (ph, _), (pw, _) = _pads(h, k, stride, padding), _pads(w, k, stride, padding)
    # The input gradient correlates the flipped kernel with dy spread `stride` apart and
    # padded so that every input pixel sees the outputs it fed.
    spread = [
        (k - 1 - before, size + before - (out - 1) * stride - 1, stride - 1)
        for before, size, out in ((ph[0], h, oh), (pw[0], w, ow))
    ]
    pad = functools.partial(lax.pad, padding_value=jnp.zeros((), dy.dtype),
                            padding_config=[(0, 0, 0), *spread, (0, 0, 0)])  # fmt: skip
    # Padded inside a conditional, so that XLA cannot fuse dy's producer (BatchNorm's and the
    # activation's backward) into the k*k reads of the correlation, which recomputed it per tap
    # (CoAtNet 10% slower). The predicate, false only for a NaN, is one XLA cannot fold.
    first = kernel[0, 0, 0, 0]
    padded = lax.cond(first == first, pad, pad, dy)
    dx = _correlate(padded, kernel[::-1, ::-1], 1, (h, w)).astype(x.dtype)
    return dx, _kernel_gradient(x, dy, k, stride, padding).astype(kernel.dtype)


_depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


def _geometry(x_shape, k, stride, padding):
    """Strides and padding ((top, bottom), (left, right)) as `onednn` takes them."""
    pads = tuple(_pads(size, k, stride, padding)[0] for size in x_shape[1:3])
    return (stride, stride), pads


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_onednn(x, kernel, stride, padding):
    """oneDNN's depthwise kernels, PyTorch's on CPU: at EfficientNet-B0's shapes (batch 128,
    32x32 images) up to 3-5x faster than `_depthwise_shift` forward and for the input gradient
    (16x16x32: 2.15 -> 0.65 ms forward), the same within noise at 1x1x1152. oneDNN has a
    depthwise kernel gradient only for some shapes (3x3 kernels on images wider than the kernel,
    on this CPU); for the others it runs its general convolution, 2-10x slower than
    `_kernel_gradient`'s loop, which runs instead."""
    return onednn.forward(x, kernel, *_geometry(x.shape, kernel.shape[0], stride, padding))


def _depthwise_onednn_fwd(x, kernel, stride, padding):
    return _depthwise_onednn(x, kernel, stride, padding), (x, kernel)


def _depthwise_onednn_bwd(stride, padding, residuals, dy):
    x, kernel = residuals
    geometry = _geometry(x.shape, kernel.shape[0], stride, padding)
    dx = onednn.input_gradient(dy, kernel, x.shape, *geometry)
    name = onednn.implementation("scaling_conv_kernel_gradient", x.shape, kernel.shape, *geometry)
    if name.startswith("jit_dw"):
        return dx, onednn.kernel_gradient(x, dy, kernel.shape, *geometry)
    return dx, _kernel_gradient(x, dy, kernel.shape[0], stride, padding)


_depthwise_onednn.defvjp(_depthwise_onednn_fwd, _depthwise_onednn_bwd)


class DepthwiseConv(nnx.Module):
    """A bias-free depthwise kxk conv, `padding` 'same' (TensorFlow's) or 'symmetric' ((k - 1) // 2
    on every side, PyTorch's); its kernel has nnx.Conv's layout
    (k, k, 1, channels). `impl` 'shift' runs oneDNN's kernels on CPU in float32
    (`_depthwise_onednn`), else the shifted-slice form (`_depthwise_shift`); 'conv' runs XLA's
    grouped convolution. `scaling.flops` sets `count_as_conv` while it counts, because its
    counters read convolutions: both forms are the same function."""

    def __init__(self, channels, kernel, stride, *, impl, padding, kernel_init, dtype, rngs):
        if impl not in ("shift", "conv"):
            raise ScalingError(f"unknown depthwise {impl!r}; valid: shift, conv")
        conv_padding((kernel, kernel), padding)  # validates it
        self.padding = padding
        self.kernel = nnx.Param(kernel_init(rngs.params(), (kernel, kernel, 1, channels)))
        self.in_features = self.out_features = channels
        self.stride, self.dtype, self.impl = stride, dtype, impl
        self.count_as_conv = False

    def __call__(self, x):
        x, kernel = promote_dtype((x, self.kernel[...]), dtype=self.dtype)
        geometry = (self.stride, self.padding)
        if self.impl == "conv" or self.count_as_conv:
            return _depthwise_xla(x, kernel, *geometry)
        if x.dtype == jnp.float32 and onednn.enabled():  # CPU only
            return _depthwise_onednn(x, kernel, *geometry)
        if jax.default_backend() == "cpu":  # a loop over examples suits GPUs and TPUs badly
            return _depthwise_shift(x, kernel, *geometry)
        return _shift_sum(x, kernel, *geometry)


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
    """(variant or None, cifar) for a name of this family; None if it is not one."""
    m = re.fullmatch(r"efficientnet(?:_b(\d+))?(_cifar)?", name)
    if not m:
        return None
    variant = None if m[1] is None else int(m[1])
    if variant is not None and variant not in VARIANTS:
        raise ScalingError(f"unknown EfficientNet variant b{variant}; valid: b0 ... b7")
    return variant, bool(m[2])


def create(name, **kw):
    """Build a model of this family by name; None if the name is not of this family."""
    if (parsed := parse(name)) is None:
        return None
    variant, cifar = parsed
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
    if (parsed := parse(name)) is None:
        return None
    variant, cifar = parsed
    return 32 if cifar else VARIANTS[variant or 0][2]
