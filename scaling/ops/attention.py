"""Attention's logits, q . k over the head dimension, with a backward pass for XLA:CPU."""

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from scaling.ops import backend
from scaling.ops.dense import CPU_PRODUCTS


def logits(q, k):
    """(B, heads, Nq, Nk) logits of (B, N, heads, head size) queries and keys."""
    if backend() == "cpu":  # named as in `dense.dense_product`, for the same reason
        return checkpoint_name(_cpu_logits(q, k), CPU_PRODUCTS)
    return _logits(q, k)


def _logits(q, k):
    return jnp.einsum("bqhd,bkhd->bhqk", q, k)


@jax.custom_vjp
def _cpu_logits(q, k):
    """`_logits` with a backward pass whose key gradient has the queries innermost in the
    gradient it contracts: autodiff's contracted them in place, which XLA:CPU ran in Eigen, not
    YNNPACK (CoAtNet's 16-token blocks: 2.0-2.3 ms a product, against 0.1)."""
    return _logits(q, k)


def _cpu_logits_fwd(q, k):
    return _cpu_logits(q, k), (q, k)


def _cpu_logits_bwd(residuals, grad):
    q, k = residuals
    dq = jnp.einsum("bhqk,bkhd->bqhd", grad, k)
    dk = jnp.einsum("bhkq,bqhd->bkhd", grad.swapaxes(2, 3), q)
    return dq, dk


_cpu_logits.defvjp(_cpu_logits_fwd, _cpu_logits_bwd)
