"""Early stopping on a validation split carved from the training data (never the test split).

Every `early_stopping.every` steps (and at the last) the run measures the validation loss or
accuracy (config `early_stopping.metric`). A value better than the best so far by more than
`min_delta` is an improvement: it becomes the best, and a copy of the weights at that step is
kept. After `patience` evaluations in a row without one, training stops; the best weights then
replace the last ones, and the run's final evaluation and summary are theirs.

The tracker (best value, its step, evaluations waited) and the best weights live in the training
state, so every checkpoint holds them and a resumed run makes the same decisions bit for bit; the
update is one jitted function, so every host of a multi-host job decides alike.

The validation split is the last `validation_fraction` of the training subset. The training
arrays come in nested-subset order, whose every prefix is stratified, so both the kept prefix and
the carved rest hold each class within one example of its share.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from scaling import ScalingError

METRICS = ("loss", "accuracy")  # validation loss falls, accuracy rises


def enabled(config) -> bool:
    early = config.get("early_stopping")
    return bool(early) and early.patience > 0


def check(config) -> None:
    if not enabled(config):
        return
    early = config.early_stopping
    if early.metric not in METRICS:
        raise ScalingError(
            f"unknown early_stopping.metric {early.metric!r}; valid: {', '.join(METRICS)}"
        )


def carve_validation(ds, fraction):
    """(`ds` without its last `fraction` of training examples, those examples as `Examples`)."""
    n = len(ds.train_labels)
    held = max(1, round(fraction * n))
    if n - held < 1:
        raise ScalingError(f"validation_fraction={fraction} leaves none of {n} training examples")
    train, keep = ds.train, slice(0, n - held)
    validation = dataclasses.replace(
        train, records=train.records[n - held :], labels=train.labels[n - held :]
    )
    if hasattr(ds, "train_images"):  # an in-memory Dataset
        ds = dataclasses.replace(
            ds, train_images=ds.train_images[keep], train_labels=ds.train_labels[keep]
        )
    else:  # a Stream
        train = dataclasses.replace(train, records=train.records[keep], labels=train.labels[keep])
        ds = dataclasses.replace(ds, train=train)
    return ds, validation


def initial_tracker(state) -> dict:
    """No best yet: the first evaluation is always an improvement."""
    return dict(
        best=jnp.array(np.inf, jnp.float32),  # of the signed metric: lower is better
        best_step=jnp.array(0, jnp.int32),
        waited=jnp.array(0, jnp.int32),
        params=state["params"],
        model_state=state["model_state"],
    )


def update(state, value, step, min_delta):
    """`state` with its tracker updated by `value` (signed: lower is better) measured at `step`."""
    tracker = state["early_stopping"]
    improved = value < tracker["best"] - min_delta
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(improved, a, b), new, old)  # noqa: E731
    tracker = dict(
        best=jnp.where(improved, value, tracker["best"]),
        best_step=jnp.where(improved, step, tracker["best_step"]),
        waited=jnp.where(improved, 0, tracker["waited"] + 1),
        params=pick(state["params"], tracker["params"]),
        model_state=pick(state["model_state"], tracker["model_state"]),
    )
    return {**state, "early_stopping": tracker}


def tracker_update(config, sharding):
    """track(state, {"loss": .., "accuracy": ..} of the validation split, step) -> state, jitted
    (the state donated, the result placed by `sharding`)."""
    early = config.early_stopping
    sign = -1 if early.metric == "accuracy" else 1
    step_fn = jax.jit(
        functools.partial(update, min_delta=early.min_delta),
        donate_argnums=0,
        out_shardings=sharding,
    )
    return lambda state, values, step: step_fn(
        state, np.float32(sign * values[early.metric]), np.int32(step)
    )


def stopped(config, state) -> bool:
    """Whether the run's patience ran out (it stops, or has stopped, at the current step)."""
    tracker = state.get("early_stopping")
    return tracker is not None and int(tracker["waited"]) >= config.early_stopping.patience


def restore_best(state):
    """`state` with the best weights as its weights (the optimizer state stays the last one)."""
    tracker = state["early_stopping"]
    return {**state, "params": tracker["params"], "model_state": tracker["model_state"]}


def summary(config, state, stopped_step: int, last: dict) -> dict:
    """What summary.json says of early stopping; `last` holds the metrics of the last weights."""
    metric, tracker = config.early_stopping.metric, state["early_stopping"]
    best = float(tracker["best"])
    return dict(
        metric=f"validation_{metric}",
        best=(-best if metric == "accuracy" else best) if math.isfinite(best) else None,
        best_step=int(tracker["best_step"]),
        stopped_step=stopped_step,
        stopped_early=stopped(config, state),
        last=last,
    )
