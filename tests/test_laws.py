"""Scaling-law estimators: each recovers the curve it generates, within its stated uncertainty,
and predicts beyond it; the held-out check never fits on a held-out point."""

import subprocess
import sys

import numpy as np
import pytest

from scaling import ScalingError, laws

# Parameters in units of x / x0, with x0 = 1e3 the smallest size.
TRUTH = {
    "M1": dict(log_beta=np.log(0.6), c=-0.25),
    "M2": dict(log_beta=np.log(0.5), c=-0.4, err_inf=0.05),
    "M3": dict(log_beta=np.log(0.8), c=0.3, gamma=0.02),
    "M4": dict(log_beta=np.log(0.7), c=-0.45, alpha=0.6, err_inf=0.04, err_0=0.9),
}
SIZES = np.geomspace(1e3, 1e6, 14)


def curve(name, x):
    law = laws.Law(name, True, x0=1e3, params=TRUTH[name])
    return law.predict(x)


@pytest.mark.parametrize("name", laws.ESTIMATORS)
def test_each_estimator_recovers_its_curve_and_extrapolates(name):
    noise = np.exp(np.random.default_rng(0).normal(0, 0.01, (2, len(SIZES))))
    x, err = np.tile(SIZES, 2), (curve(name, SIZES) * noise).ravel()  # two seeds a size
    law = laws.fit(name, x, err)
    assert law.converged, law.message
    for key, true in TRUTH[name].items():
        assert abs(law.params[key] - true) <= 4 * law.stderr[key] + 1e-9, (key, law.params)
    far = np.array([3e6, 1e7])  # 3x and 10x the largest size fitted
    low, high = law.interval(far)
    assert np.all((low <= curve(name, far)) & (curve(name, far) <= high)), (low, high)
    np.testing.assert_allclose(law.predict(far), curve(name, far), rtol=0.05)


def test_m4_bends_towards_the_random_guess_error_at_small_sizes():
    small = curve("M4", np.array([1e-3, 1.0]))
    assert small[0] < TRUTH["M4"]["err_0"] and small[0] > 0.8  # near err_0, below it
    assert small[1] < small[0]


def test_the_held_out_points_never_reach_a_fit():
    err = curve("M2", SIZES)
    wild = err.copy()
    wild[-3:] = [0.9, 0.01, 0.5]  # any values at the three largest sizes
    check, again = laws.extrapolate(SIZES, err, 3), laws.extrapolate(SIZES, wild, 3)
    assert check["held_out"] == list(SIZES[-3:])
    for a, b in zip(check["results"], again["results"], strict=True):
        assert a["law"].params == b["law"].params  # fitted on the same 11 points only
        reference = laws.fit(a["name"], SIZES[:-3], err[:-3])
        assert a["law"].params == reference.params
    scores = {r["name"]: r["log_rmse"] for r in check["results"]}
    assert check["best"] == min(scores, key=scores.get)
    assert scores["M2"] < 1e-3  # the generating form predicts its own curve


def test_refusals_say_why():
    with pytest.raises(ScalingError, match="M4 has 5 parameters: it needs 6 or more distinct"):
        laws.fit("M4", SIZES[:5], curve("M4", SIZES[:5]))
    with pytest.raises(ScalingError, match="errors must be positive"):
        laws.fit("M1", SIZES[:3], [0.5, 0.0, 0.3])
    with pytest.raises(ScalingError, match="unknown estimator 'M9'"):
        laws.fit("M9", SIZES, curve("M1", SIZES))
    with pytest.raises(ScalingError, match="cannot hold out 14 of 14"):
        laws.extrapolate(SIZES, curve("M1", SIZES), 14)
    check = laws.extrapolate(SIZES[:6], curve("M1", SIZES[:6]), 2)  # 4 sizes left to fit on
    reasons = {r["name"]: r["reason"] for r in check["results"]}
    assert reasons["M1"] == "" and "needs 6 or more" in reasons["M4"]


def test_importing_the_laws_starts_neither_jax_nor_matplotlib():
    code = "import sys, scaling.laws; print(sorted({'jax', 'matplotlib'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_optimal_shape_and_its_growth_exponent_are_recovered():
    """Error least at x* = 3 * C^0.4 along one dimension, for four compute budgets C: the
    parabola in log x finds each x*, the log-log fit finds 0.4; noise widens its error bar."""
    budgets = np.array([1e3, 1e4, 1e5, 1e6])
    best = 3 * budgets**0.4
    grid = np.geomspace(10, 1e4, 13)
    optima = [laws.optimum(grid, (np.log(grid / b)) ** 2 + 0.1) for b in best]
    np.testing.assert_allclose(optima, best, rtol=1e-9)
    exponent, stderr = laws.growth_exponent(budgets, optima)
    assert exponent == pytest.approx(0.4) and stderr < 1e-9
    noisy = best * np.exp(np.random.default_rng(0).normal(0, 0.1, 4))
    exponent, stderr = laws.growth_exponent(budgets, noisy)
    assert 0.002 < stderr < 0.1 and abs(exponent - 0.4) < 3 * stderr
    # An optimum at the end of what was tried is that end, not an extrapolation.
    assert laws.optimum(grid, -np.log(grid)) == grid[-1]
    with pytest.raises(ScalingError, match="3 or more compute budgets"):
        laws.growth_exponent(budgets[:2], best[:2])
