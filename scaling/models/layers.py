"""Blocks and initialisers that several model families share.

Convolutions (`conv_layer`, `bias_free_conv`, padded by `conv_padding`'s rules), the depthwise
convolution (`DepthwiseConv`), squeeze-and-excitation (`SqueezeExcite`), multi-head self-attention
(`SelfAttention`), relative position biases for it (`relative_bias`) and the transformer MLP
(`Mlp`), torch's adaptive average pool (`adaptive_avg_pool`), AlexNet's local response
normalisation (`local_response_norm`) and torch's max pool with its ceil mode (`max_pool`).
Stochastic depth (`DropPath`, with its per-block `DropRate` and `linear_drop_rates`) serves the
residual families and ViT. Which kernels run them on which backend is `scaling.ops`'s business;
each family's own blocks live in its module.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

from scaling import ScalingError
from scaling.ops import activations, attention, conv, dense, depthwise

# He-normal on fan-out for convolutions (torchvision's and the TensorFlow reference's). A
# depthwise kernel is (k, k, 1, channels) in Flax, so its fan-out per output channel (k*k, as TF
# and timm count it) is Flax's fan-in.
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
depthwise_init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
# Attention's and the MLP's dense layers: Xavier-uniform, as ViT's code (big_vision).
dense_init = nnx.initializers.xavier_uniform()

PADDINGS = ("symmetric", "same")


def conv_padding(kernel, padding):
    """nnx.Conv's padding for a `kernel`-sized convolution.

    'symmetric' pads (k - 1) // 2 on every side, as torchvision, timm and the papers' Torch and
    Caffe code do; 'same' is TensorFlow's, which pads an even-sized input less on the near side
    when it strides ((2, 3) for a 7x7/2 stem, (0, 1) for a 3x3/2 conv). The two give the same
    output sizes for odd kernels, so only the function changes, not the shapes.
    """
    if padding == "same":
        return "SAME"
    if padding == "symmetric":
        return tuple(((k - 1) // 2, (k - 1) // 2) for k in kernel)
    raise ScalingError(f"unknown padding {padding!r}; valid: {', '.join(PADDINGS)}")


def conv_layer(cin, cout, kernel, strides=1, *, bias, padding, convolution, dtype, rngs, groups=1):
    """A He-initialised conv, padded by `padding`'s rule ('valid': not at all), computed by
    `convolution` (one of `scaling.ops.conv`'s); `groups` > 1: a grouped convolution (ResNeXt's),
    its kernel (k, k, cin / groups, cout)."""
    return nnx.Conv(
        cin,
        cout,
        kernel,
        strides=strides,
        padding="VALID" if padding == "valid" else conv_padding(kernel, padding),
        feature_group_count=groups,
        use_bias=bias,
        kernel_init=conv_init,
        dtype=dtype,
        conv_general_dilated=convolution,
        rngs=rngs,
    )


def bias_free_conv(cin, cout, kernel, strides=1, *, padding, convolution, dtype, rngs, groups=1):
    """A conv without bias (a norm follows it), He-initialised, padded by `padding`'s rule."""
    conv_padding(kernel, padding)  # validates it: one of PADDINGS
    return conv_layer(
        cin,
        cout,
        kernel,
        strides,
        bias=False,
        padding=padding,
        convolution=convolution,
        dtype=dtype,
        rngs=rngs,
        groups=groups,
    )


def adaptive_avg_pool(x, size):
    """torch's `AdaptiveAvgPool2d(size)` on NHWC maps: output cell i of a side of n pixels
    averages pixels floor(i n / size) to ceil((i + 1) n / size) - 1, so windows overlap where
    size does not divide n and a smaller map is repeated (1x1 -> 7x7: 49 copies). It lets the
    torchvision AlexNet and VGG take any resolution with a fixed classifier; a side already of
    `size` is left as it is. Row averages, then column averages: the same rectangle means."""

    def pool(x, axis):
        n = x.shape[axis]
        if n == size:
            return x
        cells = []
        for i in range(size):
            lo, hi = i * n // size, -(-(i + 1) * n // size)
            cells.append(jnp.mean(jax.lax.slice_in_dim(x, lo, hi, axis=axis), axis, keepdims=True))
        return jnp.concatenate(cells, axis)

    return pool(pool(x, 1), 2)


