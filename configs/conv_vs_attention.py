"""Study: conv vs attention data efficiency on nested training subsets.

A Wide ResNet, a ViT and a CoAtNet C-C-T-T of about the same parameter count (~1.2M at 10
classes), each trained with the same step budget on nested, stratified subsets of the training
set spanning 10x, over seeds. Where does each sit, and do the curves cross?

    scaling sweep --config configs/conv_vs_attention.py --workdir runs/cva --dry-run
    scaling sweep --config configs/conv_vs_attention.py:dataset=folder:PATH,sizes=5000+50000 ...
"""

from pathlib import Path

import ml_collections

from scaling import sweep
from scaling.config import parse_arg
from scaling.models import coatnet

PARAMS = 1_200_000  # the matched size; WRN-22-2 has 1,108,634 and sets the scale


def models(num_classes):
    """{name: settings} of the three families at ~PARAMS parameters."""
    coat = coatnet.match_params("CCTT", PARAMS, num_classes=num_classes, small_images=True)
    return {
        "wrn22_2": {},
        # ViT-Ti/4 narrowed: 64 tokens at 32x32, 6 blocks of width 128 (1,205,898 parameters).
        "vit_ti4": dict(width=128, depth=6, num_heads=4, mlp_dim=512, pool="gap"),
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
    families = sweep.chain(
        *(sweep.fixed({"model.name": name, **{f"model.{k}": v for k, v in settings.items()}})
          for name, settings in models(arg["num_classes"]).items())
    )  # fmt: skip
    c.trials = sweep.product(
        families,
        sweep.axis("train_examples", [int(n) for n in arg["sizes"].split("+")]),
        sweep.axis("seed", range(arg["seeds"])),
    )
    return c
