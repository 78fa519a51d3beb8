"""Depthwise convolutions (NHWC input, (k, k, 1, channels) kernel), padded TensorFlow's way
(`padding='same'`) or PyTorch's (`'symmetric'`, (k - 1) // 2 on every side).

XLA's grouped convolution is slow on CPU, forward and backward alike. `depthwise_conv` runs
oneDNN's depthwise kernels there in float32 (`scaling.ops.onednn`, as PyTorch does), and
otherwise a sum of k*k shifted slices times per-channel weights (4-5x faster training and up to
10x faster evaluation than XLA's on CPU), with a backward pass of its own on CPU; `impl='conv'`
is XLA's convolution throughout (faster to compile; may suit GPUs, where cuDNN has depthwise
kernels)."""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from scaling.ops import backend, is_counting, onednn

IMPLS = ("shift", "conv")


def depthwise_conv(x, kernel, stride, padding, impl="shift"):
    """The depthwise convolution of `x` by `kernel`: XLA's grouped convolution (`impl='conv'`,
    and while FLOPs are counted: the counters read convolutions), else the fastest form of the
    same function on this backend."""
    if impl == "conv" or is_counting():
        return _depthwise_xla(x, kernel, stride, padding)
    if x.dtype == jnp.float32 and onednn.enabled():  # CPU only
        return _depthwise_onednn(x, kernel, stride, padding)
    if backend() == "cpu":  # a loop over examples suits GPUs and TPUs badly
        return _depthwise_shift(x, kernel, stride, padding)
    return _shift_sum(x, kernel, stride, padding)


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
