"""Study: single-axis vs compound scaling at equal multiply-adds (Tan & Le 2019, figure 8).

From the small-image B0 baseline at 32x32 (116.2M multiply-adds, 4.02M parameters at 10
classes), scale depth only, width only, resolution only, and all three together, each to about
twice the baseline's multiply-adds, and train each with the same budget.

The multipliers come from `scaling.scale.solve_for_macs(name, axis, 2 * base, 32)` (the measured
ratios in brackets; rounding makes them steps): depth 1.6875 (2.04x), width 1.453125 (2.01x),
resolution 43 px (2.00x). Compound scaling uses the paper's alpha, beta, gamma at phi = 0.5
(2.17x; phi = 1 gives 2.66x here because `ceil` adds a block to every one-block stage). A test
re-measures these ratios.

    scaling sweep --config configs/efficientnet_compound.py --workdir runs/compound --dry-run
"""

from pathlib import Path

import ml_collections

from scaling import sweep
from scaling.config import parse_arg
from scaling.scale import compound_coefficients, round_resolution

PHI = 0.5


def arms(image_size=32):
    """{arm: overrides} for the baseline and the four scaled networks."""
    c = compound_coefficients(PHI)
    return {
        "baseline": {},
        "depth": {"model.depth_coefficient": 1.6875},
        "width": {"model.width_coefficient": 1.453125},
        "resolution": {"image_size": 43 * image_size // 32},
        "compound": {"model.depth_coefficient": c.depth, "model.width_coefficient": c.width,
                     "image_size": round_resolution(image_size, c.resolution)},
    }  # fmt: skip


def get_config(arg=None):
    arg = parse_arg(arg, dataset="digits", steps=100, batch_size=64, seeds=2)
    c = ml_collections.ConfigDict()
    c.base = sweep.base_config(
        Path(__file__).with_name("train.py"),
        model="efficientnet_b0_cifar",
        image_size=32,
        **{k: arg[k] for k in ("dataset", "steps", "batch_size")},
    )
    c.trials = sweep.product(
        sweep.chain(*(sweep.fixed(overrides) for overrides in arms().values())),
        sweep.axis("seed", range(arg["seeds"])),
    )
    return c