def local_response_norm(x, size=5, alpha=1e-4, beta=0.75, k=2.0):
    """Local response normalisation across channels (Krizhevsky et al. 2012, section 3.3):
    a_i / (k + alpha * sum_j a_j^2)^beta, j over the `size` channels centred on i (fewer at the
    ends). The paper's alpha multiplies the sum; torch's and Caffe's LocalResponseNorm multiply
    the mean (alpha / size), so torch's `LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2)` is this
    with the paper's alpha=1e-4. Computed in float32 (the squares of bfloat16 activations)."""
    x32 = x.astype(jnp.float32)
    half, channels = size // 2, x.shape[-1]
    squares = jnp.pad(jnp.square(x32), ((0, 0), (0, 0), (0, 0), (half, size - 1 - half)))
    total = sum(squares[..., j : j + channels] for j in range(size))
    return (x32 / (k + alpha * total) ** beta).astype(x.dtype)


def max_pool(x, window, stride, padding=0, *, ceil_mode=False):
    """torch's `MaxPool2d(window, stride, padding, ceil_mode)` on NHWC maps: `padding` pixels of
    -inf on every side; with `ceil_mode` the output side is rounded up, so a last window may
    overhang the far edge (GoogLeNet's pools: 112 -> 56, not 55), though never start beyond the
    input and its near padding."""
    pads = []
    for n in x.shape[1:3]:
        span = n + 2 * padding - window
        out = (-(-span // stride) if ceil_mode else span // stride) + 1
        if ceil_mode and (out - 1) * stride >= n + padding:
            out -= 1
        # the far side's padding that makes exactly `out` windows (negative: rows none reaches)
        pads.append((padding, (out - 1) * stride + window - n - padding))
    if min(hi for _, hi in pads) < 0:
        x = x[:, : x.shape[1] + min(0, pads[0][1]), : x.shape[2] + min(0, pads[1][1])]
        pads = [(lo, max(0, hi)) for lo, hi in pads]
    return nnx.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


class ConvNorm:
    """One network's constructors of bias-free convs and their BatchNorms, as torchvision's
    GoogLeNet and DenseNet build them: convs He-normal (as the rest of the library; the norm
    that follows makes their scale immaterial), padded (k - 1) // 2 on every side; BatchNorm with
    torch's update rate 0.1 (Flax's momentum 0.9) and `epsilon`."""

    def __init__(self, dtype, rngs, epsilon=1e-5):
        self.conv = functools.partial(
            bias_free_conv,
            padding="symmetric",
            convolution=conv.conv_general_dilated,
            dtype=dtype,
            rngs=rngs,
        )
        self.norm = functools.partial(
            nnx.BatchNorm, momentum=0.9, epsilon=epsilon, dtype=dtype, rngs=rngs
        )
        self.rngs = rngs


class DepthwiseConv(nnx.Module):
    """A bias-free depthwise kxk conv, `padding` 'same' (TensorFlow's) or 'symmetric' ((k - 1) // 2
    on every side, PyTorch's); its kernel has nnx.Conv's layout (k, k, 1, channels). `impl`
    'shift' runs the fastest form on this backend, 'conv' XLA's grouped convolution
    (`scaling.ops.depthwise`, which also picks XLA's form while FLOPs are counted): both forms
    are the same function."""

    def __init__(self, channels, kernel, stride, *, impl, padding, kernel_init, dtype, rngs):
        if impl not in depthwise.IMPLS:
            raise ScalingError(f"unknown depthwise {impl!r}; valid: {', '.join(depthwise.IMPLS)}")
        conv_padding((kernel, kernel), padding)  # validates it
        self.padding = padding
        self.kernel = nnx.Param(kernel_init(rngs.params(), (kernel, kernel, 1, channels)))
        self.in_features = self.out_features = channels
        self.stride, self.dtype, self.impl = stride, dtype, impl

    def __call__(self, x):
        x, kernel = promote_dtype((x, self.kernel[...]), dtype=self.dtype)
        return depthwise.depthwise_conv(x, kernel, self.stride, self.padding, self.impl)


class SqueezeExcite(nnx.Module):
    """Global average pool, dense reduce, `activation` (SiLU: EfficientNet's and CoAtNet's; ReLU:
    SENet's), dense expand, sigmoid gate on the channels."""

    def __init__(self, channels, reduced, *, activation=jax.nn.silu, dtype, rngs):
        self.reduce = nnx.Linear(channels, reduced, dtype=dtype, rngs=rngs)
        self.expand = nnx.Linear(reduced, channels, dtype=dtype, rngs=rngs)
        self.activation = activation

    def __call__(self, x):
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        return x * jax.nn.sigmoid(self.expand(self.activation(self.reduce(s))))


def linear_drop_rates(final, blocks):
    """Stochastic depth's linear schedule: block i of `blocks` (from 0) drops its residual branch
    at rate final * i / (blocks - 1), from 0 at the first block to `final` at the last (Huang et
    al. 2016's survival 1 - rate falling linearly; timm's "linear decay rule")."""
    return [final * i / max(blocks - 1, 1) for i in range(blocks)]


class DropRate(nnx.Variable):
    """A residual block's stochastic-depth rate: state, neither a parameter nor trained. Blocks
    stacked into a scanned `Stack` (or created by `nnx.vmap`) then carry one rate each on the
    leading axis, a scan input, so blocks of different rates still compile as one block."""


class DropPath(nnx.Module):
    """Stochastic depth (Huang et al. 2016) on a residual branch, per example: in training the
    branch is zeroed with probability `rate` and otherwise divided by the survival 1 - rate (timm's
    `drop_path`); at evaluation it is the identity. The paper instead keeps every branch in
    training unscaled and multiplies it by the survival at test time: the same network in
    expectation, with the scaling moved to training so evaluation needs no rates.

    `rate` is a number or, under `nnx.vmap`, one block's traced scalar; None: never drops (the
    layer keeps only its random stream, as a ViT without stochastic depth always had).
    """

    def __init__(self, rate, *, rngs):
        self.rate = nnx.data(None if rate is None else DropRate(jnp.asarray(rate, jnp.float32)))
        self.rngs = rngs["dropout"].fork()
        self.deterministic = False

    def __call__(self, x):
        if self.deterministic or self.rate is None:
            return x
        keep = 1.0 - self.rate[...]
        mask = jax.random.bernoulli(self.rngs(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))

    def set_view(self, deterministic=None):
        """For `nnx.view`: deterministic=True is evaluation (no drops)."""
        if deterministic is not None:
            self.deterministic = deterministic


class SelfAttention(nnx.Module):
    """Multi-head self-attention on (B, N, in_features) tokens, one fused qkv projection.

    `bias` (heads, N, N), when given, is added to the attention logits before the softmax
    (CoAtNet's relative attention). `features` may differ from `in_features` (CoAtNet's first
    transformer block of a stage widens the tokens in its qkv projection).
    """

    def __init__(self, in_features, features, num_heads, *, dropout=0.0, dtype=None, rngs):
        if features % num_heads:
            raise ScalingError(f"width {features} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        linear = dict(
            kernel_init=dense_init, dot_general=dense.dense_product, dtype=dtype, rngs=rngs
        )
        self.qkv = nnx.Linear(in_features, 3 * features, **linear)
        self.proj = nnx.Linear(features, features, **linear)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x, bias=None):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1)
        # (B, N, heads, head size) each. A split's gradient is one concatenate; three indexings'
        # were three pads and two sums (ViT 3% slower a step on CPU).
        q, k, v = (t.squeeze(2) for t in jnp.split(qkv, 3, axis=2))
        q = q * (q.shape[-1] ** -0.5)
        logits = attention.logits(q, k).astype(jnp.float32)
        if bias is not None:
            logits = logits + bias.astype(jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, -1)
        return self.dropout(self.proj(out))


