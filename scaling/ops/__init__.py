"""Backend-specific kernels and choices, in one place (as timm's `layers/config.py`).

Model files call the operations here and never ask which backend they run on; what runs on a CPU,
a GPU or a TPU is decided in this package alone (`backend()`).
"""

import jax


def backend() -> str:
    """The platform JAX computes on: 'cpu', 'gpu' or 'tpu'."""
    return jax.default_backend()
