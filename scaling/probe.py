"""A trained run's penultimate features: the input of its classifier (`head`), for a k-NN probe.

`run_features(WORKDIR)` rebuilds the run from its `config.json`, loads the same data the run
trained on (the same subset, carved splits and pixel statistics), restores its newest sound
checkpoint (the best weights when it used early stopping), and returns the features of every
training and test example in evaluation mode. Every family ends in a linear `head` after its
pooling (and, in AlexNet, VGG and LeNet, its hidden dense layers), so the head's input is the
representation the classifier reads: `head` is swapped for the identity, nothing else changes.
"""

import contextlib
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from scaling import ScalingError, data, rundir
from scaling import checkpoints as ckpt
from scaling import early_stopping as early
from scaling.steps import normalize

FEATURE_BATCH = 500


class Identity(nnx.Module):
    def __call__(self, x):
        return x


def run_config(workdir: Path) -> ml_collections.ConfigDict:
    """The training config of the run in `workdir`; a ScalingError if it holds none."""
    recorded = rundir.recorded_config(workdir) if Path(workdir).is_dir() else None
    if not recorded or "model" not in recorded or "batch_size" not in recorded:
        raise ScalingError(f"--features {workdir}: no training run there (no config.json)")
    if not (Path(workdir) / "checkpoints").is_dir():
        raise ScalingError(f"--features {workdir}: the run has no checkpoints")
    return ml_collections.ConfigDict(recorded)


def restore(workdir) -> tuple:
    """(config, the run's Dataset, its model in evaluation mode with the restored weights, the
    run's pixel statistics) of the run in `workdir`."""
    from scaling import train as trainer  # JAX, orbax and the models: only when probing

    workdir = Path(workdir)
    config = run_config(workdir)
    settings = trainer.check(config)
    ds = data.load(config.dataset, config.image_size, train_examples=config.train_examples,
                   data_fraction=config.data_fraction, holdout_fraction=config.holdout_fraction,
                   seed=config.data_seed)  # fmt: skip
    if early.enabled(config):  # the split the run held out stays out of the probe's training set
        ds, _ = early.carve_validation(ds, config.early_stopping.validation_fraction)
    settings["num_classes"] = ds.num_classes
    total = trainer.num_train_steps(config, len(ds.train_labels))
    program = trainer.build(config, settings, total, *trainer.pixel_statistics(ds))
    checkpoints = ckpt.manager(workdir / "checkpoints", keep=None, every=1)
    with contextlib.closing(checkpoints):
        state = ckpt.restore_latest(checkpoints, program.state)
    if int(state["step"]) == 0:
        raise ScalingError(f"--features {workdir}: no checkpoint could be restored")
    if "early_stopping" in state:
        state = early.restore_best(state)
    abstract = program.abstract_model
    abstract.eval()
    model = nnx.merge(nnx.graphdef(abstract), state["params"], state["model_state"])
    return config, ds, model, state["run"]


def run_features(workdir) -> tuple:
    """(the run's Dataset, training features, test features, config) of the run in `workdir`."""
    config, ds, model, run = restore(workdir)
    model.head = Identity()
    graph, weights = nnx.split(model)

    @jax.jit
    def embed(weights, run, images):
        return nnx.merge(graph, weights)(normalize(images, dict(run=run)))

    def of(images):
        parts = [embed(weights, run, images[i : i + FEATURE_BATCH])
                 for i in range(0, len(images), FEATURE_BATCH)]  # fmt: skip
        return np.concatenate([np.asarray(p).reshape(len(p), -1) for p in parts])

    return ds, of(ds.train_images), of(ds.test_images), config
