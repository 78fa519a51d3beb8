"""Early stopping: the decision on a crafted metric sequence, the best weights restored, the
validation split carved from training, resume bit-identical, bad settings refused."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from scaling import ScalingError, data
from scaling import early_stopping as early
from scaling.rundir import read_metrics
from scaling.train import train


def tracked(patience, min_delta, metric):
    config = ml_collections.ConfigDict(
        dict(early_stopping=dict(patience=patience, min_delta=min_delta, metric=metric))
    )
    state = dict(params={"w": jnp.zeros(())}, model_state={"count": jnp.zeros((), jnp.int32)})
    state["early_stopping"] = early.initial_tracker(state)
    return config, state


def run_sequence(values, *, patience, min_delta=0.0, metric="loss"):
    """Feed `values` (one per evaluation, at steps 10, 20, ...) with weights that name their step;
    (the step it stops at or None, the state at that point)."""
    config, state = tracked(patience, min_delta, metric)
    track = early.tracker_update(config, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    for i, value in enumerate(values):
        step = 10 * (i + 1)
        state = dict(state, params={"w": jnp.float32(step)},
                     model_state={"count": jnp.int32(step)})  # fmt: skip
        state = track(state, {metric: value, "other": np.nan}, step)
        if early.stopped(config, state):
            return step, state
    return None, state


def test_stops_after_patience_evaluations_without_improvement():
    # Best at the 3rd evaluation (step 30); 0.41 and 0.45 do not beat 0.4; patience 2 ends at 50.
    stop, state = run_sequence([1.0, 0.7, 0.4, 0.41, 0.45, 0.1], patience=2)
    assert stop == 50
    assert int(state["early_stopping"]["best_step"]) == 30
    best = early.restore_best(state)
    assert float(best["params"]["w"]) == 30 and int(best["model_state"]["count"]) == 30


def test_min_delta_and_accuracy_direction():
    # Accuracy rises: 0.55 beats 0.5 by less than min_delta 0.1, so it is no improvement.
    stop, state = run_sequence([0.5, 0.55, 0.58, 0.9], patience=3, min_delta=0.1,
                               metric="accuracy")  # fmt: skip
    assert stop is None  # the improvement came at the 4th evaluation, within patience
    assert int(state["early_stopping"]["best_step"]) == 40
    assert int(state["early_stopping"]["waited"]) == 0
    stop, state = run_sequence([0.5, 0.55, 0.58, 0.59], patience=3, min_delta=0.1,
                               metric="accuracy")  # fmt: skip
    assert stop == 40 and int(state["early_stopping"]["best_step"]) == 10


def test_validation_is_carved_from_training_stratified():
    ds = data.load("digits", 8)
    rest, validation = early.carve_validation(ds, 0.1)
    n = len(ds.train_labels)
    assert len(rest.train_labels) + len(validation) == n and len(validation) == round(0.1 * n)
    np.testing.assert_array_equal(validation.labels, ds.train_labels[len(rest.train_labels) :])
    np.testing.assert_array_equal(validation[0][0], ds.train_images[len(rest.train_labels)])
    shares = np.bincount(validation.labels, minlength=10) / len(validation)
    overall = np.bincount(ds.train_labels, minlength=10) / n
    assert np.all(np.abs(shares * len(validation) - overall * len(validation)) <= 1.0)
    assert len(rest.test_labels) == len(ds.test_labels)  # the test split is untouched


def stopping_config(tiny_config, **overrides):
    config = tiny_config(lr=0.3, eval_every=4, **overrides)  # a high rate, so it overshoots
    config.num_steps = 40
    config.early_stopping.patience = 2
    config.early_stopping.every = 4
    config.early_stopping.metric = "accuracy"
    return config


def test_a_run_stops_and_reports_the_best_weights(tmp_path, tiny_config):
    summary = train(stopping_config(tiny_config), tmp_path / "run")
    stopping = summary["early_stopping"]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    validation = {r["step"]: r["validation_accuracy"] for r in records if "validation_loss" in r}
    tested = {}  # the first test record of each step: the final one (best weights) comes last
    for r in records:
        if "test_accuracy" in r:
            tested.setdefault(r["step"], r["test_accuracy"])
    best_step, stopped = stopping["best_step"], stopping["stopped_step"]
    assert stopping["stopped_early"] and stopped < 40 and summary["examples_seen"] == stopped * 64
    assert max(validation, key=lambda s: (validation[s], -s)) == best_step  # first of the best
    assert stopped == max(validation) and stopped - best_step == 2 * 4  # patience 2, every 4
    assert stopping["best"] == pytest.approx(validation[best_step], rel=1e-6)
    # The summary's test accuracy is the best weights' (the test record of that step), the last
    # weights' goes beside it.
    assert summary["test_accuracy"] == tested[best_step]
    assert stopping["last"]["test_accuracy"] == tested[stopped]
    # Finished: running it again returns the summary and trains no more.
    assert train(stopping_config(tiny_config), tmp_path / "run") == summary


def test_resume_with_early_stopping_is_bit_identical(tmp_path, tiny_config):
    whole = train(stopping_config(tiny_config), tmp_path / "whole")
    assert train(stopping_config(tiny_config), tmp_path / "split", stop_after=9) is None
    resumed = train(stopping_config(tiny_config), tmp_path / "split")
    for key in ("train_loss", "test_loss", "test_accuracy", "early_stopping", "examples_seen"):
        assert resumed[key] == whole[key], key


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(every=0), "early_stopping.every"),
        (dict(metric="error"), "early_stopping.metric"),
        (dict(validation_fraction=1.0), "validation_fraction"),
        (dict(patience=-1), "early_stopping.patience"),
    ],
)
def test_bad_settings_are_refused_before_any_write(tmp_path, tiny_config, change, message):
    config = stopping_config(tiny_config)
    config.early_stopping.update(change)
    with pytest.raises(ScalingError, match=message):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
