"""Helpers for ml_collections config files (`configs/*.py` with `get_config(arg)`), and the
training config itself: every field with its default (`training_config`)."""

import ast
import importlib.util
import math
from pathlib import Path

import ml_collections
from ml_collections import config_dict

from scaling import ScalingError


def parse_value(text: str):
    """'3' -> 3, '0.1' -> 0.1, 'True' -> True, '(1, 2)' -> (1, 2), anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_arg(arg: str | None, **defaults) -> dict:
    """Parse a config argument 'key=value,key=value' over typed defaults (big_vision style).

    Values take the type of their default (so 'seed=3' is an int); unknown keys are an error.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, text = item.partition("=")
        if not sep or key not in defaults:
            raise ScalingError(
                f"config argument {item!r}: expected key=value, keys: {', '.join(defaults)}"
            )
        default, value = defaults[key], parse_value(text)
        if isinstance(default, str):
            value = text
        elif isinstance(default, float) and type(value) is int:
            value = float(value)
        elif default is not None and type(value) is not type(default):
            raise ScalingError(f"config argument {key}={text}: expected {type(default).__name__}")
        out[key] = value
    return out


def parse_settings(items: list[str]) -> dict:
    """`--set key=value` pairs into a dict of Python values."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ScalingError(f"--set {item!r}: expected key=value")
        out[key] = parse_value(text)
    return out


def load_config(spec: str):
    """The ConfigDict of 'path/to/config.py[:arg]', as `--config` would give it. Every way a
    config file can fail (missing, a syntax error, no get_config, get_config raising or returning
    something else) is one ScalingError naming the file."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise ScalingError(f"config file {path} does not exist")
    try:
        module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as e:  # whatever the file's own code raises
        raise ScalingError(f"config file {path} fails to load: {_describe(e)}") from None
    if not callable(getattr(module, "get_config", None)):
        raise ScalingError(f"config file {path} defines no get_config(arg)")
    try:
        config = module.get_config(arg or None)
    except ScalingError:
        raise
    except Exception as e:
        raise ScalingError(f"config file {path}: get_config failed: {_describe(e)}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ScalingError(
            f"config file {path}: get_config returned a {type(config).__name__}, not a ConfigDict"
        )
    return config


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()  # a SyntaxError's names the line
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


# ---- The training config ----
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


