"""Study: which way to grow a network for a FLOP budget (Dollar, Singh & Girshick 2021)?

WRN-16-1 (16-32-64 channels, two blocks per stage: 53.3 MFLOPs at 32x32) is grown by depth
only (d), width only (w), resolution only (r), EfficientNet's compound scaling and the
width-heavy fast compound scaling (dWr) to 2, 3 and 4 times its FLOPs, each solved through the
families' rounding rules (`scaling.sweep.strategies`); every network trains with the same steps
and recipe. Beside them, a random sample of the WRN design space (depth, width, resolution and
learning rate) inside 1-2x the base's FLOPs gives the error distribution (EDF) a study compares
strategies against. `scaling report DIR --extrapolate 5` then fits error against FLOPs without
the five 4x networks and predicts them.

    scaling sweep --config configs/scaling_strategies.py --workdir runs/strategies --dry-run
"""

from pathlib import Path

import ml_collections

from scaling import space, sweep
from scaling.config import parse_arg

BASE = "wrn16_1"
# Two blocks per stage (not WRN-10's one) let depth grow in steps of 50%, not 100%, and 16
# channels in the first stage let width grow in steps of 50% (channels are multiples of 8).
BASE_SETTINGS = {}
BASE_FLOPS = 53_314_816  # measured (space.complexity); a test checks it


def get_config(arg=None):
    arg = parse_arg(
        arg,
        dataset="digits",
        steps=150,  # 19,200 examples at batch 128: 0.38 CIFAR-10 epochs, what a CPU affords
        batch_size=128,
        seeds=2,
        budgets="2+3+4",  # multiples of the base's FLOPs; '+' separates values
        strategies="d+w+r+compound+dWr",
        samples=30,
    )
    c = ml_collections.ConfigDict()
    c.base = sweep.base_config(
        Path(__file__).with_name("train.py"),
        model=BASE,
        image_size=32,
        **{k: arg[k] for k in ("dataset", "steps", "batch_size")},
    )
    c.base.schedule.warmup_steps = arg["steps"] // 10
    budgets = [int(b) for b in arg["budgets"].split("+")]
    scaled = sweep.strategies(BASE, arg["strategies"].split("+"), budgets, 32, **BASE_SETTINGS)
    settings = {f"model.{k}": v for k, v in BASE_SETTINGS.items()}
    base = sweep.fixed({**settings, "tags.strategy": "base", "tags.budget": 1})
    sample = space.sample(
        arg["samples"],
        {
            "model.name": space.Choice(("wrn10_1", "wrn16_1", "wrn22_1")),
            "model.width_multiplier": space.LogUniform(0.5, 2, quantum=0.125),
            "image_size": space.Choice((24, 32, 40)),
            "lr": space.LogUniform(0.02, 0.4, quantum=0.005),
            "tags.strategy": "sample",
        },
        constraints={"flops": (1 * BASE_FLOPS, 2 * BASE_FLOPS)},
        seed=0,
    )
    c.trials = sweep.chain(
        sweep.product(sweep.chain(base, scaled), sweep.axis("seed", range(arg["seeds"]))),
        sample,
    )
    return c
