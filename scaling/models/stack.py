"""Identical blocks stacked and scanned, and back: XLA compiles one block, not one per layer."""

import jax
import jax.numpy as jnp
from flax import nnx

from scaling import ops


def apply_block(block, x):
    return block(x)


def scan_blocks(apply, blocks, x, unroll=False):
    """`apply(block, x)` for each block of `blocks` (state stacked on a leading axis) in turn,
    by `nnx.scan` with `x` as the carry. The loop is lowered unrolled when `unroll` is set (a
    short `Stack`) and where `scaling.ops.unroll_loops` says so (on accelerators, and while FLOPs
    are counted; the CPU keeps the loop, whose compile time it needs)."""
    unroll = unroll or ops.unroll_loops()
    scan = nnx.scan(apply, in_axes=(0, nnx.Carry), out_axes=nnx.Carry, unroll=unroll or 1)
    return scan(blocks, x)


SHORT_STACK = 4  # blocks; a Stack of at most this many is unrolled on every backend


class Stack(nnx.Module):
    """Identical blocks applied in turn by `nnx.scan` over their parameters stacked on a leading
    axis, so XLA compiles one block, not one per layer (resnet110: see docs/performance.md).

    Built from blocks created one by one, so a scanned network starts from the very weights of
    an unrolled one and computes the same function.
    """

    def __init__(self, blocks):
        graphdef, _ = nnx.split(blocks[0])
        states = [nnx.split(block)[1] for block in blocks]
        self.blocks = nnx.merge(graphdef, jax.tree.map(lambda *a: jnp.stack(a), *states))
        self.depth = len(blocks)
        # `scaling.flops` lowers the scan unrolled: XLA's cost analysis counts a loop body once.

    def __call__(self, x):
        # A short stack compiles quickly unrolled, and on CPU it then trains faster: resnet20
        # (stacks of 2) 0.423 -> 0.394 s a step, resnet32 (4) 0.617 -> 0.571; resnet56 (8):
        # 1.25 -> 1.25, and unrolled by 4 slower (1.13 -> 1.22). See docs/performance.md.
        short = self.depth <= SHORT_STACK
        return scan_blocks(apply_block, self.blocks, x, short)


def unstack(stacked) -> list:
    """The blocks of a module whose state is stacked on a leading (layer) axis, one by one."""
    graphdef, state = nnx.split(stacked)
    depth = jax.tree.leaves(state)[0].shape[0]
    layers = [jax.tree.map(lambda a, i=i: a[i], state) for i in range(depth)]
    return [nnx.merge(graphdef, layer) for layer in layers]
