"""Reference fixtures: logits of torchvision/timm/official networks at seeded random weights.

A fixture (tests/reference/<name>.json) names every tensor of the reference network with its shape
and the law it was drawn from, plus the seed and the reference's logits. Weights and images are
regenerated here with numpy alone, so a test can import them into our models and compare logits
where torch is not installed; tests/make_reference.py (which needs torch) writes the fixtures.
"""

import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "reference"


def draw(tensors: list, seed: int) -> dict[str, np.ndarray]:
    """The fixture's tensors, drawn in order from one generator seeded with `seed`.

    Each entry is [name, shape, law], the law one of ["normal", std], ["uniform", lo, hi],
    ["zeros"] or ["count"] (an int64 zero: BatchNorm's num_batches_tracked). Drawn in float64 and
    then cast, so that the float32 values are the same on every platform.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape, law in tensors:
        shape = tuple(shape)
        kind, *args = law
        if kind == "normal":
            value = rng.standard_normal(shape) * args[0]
        elif kind == "uniform":
            value = rng.uniform(args[0], args[1], shape)
        elif kind == "zeros":
            value = np.zeros(shape)
        elif kind == "count":
            out[name] = np.zeros(shape, np.int64)
            continue
        else:
            raise ValueError(f"{name}: unknown law {law}")
        out[name] = value.astype(np.float32)
    return out


def images(seed: int, batch: int, size: int) -> np.ndarray:
    """The fixture's input batch, float32 NCHW (torch's layout), from a generator of its own."""
    rng = np.random.default_rng(seed + 1)
    return rng.standard_normal((batch, 3, size, size)).astype(np.float32)


def load(name: str) -> dict:
    """The fixture `name` as written by tests/make_reference.py."""
    return json.loads((FIXTURES / f"{name}.json").read_text())


def relative_difference(ours, reference) -> float:
    """max |ours - reference| / max |reference|: one scale for logits of any spread."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())
