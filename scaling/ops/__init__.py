"""Backend-specific kernels and choices, in one place (as timm's `layers/config.py`).

Model files call the operations here and never ask which backend they run on; what runs on a CPU,
a GPU or a TPU is decided in this package alone (`backend()`):

- `conv`: convolutions with their gradients written out for XLA:CPU, oneDNN's where it has them,
  1x1 ones as matrix products (`pointwise_conv`);
- `depthwise`: depthwise convolutions as shifted slices, oneDNN's kernels or XLA's;
- `dense`: dense layers' products and what a block keeps for its backward pass;
- `attention`: the attention logits; `activations`: GELU's form;
- `onednn`: oneDNN's convolutions as XLA custom calls (with `onednn_conv.cc`);
- `cpu`: process settings for XLA:CPU, applied only when asked.
"""

import contextlib
import contextvars

# No module-level JAX import: `scaling.ops.cpu.configure()` must run before JAX starts.

# Set while `scaling.flops` traces a model to count its operations (`counting`).
_COUNTING = contextvars.ContextVar("scaling_counting", default=False)


@contextlib.contextmanager
def counting():
    """Trace models in the form their operations are counted in, without changing them: XLA's
    cost analysis counts a loop's body once, so scans over layers are unrolled; convolutions that
    run as other operations to be faster (depthwise ones as shifted slices, oneDNN's custom
    calls) take XLA's convolution form."""
    from scaling.ops import onednn

    token = _COUNTING.set(True)
    try:
        with onednn.disabled():
            yield
    finally:
        _COUNTING.reset(token)


def is_counting() -> bool:
    return _COUNTING.get()


def backend() -> str:
    """The platform JAX computes on: 'cpu', 'gpu' or 'tpu'."""
    import jax

    return jax.default_backend()


def unroll_loops() -> bool:
    """Whether a scan over layers is lowered unrolled. On accelerators a rolled loop copies every
    layer's saved activations into stacked buffers and fuses nothing across layers (on an H100,
    bf16, batch 256: resnet50 3,755 -> 5,660 training images/s, vit_b16 1,594 -> 2,540); the CPU
    keeps the loop, whose compile time it needs. Loops are unrolled while counting too."""
    return backend() != "cpu" or is_counting()
