"""Train one model on one dataset: `scaling train --config configs/train.py:model=wrn28_2,...`.

The argument string picks the variant; `--config.KEY=VALUE` overrides any single field after.
"""

import ml_collections
from ml_collections import config_dict

from scaling.config import parse_arg

# Optimizer settings that differ from optax's defaults, per optimizer name.
OPTIMIZER_DEFAULTS = {
    "sgd": dict(momentum=0.9, nesterov=True),  # He et al. and Zagoruyko & Komodakis
    "adam": {},
    "adamw": {},
    "rmsprop": dict(decay=0.9, eps=1e-3, momentum=0.9),  # EfficientNet's TF-style RMSProp
    "adagrad": {},
    "adadelta": {},
    "lamb": {},
}


def get_config(arg=None):
    arg = parse_arg(
        arg,
        model="wrn16_4",
        dataset="digits",
        image_size=32,
        steps=0,
        epochs=0.0,
        batch_size=128,
        optimizer="sgd",
        lr=0.1,
        schedule="cosine",
        seed=0,
    )
    c = ml_collections.ConfigDict()
    c.seed = arg["seed"]  # initialisation, data order, augmentation and dropout

    c.model = ml_collections.ConfigDict(dict(name=arg["model"]))

    c.dataset = arg["dataset"]  # digits | folder:PATH | tfds:NAME | synthetic
    c.image_size = arg["image_size"]  # images are resized to this: resolution is a scaling axis
    c.data_fraction = 1.0  # stratified, nested training subset (data-efficiency studies)
    c.train_examples = config_dict.placeholder(int)  # absolute subset size; wins over the fraction
    c.data_seed = 0  # subset and carved held-out split; fixed so that model seeds share the data
    c.holdout_fraction = 0.2  # test split carved from train when a dataset has none
    # Decode images from disk as training goes (folder:DIR or tfds:NAME), for data larger than
    # host memory; the same batches as in memory. False decodes all at load.
    c.stream = False
    # Hold the training set on every device and gather batches there. None: on accelerators when
    # it fits in a quarter of a device's memory; never on CPU (device memory is host memory).
    c.data_on_device = config_dict.placeholder(bool)
    # none | crop | flip | crop_flip (pad-4 random crop, mirror), on device. Digits are not
    # mirror-symmetric (a flipped 2 is no 2), so they are only cropped.
    c.augment = "crop" if c.dataset == "digits" else "crop_flip"

    c.batch_size = arg["batch_size"]  # global batch, split across all devices
    c.eval_batch_size = 500
    # Duration: exactly one of steps or epochs.
    c.num_steps = arg["steps"] or config_dict.placeholder(int)
    c.num_epochs = arg["epochs"] or config_dict.placeholder(float)

    c.optimizer = ml_collections.ConfigDict(
        dict(name=arg["optimizer"], **OPTIMIZER_DEFAULTS.get(arg["optimizer"], {}))
    )
    c.lr = arg["lr"]
    c.schedule = ml_collections.ConfigDict(
        dict(
            name=arg["schedule"],  # constant | cosine | step
            warmup_steps=0,  # linear warmup from 0, for every schedule
            boundaries=(0.3, 0.6, 0.8),  # step decay at these fractions of training (WRN paper)
            decay_factor=0.2,  # step decay multiplier (WRN paper)
        )
    )
    c.weight_decay = 5e-4  # on conv and dense kernels only (not biases or norm scales)
    c.label_smoothing = 0.0
    c.grad_clip_norm = config_dict.placeholder(float)  # global-norm clipping when set
    c.compute_dtype = "float32"  # or bfloat16: activations in bf16, parameters stay float32
    # Fine-tune from weights written by `scaling import` (a directory): the head is
    # re-initialised when the number of classes differs, position tables resized to image_size.
    c.init_from = config_dict.placeholder(str)

    c.log_every = 50
    c.eval_every = 0  # steps; 0 evaluates only at the end
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    return c
