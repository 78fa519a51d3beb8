"""Convolutions for nnx.Conv (`conv_general_dilated`): on CPU with their gradients written out in
XLA:CPU's fast layouts, or oneDNN's; elsewhere XLA's own."""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from scaling.ops import backend, onednn

NHWC = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)


def _conv_fwd(x, kernel, strides, padding):
    return _conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, grad):
    x, kernel = residuals
    (kh, kw), ((top, bottom), (left, right)) = kernel.shape[:2], padding
    if strides == (1, 1):
        # The input gradient: the flipped kernel, in and out swapped, over the output gradient.
        flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
        pad = ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right))
        dx = lax.conv_general_dilated(grad, flipped, (1, 1), pad, dimension_numbers=NHWC)
    else:  # XLA's own, which needs nothing transposed
        conv = functools.partial(lax.conv_general_dilated, dimension_numbers=NHWC)
        dx = jax.vjp(lambda x: conv(x, kernel, strides, padding), x)[1](grad)[0]
    # The kernel gradient: the input with channels as the batch and images as the features,
    # against the output gradient (spread `strides` apart) as a kernel, spelled out in XLA's
    # own layout. The far side pads (or crops) the input to what the last output reads.
    far = [k + (out - 1) * s - size - near
           for k, out, s, size, near in zip((kh, kw), grad.shape[1:3], strides, x.shape[1:3],
                                            (top, left), strict=True)]  # fmt: skip
    dk = lax.conv_general_dilated(
        _unfused_transpose(x, (3, 1, 2, 0)),
        grad.transpose(1, 2, 0, 3),
        (1, 1),
        ((top, far[0]), (left, far[1])),
        rhs_dilation=strides,
        dimension_numbers=NHWC,
    )
    return dx, dk.transpose(1, 2, 0, 3)


def _unfused_transpose(x, perm):
    """`x.transpose(perm)`, kept apart from the operations that compute x. XLA:CPU fuses a
    BatchNorm and ReLU (or a scan's slicing) into a transpose, and a fused transpose that moves
    the batch innermost reads at 1-2 GB/s, 4-7x slower than a transpose on its own (16x16x128
    images: 11.9 against 1.9 ms). XLA computes a conditional's operand before it, so it cannot
    fuse across one: both branches are the transpose, and the predicate (false only for a NaN)
    is one it cannot fold. Training, four programs interleaved: resnet20 3-6% faster, resnet56
    7%, wrn16_4 3%."""
    transpose = functools.partial(jnp.transpose, axes=perm)
    first = x[(0,) * x.ndim]
    return lax.cond(first == first, transpose, transpose, x)


_conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def pointwise_conv(x, kernel, stride):
    """A 1x1 convolution (any stride, no padding) as a matrix product over channels."""
    return jnp.einsum("nhwc,cd->nhwd", x[:, ::stride, ::stride], kernel[0, 0])


def _pointwise_conv_fwd(x, kernel, stride):
    return pointwise_conv(x, kernel, stride), (x, kernel)


def _pointwise_conv_bwd(stride, residuals, grad):
    x, kernel = residuals
    sampled = x[:, ::stride, ::stride]
    # The kernel gradient sums over all pixels, and XLA transposes the first operand of the
    # product to put them innermost: the narrower operand goes first. Gradient of one layer
    # at batch 128 against XLA's convolution: 16x16x96 -> 24 (an MBConv's projection) 14.7 ->
    # 7.0 ms; 32x32x16 -> 96 at stride 2 16.2 -> 4.4 ms.
    if x.shape[-1] <= grad.shape[-1]:
        dk = jnp.einsum("nhwc,nhwd->cd", sampled, grad)
    else:  # in this order: "->cd" would put `sampled` first again. So would a plain `.T`, folded
        # into the product, which then ran in Eigen, not YNNPACK (16x16x96 -> 24 at batch 128:
        # 3.7 ms of CoAtNet's step; CoAtNet 169 -> 152 ms a step, EfficientNet-B0 206 -> 174).
        dk = _unfused_transpose(jnp.einsum("nhwd,nhwc->dc", grad, sampled), (1, 0))
    dx = jnp.einsum("nhwd,cd->nhwc", grad, kernel[0, 0])
    # Spread back onto the sampled pixels: one padding, not zeros and a scatter into them.
    spread = [(0, size - 1 - (out - 1) * stride, stride - 1)
              for size, out in zip(x.shape[1:3], grad.shape[1:3], strict=True)]  # fmt: skip
    dx = lax.pad(dx, jnp.zeros((), dx.dtype), [(0, 0, 0), *spread, (0, 0, 0)])
    return dx, dk[None, None].astype(kernel.dtype)


pointwise_conv.defvjp(_pointwise_conv_fwd, _pointwise_conv_bwd)


def conv_general_dilated(
    lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, *, pointwise=False, **kw
):
    """`lax.conv_general_dilated` for nnx.Conv. Undilated NHWC convolutions on CPU run as
    oneDNN's in float32 (`scaling.ops.onednn`, 1.2-4x faster than XLA's), else with their
    gradients written out:
    - the kernel gradient in XLA:CPU's canonical layouts. XLA derives other layouts for it,
      which it runs 25x slower inside a loop body (a scanned `Stack`) and behind many-input
      transposes outside one (training on 2 CPU cores: resnet20 282 -> 312 img/s, resnet110
      25 -> 52 with its blocks scanned; strided ones too: resnet20 0.377 -> 0.350 s a step);
    - with `pointwise=True`, 1x1 at any stride: as matrix products (CoAtNet 2-4% faster; not
      for ResNets, whose few 1x1 shortcuts run 1% slower so)."""
    dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, kw.get("dimension_numbers"))
    grouped = kw.get("feature_group_count", 1) > 1
    ours = (
        backend() == "cpu"  # GPUs and TPUs lay convolutions out well themselves
        and dims == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
        and all(tuple(s) == (1, 1) for s in (lhs_dilation, rhs_dilation))
        and kw.get("batch_group_count", 1) == 1
        and all(kw.get(k) is None for k in ("precision", "preferred_element_type", "out_sharding"))
        # Grouped ones (ResNeXt's, AlexNet's two halves) only as oneDNN's: XLA:CPU's grouped
        # convolution trained ResNeXt-29 8x16d at a quarter width about 50x slower than ResNet-20.
        and (not grouped or (lhs.dtype == rhs.dtype == jnp.float32 and onednn.enabled()))
    )
    if not ours:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, **kw
        )
    strides = tuple(window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    padding = tuple(map(tuple, padding))
    if grouped:
        return onednn.conv(lhs, rhs, strides, padding)
    one_by_one = rhs.shape[:2] == (1, 1) and strides[0] == strides[1] and not any(sum(padding, ()))
    if pointwise and one_by_one:
        return pointwise_conv(lhs, rhs, strides[0])
    if lhs.dtype == rhs.dtype == jnp.float32 and onednn.enabled():
        return onednn.conv(lhs, rhs, strides, padding)
    return _conv(lhs, rhs, strides, padding)


# `conv_general_dilated` with 1x1 convolutions as matrix products (networks of MBConv blocks,
# which are mostly 1x1 convolutions: EfficientNet's, CoAtNet's).
conv_general_dilated_pointwise = functools.partial(conv_general_dilated, pointwise=True)