def relative_position_index(height, width):
    """(dy, dx), each (HW, HW): the table row and column of the offset from token j to token i.

    Tokens are numbered row-major; the offset (yi - yj, xi - xj) is shifted by (H-1, W-1) so it
    indexes a (2H-1) x (2W-1) table.
    """
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    return ys[:, None] - ys[None, :] + height - 1, xs[:, None] - xs[None, :] + width - 1


def relative_bias(table, grid):
    """The attention bias (heads, HW, HW) gathered from a (2H-1, 2W-1, heads) table."""
    dy, dx = relative_position_index(*grid)
    return jnp.moveaxis(table[dy, dx], -1, 0)


def resize_bias_table(table, grid):
    """A (2H-1, 2W-1, heads) table bilinearly resized for an H' x W' grid; same size: unchanged."""
    shape = (2 * grid[0] - 1, 2 * grid[1] - 1, table.shape[-1])
    if tuple(table.shape) == shape:
        return table
    return jax.image.resize(table, shape, method="bilinear")


class Mlp(nnx.Module):
    """Dense, GELU, dense; dropout after each dense (ViT's placement)."""

    def __init__(self, features, hidden, *, dropout=0.0, dtype=None, rngs):
        linear = dict(
            kernel_init=dense_init, dot_general=dense.dense_product, dtype=dtype, rngs=rngs
        )
        self.fc1 = nnx.Linear(features, hidden, **linear)
        self.fc2 = nnx.Linear(hidden, features, **linear)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x):
        return self.dropout(self.fc2(self.dropout(activations.gelu(self.fc1(x)))))
