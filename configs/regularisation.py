"""Study: which regulariser closes the generalization gap, and at what training-set size?

    scaling sweep --config configs/regularisation.py --workdir runs/reg --dry-run
    scaling sweep --config configs/regularisation.py:dataset=folder:PATH --workdir runs/reg

One network (ResNet-20) trained on nested, stratified training subsets, with no regulariser
or one of dropout, label smoothing, mixup, CutMix and early stopping, over seeds. Every trial
takes the same steps of the same batch, so a small subset is seen for many epochs (where
regularisers matter) and the largest for about one.
"""

from pathlib import Path

import ml_collections

from scaling import sweep
from scaling.config import parse_arg

# Each at the setting its paper uses on CIFAR (weight decay 5e-4 is on in all, the base's).
REGULARISERS = {
    "none": {},
    "dropout": {"model.block_dropout": 0.3},  # between the two convs of a block, as WRN's 0.3
    "label_smoothing": {"label_smoothing": 0.1},  # Szegedy et al. 2016
    "mixup": {"mixup_alpha": 1.0},  # Zhang et al. 2018's CIFAR-10 alpha
    "cutmix": {"cutmix_alpha": 1.0},  # Yun et al. 2019's CIFAR alpha
    # 10% of the subset held out; the loss measured 10 times over the run, patience 3.
    "early_stopping": {"early_stopping.patience": 3},
}


def get_config(arg=None):
    arg = parse_arg(
        arg,
        dataset="digits",
        model="resnet20",
        image_size=32,
        steps=200,  # 12,800 examples: 25 epochs of the smallest subset, 1.6 of the largest
        batch_size=64,
        sizes="500+2000+8000",  # training examples; '+' separates values
        seeds=2,
    )
    c = ml_collections.ConfigDict()
    c.base = sweep.base_config(
        Path(__file__).with_name("train.py"),
        **{k: arg[k] for k in ("dataset", "model", "image_size", "steps", "batch_size")},
    )
    c.base.schedule.warmup_steps = arg["steps"] // 10
    c.base.early_stopping.every = max(arg["steps"] // 10, 1)
    c.trials = sweep.product(
        sweep.chain(*(sweep.fixed(overrides) for overrides in REGULARISERS.values())),
        sweep.axis("train_examples", [int(n) for n in arg["sizes"].split("+")]),
        sweep.axis("seed", range(arg["seeds"])),
    )
    return c
