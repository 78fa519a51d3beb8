"""Study: WRN width vs depth at a matched step budget (Zagoruyko & Komodakis 2016, section 3).

    scaling sweep --config configs/wrn_width_depth.py --workdir runs/wrn --dry-run
    scaling sweep --config configs/wrn_width_depth.py:dataset=folder:PATH,image_size=32,steps=2000

Every trial trains for the same number of steps with the same batch, so wider and deeper
networks are compared at equal data and optimisation budget, not equal compute.
"""

from pathlib import Path

import ml_collections

from scaling import sweep
from scaling.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(
        arg,
        dataset="digits",
        image_size=16,
        steps=100,
        batch_size=128,
        depths="10+16+22",  # d = 6n+4; '+' separates values inside the argument string
        widths="1+2+4",  # widening factors k
        seeds=1,
    )
    c = ml_collections.ConfigDict()
    c.base = sweep.base_config(
        Path(__file__).with_name("train.py"),
        **{k: arg[k] for k in ("dataset", "image_size", "steps", "batch_size")},
    )
    depths = [int(d) for d in arg["depths"].split("+")]
    widths = [int(k) for k in arg["widths"].split("+")]
    c.trials = sweep.product(
        sweep.axis("model.name", [f"wrn{d}_{k}" for d in depths for k in widths]),
        sweep.axis("seed", range(arg["seeds"])),
    )
    return c
