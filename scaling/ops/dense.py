"""Dense layers' matrix products (`dense_product`, for nnx.Linear) and what a block keeps of
them for its backward pass (`remat_policy`)."""

import jax
from jax.ad_checkpoint import checkpoint_name

from scaling.ops import backend
from scaling.ops.conv import pointwise_conv

# The name of the outputs of the products written out for the CPU (`dense_product`,
# `attention.logits`): a rematerialised block keeps them as it keeps dot_general's.
CPU_PRODUCTS = "cpu_products"

# The matrix products' outputs: dot_general's, and those named CPU_PRODUCTS.
MATRIX_PRODUCTS = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_saveable,
    jax.checkpoint_policies.save_only_these_names(CPU_PRODUCTS),
)


def dense_product(x, kernel, dimension_numbers, precision=None, **kw):
    """nnx.Linear's product. On CPU, over the last axis of `x`, a 1x1 convolution
    (`conv.pointwise_conv`) for its kernel gradient: autodiff's ran in Eigen with both operands
    transposed, 4-10x slower than in YNNPACK."""
    plain = dimension_numbers == (((x.ndim - 1,), (0,)), ((), ())) and precision is None
    if backend() != "cpu" or not plain or any(v is not None for v in kw.values()):
        return jax.lax.dot_general(x, kernel, dimension_numbers, precision, **kw)
    out = pointwise_conv(x.reshape(-1, 1, 1, x.shape[-1]), kernel[None, None], 1)
    # Named: a rematerialised block keeps it as it keeps dot_general's (`MATRIX_PRODUCTS`).
    return checkpoint_name(out.reshape(*x.shape[:-1], kernel.shape[-1]), CPU_PRODUCTS)


def remat_policy():
    """What a block that is not rematerialised whole keeps for its backward pass: None, all of
    it (as is usual on accelerators), or a `jax.checkpoint` policy. On CPU only matrix-product
    outputs (`MATRIX_PRODUCTS`) are kept and the rest (layer norms, GELU, softmax) is
    recomputed: writing and reading those activations cost this memory-bound machine more than
    computing them again (vit_s4 trains 15.5 -> 17.6 images/s and its step needs 2.4 GB, not
    5.2)."""
    return MATRIX_PRODUCTS if backend() == "cpu" else None
