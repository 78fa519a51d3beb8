"""Design spaces: trials drawn at random from a distribution per config key, kept only inside
complexity ranges (Radosavovic et al. 2019, "On network design spaces for visual recognition";
2020, "Designing network design spaces"). A study compares the error distributions of such
samples, not best points.

    space = {"model.name": Choice(["wrn16_1", "wrn22_1", "wrn28_1"]),
             "model.width_multiplier": Uniform(0.5, 4, quantum=0.25),
             "lr": LogUniform(0.01, 0.3)}
    c.trials = sample(30, space, constraints={"params": (2e5, 2e6)}, seed=0)

`sample` returns override dicts like the combinators of `scaling.sweep`, so it composes with them
(`sweep.product(sample(...), sweep.axis("seed", [0, 1]))`). Sampling is deterministic for a seed
and never returns the same trial twice. Constraints are measured on the model built shape-only
(no weights): `params` (trainable), `macs` and `flops` (2 per multiply-add) of one forward pass,
and `activations` (elements of every layer's output), each cached per distinct model, so a
thousand samples of a few dozen distinct models take seconds.
"""

import dataclasses
import functools
import json
import math

import numpy as np

from scaling import ScalingError

MEASURES = ("params", "macs", "flops", "activations")


# ---- Distributions: each draws one value from a numpy Generator ----
def _quantised(value, quantum):
    return value if quantum is None else round(round(value / quantum) * quantum, 12)


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of `values`, each as likely."""

    values: tuple

    def draw(self, rng):
        return self.values[rng.integers(len(self.values))]


@dataclasses.dataclass(frozen=True)
class Uniform:
    """Uniform on [low, high], rounded to a multiple of `quantum` when given."""

    low: float
    high: float
    quantum: float | None = None

    def draw(self, rng):
        return _quantised(float(rng.uniform(self.low, self.high)), self.quantum)


@dataclasses.dataclass(frozen=True)
class LogUniform:
    """Uniform in log on [low, high] (learning rates, widths), rounded like `Uniform`."""

    low: float
    high: float
    quantum: float | None = None

    def draw(self, rng):
        value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return _quantised(value, self.quantum)


@dataclasses.dataclass(frozen=True)
class Integer:
    """An integer in [low, high], each as likely."""

    low: int
    high: int

    def draw(self, rng):
        return int(rng.integers(self.low, self.high + 1))


@dataclasses.dataclass(frozen=True)
class PowerOfTwo:
    """2^k for 2^k in [low, high], each k as likely (batch sizes, group widths)."""

    low: int
    high: int

    def draw(self, rng):
        exponents = range(math.ceil(math.log2(self.low)), math.floor(math.log2(self.high)) + 1)
        return 2 ** rng.choice(list(exponents)).item()


# ---- Sampling ----
def sample(n, space: dict, constraints: dict | None = None, seed=0, max_draws=None) -> list:
    """`n` distinct trials (override dicts) drawn from `space` (config key -> distribution, or a
    fixed value), each inside every `constraints` range (measure -> (low, high), either end None
    for open). Raises ScalingError when `max_draws` (default 100 n) draws yield fewer."""
    constraints = constraints or {}
    if unknown := sorted(set(constraints) - set(MEASURES)):
        raise ScalingError(f"unknown constraint {unknown[0]!r}; measures: {', '.join(MEASURES)}")
    if constraints and "model.name" not in space:
        raise ScalingError("a constrained space needs a 'model.name' key to build models from")
    rng, max_draws = np.random.default_rng(seed), max_draws or 100 * n
    kept, seen = [], set()
    for _ in range(max_draws):
        if len(kept) == n:
            break
        trial = {k: d.draw(rng) if hasattr(d, "draw") else d for k, d in space.items()}
        key = json.dumps(trial, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        if within(complexity(trial), constraints) if constraints else True:
            kept.append(trial)
    if len(kept) < n:
        raise ScalingError(
            f"only {len(kept)} of {n} distinct trials met the constraints in {max_draws} draws"
        )
    return kept


def within(measured: dict, constraints: dict) -> bool:
    return all(
        (low is None or measured[k] >= low) and (high is None or measured[k] <= high)
        for k, (low, high) in constraints.items()
    )


def complexity(trial: dict) -> dict:
    """params, macs, flops and activations of the trial's model (its `model.*` keys, at its
    `image_size`, 32 when not given, and 10 classes unless `model.num_classes` says)."""
    settings = {k.split(".", 1)[1]: v for k, v in trial.items() if k.startswith("model.")}
    settings.setdefault("num_classes", 10)
    frozen = json.dumps(settings, sort_keys=True, default=str)
    return dict(_complexity(frozen, trial.get("image_size", 32)))


@functools.cache
def _complexity(frozen_settings: str, image_size: int) -> tuple:
    from scaling import flops, models  # JAX, only when constraints need a model

    settings = json.loads(frozen_settings)
    model = models.abstract(settings.pop("name"), image_size=image_size, **settings)
    macs, activations = flops.macs_and_activations(model, image_size)
    params = models.count_params(model)
    return ("params", params), ("macs", macs), ("flops", 2 * macs), ("activations", activations)
