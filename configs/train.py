"""Train one model on one dataset: `scaling train --config configs/train.py:model=wrn28_2,...`.

The argument string picks the variant, from the keys model, dataset, image_size, steps or epochs,
batch_size, optimizer, lr, schedule and seed; `--config.KEY=VALUE` overrides any single field
after. The fields, each beside its default and what it does, are the package's own
(`scaling.config.training_config`, which `scaling bench` builds its runs from too): set any of
them below to make a training config of your own.
"""

from scaling.config import training_config


def get_config(arg=None):
    c = training_config(arg)
    # For example: c.label_smoothing = 0.1; c.schedule.warmup_steps = 500
    return c
