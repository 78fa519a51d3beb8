"""Study: the EfficientNet grid search for (alpha, beta, gamma) at phi = 1 (Tan & Le 2019, 3.3).

Candidates are depth, width and resolution multipliers on a grid whose product
alpha * beta**2 * gamma**2 lies within `tolerance` of 2 (each doubles the multiply-adds), applied
to the small-image B0 baseline and trained briefly; the best triple is the one the report ranks
first by test accuracy. The paper found alpha=1.2, beta=1.1, gamma=1.15.

    scaling sweep --config configs/efficientnet_grid.py --workdir runs/grid --dry-run
"""

import itertools
from pathlib import Path

import ml_collections
import numpy as np

from scaling import sweep
from scaling.config import parse_arg
from scaling.scale import round_resolution


def candidates(low, high, step, tolerance):
    grid = np.round(np.arange(low, high + step / 2, step), 4)
    return [
        (float(a), float(b), float(g))
        for a, b, g in itertools.product(grid, grid, grid)
        if abs(a * b**2 * g**2 - 2) <= tolerance
    ]


def get_config(arg=None):
    arg = parse_arg(
        arg,
        dataset="digits",
        image_size=32,  # the baseline resolution gamma multiplies
        steps=100,
        batch_size=64,
        low=1.0,
        high=1.4,
        step=0.1,
        tolerance=0.1,  # |alpha * beta^2 * gamma^2 - 2| allowed
        seeds=1,
    )
    c = ml_collections.ConfigDict()
    c.base = sweep.base_config(
        Path(__file__).with_name("train.py"),
        model="efficientnet_b0_cifar",
        **{k: arg[k] for k in ("dataset", "image_size", "steps", "batch_size")},
    )
    triples = candidates(arg["low"], arg["high"], arg["step"], arg["tolerance"])
    c.trials = sweep.product(
        [
            {"model.depth_coefficient": a, "model.width_coefficient": b,
             "image_size": round_resolution(arg["image_size"], g)}
            for a, b, g in triples
        ],
        sweep.axis("seed", range(arg["seeds"])),
    )  # fmt: skip
    return c
