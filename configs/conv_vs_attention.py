"""Study: conv vs attention data efficiency on nested training subsets.

A Wide ResNet, a ViT and a CoAtNet C-C-T-T of about the same parameter count (`params`), each
trained with the same step budget on nested, stratified subsets of the training set spanning
10x, over seeds. Where does each sit, and do the curves cross?

    scaling sweep --config configs/conv_vs_attention.py --workdir runs/cva --dry-run
    scaling sweep --config configs/conv_vs_attention.py:dataset=folder:PATH,sizes=5000+50000 ...
"""

import math
from pathlib import Path

import ml_collections

from scaling import models, sweep
from scaling.config import parse_arg
from scaling.models import coatnet_sizing

WRN_GRID = [f"wrn{d}_{k}" for d in (10, 16, 22, 28, 40) for k in (1, 2, 4, 8, 10)]
VIT_DEPTH = 6  # ViT-Ti's proportions, shallower: width grows in 32-wide heads, MLP 4x width


def nearest(candidates, params, count):
    return min(candidates, key=lambda c: abs(math.log(count(c) / params)))


def models_at(params, num_classes, image_size, coatnet_depths):
    """{name: settings} of the three families with about `params` parameters each."""

    def count(name, **settings):
        model = models.abstract(name, image_size=image_size, num_classes=num_classes, **settings)
        return models.count_params(model)

    def vit(width):
        return dict(width=width, depth=VIT_DEPTH, num_heads=width // 32, mlp_dim=4 * width,
                    pool="gap")  # fmt: skip

    width = nearest(range(32, 1025, 32), params, lambda w: count("vit_ti4", **vit(w)))
    coat = coatnet_sizing.match_params("CCTT", params, depths=coatnet_depths,
                                       num_classes=num_classes, small_images=True,
                                       image_size=image_size)  # fmt: skip
    return {
        nearest(WRN_GRID, params, count): {},
        "vit_ti4": vit(width),  # patch 4: 64 tokens at 32x32
        "coatnet": dict(layout="CCTT", depths=coat["depths"], dims=coat["dims"], small_images=True),
    }


def get_config(arg=None):
    arg = parse_arg(
        arg,
        dataset="digits",
        image_size=32,
        steps=200,
        batch_size=64,
        sizes="140+280+560+1400",  # training examples; '+' separates values
        seeds=2,
        num_classes=10,
        params=1_200_000,  # the matched size: WRN-22-2 (1,079,642) at the default
        coatnet_depths="2+2+3+5+2",  # CoAtNet-0's blocks per stage S0..S4
    )
    c = ml_collections.ConfigDict()
    c.base = sweep.base_config(
        Path(__file__).with_name("train.py"),
        optimizer="adamw",  # one optimizer that trains all three families
        lr=1e-3,
        **{k: arg[k] for k in ("dataset", "image_size", "steps", "batch_size")},
    )
    c.base.weight_decay = 0.05
    c.base.schedule.warmup_steps = arg["steps"] // 10
    depths = tuple(int(d) for d in arg["coatnet_depths"].split("+"))
    families = models_at(arg["params"], arg["num_classes"], arg["image_size"], depths)
    c.trials = sweep.product(
        sweep.chain(*(sweep.fixed({"model.name": name, **{f"model.{k}": v for k, v in s.items()}})
                      for name, s in families.items())),
        sweep.axis("train_examples", [int(n) for n in arg["sizes"].split("+")]),
        sweep.axis("seed", range(arg["seeds"])),
    )  # fmt: skip
    return c
