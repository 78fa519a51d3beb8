"""Design-space sampling: every distribution stays in its range, samples are distinct and the same
for a seed, and every kept trial lies inside its complexity constraints."""

import numpy as np
import pytest

from scaling import ScalingError, models, sweep
from scaling.space import Choice, Integer, LogUniform, PowerOfTwo, Uniform, complexity, sample

WRN = {
    "model.name": Choice(("wrn10_1", "wrn16_1", "wrn22_1")),
    "model.width_multiplier": Uniform(0.5, 3, quantum=0.5),
}


def test_each_distribution_draws_inside_its_range():
    rng = np.random.default_rng(0)
    draws = {name: [d.draw(rng) for _ in range(500)] for name, d in {
        "choice": Choice(("a", "b", "c")), "uniform": Uniform(0.5, 3, quantum=0.25),
        "log": LogUniform(1e-3, 1e-1), "integer": Integer(2, 5), "pow2": PowerOfTwo(16, 256),
    }.items()}  # fmt: skip
    assert set(draws["choice"]) == {"a", "b", "c"}
    assert set(draws["uniform"]) <= {0.5 + 0.25 * i for i in range(11)}
    assert len(set(draws["uniform"])) > 5
    logs = np.log10(draws["log"])
    assert logs.min() >= -3 and logs.max() <= -1 and abs(np.median(logs) + 2) < 0.15
    assert set(draws["integer"]) == {2, 3, 4, 5}
    assert set(draws["pow2"]) == {16, 32, 64, 128, 256}


def test_samples_are_distinct_and_the_same_for_a_seed():
    space = {"lr": Choice((0.1, 0.3)), "seed": Integer(0, 4), "image_size": 32}
    trials = sample(10, space, seed=3)  # all 10 combinations there are
    assert len({tuple(t.items()) for t in trials}) == 10 and trials == sample(10, space, seed=3)
    assert trials != sample(10, space, seed=4) and all(t["image_size"] == 32 for t in trials)
    with pytest.raises(ScalingError, match="only 10 of 11 distinct trials"):
        sample(11, space, seed=3)
    grid = sweep.product(trials[:2], sweep.axis("weight_decay", [0.0, 5e-4]))  # composes
    assert len(grid) == 4 and grid[1] == {**trials[0], "weight_decay": 5e-4}


def test_constrained_samples_lie_inside_the_ranges():
    low, high = 1e5, 6e5
    trials = sample(5, WRN, constraints={"params": (low, high)}, seed=0)
    for t in trials:  # measured again, independently of the sampler's cache
        model = models.abstract(
            t["model.name"], width_multiplier=t["model.width_multiplier"], num_classes=10
        )
        assert low <= models.count_params(model) <= high, t
    outside = [t for t in sample(18, WRN, seed=0) if not low <= complexity(t)["params"] <= high]
    assert outside  # the constraint binds: the unconstrained space holds trials outside it
    wrn16 = complexity({"model.name": "wrn16_1"})
    assert wrn16["flops"] == 2 * wrn16["macs"] and wrn16["activations"] > 0


def test_bad_constraints_say_why():
    with pytest.raises(ScalingError, match="unknown constraint 'latency'"):
        sample(2, WRN, constraints={"latency": (0, 1)})
    with pytest.raises(ScalingError, match="needs a 'model.name'"):
        sample(2, {"lr": Uniform(0.1, 1)}, constraints={"params": (0, 1)})
    with pytest.raises(ScalingError, match="only 0 of 2 distinct trials"):
        sample(2, WRN, constraints={"params": (None, 10)}, max_draws=20)