def training_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of one training run, every field with its default; `arg` ('key=value,...')
    picks the variant. configs/train.py returns it, `scaling bench` builds its runs from it."""
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
    # Labels a study gives its trials (a scaling strategy, a FLOP budget): recorded with the run
    # and shown as columns by `scaling report`; training never reads them.
    c.tags = ml_collections.ConfigDict()

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
    # mixup and CutMix (scaling.mixing): Beta(alpha, alpha) weights, 0 is off; a batch is mixed
    # with probability mix_prob. Training accuracy then counts each image's own label.
    c.mixup_alpha = 0.0
    c.cutmix_alpha = 0.0
    c.mix_prob = 1.0
    # Each auxiliary classifier's loss weight (GoogLeNet's aux_logits; Szegedy et al. 2015: 0.3).
    c.aux_loss_weight = 0.3
    # Early stopping (scaling.early_stopping) on a validation split carved from the training
    # subset. Validation loss by default: smoother than accuracy on a small split, and the
    # quantity Prechelt (1998) and Keras monitor.
    c.early_stopping = ml_collections.ConfigDict(
        dict(
            patience=0,  # evaluations without improvement before stopping; 0 is off
            every=100,  # steps between evaluations of the validation split
            min_delta=0.0,  # an improvement must beat the best by more than this
            metric="loss",  # loss | accuracy, of the validation split
            validation_fraction=0.1,  # of the training subset, never of the test split
        )
    )
    c.grad_clip_norm = config_dict.placeholder(float)  # global-norm clipping when set
    c.compute_dtype = "float32"  # or bfloat16: activations in bf16, parameters stay float32
    # Fine-tune from weights written by `scaling import` (a directory): the head is
    # re-initialised when the number of classes differs, position tables resized to image_size.
    c.init_from = config_dict.placeholder(str)

    # Weights & Biases (scaling.tracking, the wandb extra): set project to log each run's
    # metrics, config and summary there too. group: a sweep's trials default to their sweep's
    # name; mode: online | offline (files only, `wandb sync` later) | disabled.
    c.wandb = ml_collections.ConfigDict(
        dict(
            project=config_dict.placeholder(str),
            entity=config_dict.placeholder(str),
            group=config_dict.placeholder(str),
            mode="online",
        )
    )

    c.log_every = 50
    c.eval_every = 0  # steps; 0 evaluates only at the end
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    return c


# ---- Checking a training config before any work ----
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


# key: (test, what the valid values are); a missing key is not checked (older configs).
_SETTINGS = {
    "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "data_seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "image_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "dataset": (
        lambda v: isinstance(v, str) and v != "",
        "digits, folder:PATH, tfds:NAME or synthetic",
    ),
    "data_fraction": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "train_examples": (lambda v: v is None or _is_int(v) and v >= 1, "None or an integer >= 1"),
    "holdout_fraction": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "stream": (lambda v: isinstance(v, bool), "True or False"),
    "data_on_device": (lambda v: v is None or isinstance(v, bool), "None, True or False"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "eval_batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "num_steps": (lambda v: v is None or _is_int(v) and v >= 1, "None or an integer >= 1"),
    "num_epochs": (lambda v: v is None or _is_number(v) and v > 0, "None or a number > 0"),
    "lr": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "label_smoothing": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "aux_loss_weight": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "mixup_alpha": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0: off)"),
    "cutmix_alpha": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0: off)"),
    "mix_prob": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "early_stopping.patience": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: off)"),
    "early_stopping.every": (lambda v: _is_int(v) and v >= 1, "an integer >= 1 (steps)"),
    "early_stopping.min_delta": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "early_stopping.validation_fraction": (
        lambda v: _is_number(v) and 0 < v < 1,
        "a number in (0, 1)",
    ),
    "grad_clip_norm": (lambda v: v is None or _is_number(v) and v > 0, "None or a number > 0"),
    "schedule.warmup_steps": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "schedule.decay_factor": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "schedule.boundaries": (
        lambda v: (
            isinstance(v, list | tuple)
            and all(_is_number(b) and 0 < b < 1 for b in v)
            and list(v) == sorted(v)
        ),
        "increasing fractions of training in (0, 1)",
    ),
    "init_from": (lambda v: v is None or isinstance(v, str) and v != "", "None or a directory"),
    "log_every": (lambda v: _is_int(v) and v >= 1, "an integer >= 1 (steps)"),
    "eval_every": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (steps; 0: only at the end)"),
    "checkpoint_every": (lambda v: _is_int(v) and v >= 1, "an integer >= 1 (steps)"),
    "keep_checkpoints": (
        lambda v: v is None or _is_int(v) and v >= 1,
        "None (all) or an integer >= 1",
    ),
}


def check_training_config(config):
    """Raise ScalingError naming the first setting outside its valid range, before any work.
    Names (model, optimizer, schedule, augment, dtype) are checked where they are looked up."""
    if not all(key in config for key in ("model", "batch_size", "num_steps", "num_epochs")):
        raise ScalingError("the config is not a training config (a study? use scaling sweep)")
    for key, (valid, description) in _SETTINGS.items():
        node, *path = [config, *key.split(".")]
        for part in path:
            if not hasattr(node, "keys") or part not in node:
                break
            node = node[part]
        else:
            if not valid(node):
                raise ScalingError(f"config.{key}={node!r} is invalid: expected {description}")
    if (config.num_steps is None) == (config.num_epochs is None):
        raise ScalingError("set exactly one of config.num_steps and config.num_epochs")
