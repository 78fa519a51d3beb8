"""Scaling laws: estimators of error against size, compute or data, each with its uncertainty,
and the check that judges them by what they are for: fit on the smaller scales, predict the
held-out larger ones (Alabdulmohsin, Neyshabur & Zhai 2022, "Revisiting neural scaling laws in
language and vision").

numpy and scipy only: a notebook, or `scaling report`, fits laws to results without JAX.

The estimators, error `err` as a function of `x` (parameters, FLOPs, examples), with x divided by
its smallest fitted value x0 while fitting, so that every parameter is in units of the smallest
scale:

- `M1`: err = beta * x^c, a plain power law;
- `M2`: err = beta * x^c + err_inf, with an irreducible error;
- `M3`: err = beta * (1/x + gamma)^c, which saturates at beta * gamma^c;
- `M4`: (err - err_inf) / (err_0 - err)^alpha = beta * x^c, which also bends at the small
  scales, where the error nears the random-guess error err_0.

Like the paper, each is fitted by least squares in log space (M4 on the log of both sides of its
equation), under its constraints (c <= 0 for M1, M2 and M4; c, gamma >= 0 for M3; 0 <= err_inf <
min(err); err_0 > max(err); alpha >= 0). `fit_power_law` is the form `scaling report` fits per
family: err = a (x + d)^-b + c, in linear space.

Uncertainty: standard errors from the Jacobian at the optimum (the residual variance times the
inverse of J'J), and a 95% interval for a prediction from the delta method in log space plus the
residual variance, with Student's t for the few degrees of freedom.
"""

import dataclasses
import math

import numpy as np
from scipy import optimize, stats

from scaling import ScalingError


# ---- M1-M4 ----
@dataclasses.dataclass(frozen=True)
class Form:
    """One estimator: its parameter names, a starting point and bounds for (x / x0, err), the
    predicted error, and the log-space residuals the fit minimises."""

    names: tuple
    start: callable
    bounds: callable
    predict: callable
    residuals: callable


def _below(err):
    return float(np.min(err)) * (1 - 1e-9)


def _m1(theta, u):
    log_beta, c = theta
    return np.exp(log_beta + c * np.log(u))


def _m2(theta, u):
    log_beta, c, err_inf = theta
    return np.exp(log_beta + c * np.log(u)) + err_inf


def _m3(theta, u):
    log_beta, c, gamma = theta
    return np.exp(log_beta + c * np.log(1 / u + gamma))


def _m4(theta, u):
    """Solve (err - err_inf) / (err_0 - err)^alpha = beta u^c for err: with w = err - err_inf
    and b = err_0 - err_inf, w / (b - w)^alpha rises from 0 to infinity on [0, b), so a
    bisection finds w."""
    log_beta, c, alpha, err_inf, err_0 = theta
    f, b = np.exp(log_beta + c * np.log(u)), err_0 - err_inf
    low, high = np.zeros_like(f), np.full_like(f, b)
    for _ in range(100):  # b / 2^100: exact in float64
        mid = (low + high) / 2
        rises = mid > f * np.maximum(b - mid, 0) ** alpha
        low, high = np.where(rises, low, mid), np.where(rises, mid, high)
    return err_inf + (low + high) / 2


def _log_gap(err, predicted):
    return np.log(predicted) - np.log(err)


FORMS = {
    "M1": Form(
        ("log_beta", "c"),
        lambda u, err: [np.log(err[0]), -0.3],
        lambda u, err: ([-np.inf, -10], [np.inf, 0]),
        _m1,
        lambda t, u, err: _log_gap(err, _m1(t, u)),
    ),
    "M2": Form(
        ("log_beta", "c", "err_inf"),
        lambda u, err: [np.log(err[0] - np.min(err) / 2), -0.3, np.min(err) / 2],
        lambda u, err: ([-np.inf, -10, 0], [np.inf, 0, _below(err)]),
        _m2,
        lambda t, u, err: t[0] + t[1] * np.log(u) - np.log(err - t[2]),
    ),
    "M3": Form(
        ("log_beta", "c", "gamma"),
        lambda u, err: [np.log(err[0]), 0.3, 0.01],
        lambda u, err: ([-np.inf, 0, 0], [np.inf, 10, np.inf]),
        _m3,
        lambda t, u, err: _log_gap(err, _m3(t, u)),
    ),
    "M4": Form(
        ("log_beta", "c", "alpha", "err_inf", "err_0"),
        lambda u, err: [np.log(err[0]), -0.3, 0.5, np.min(err) / 2, 2 * np.max(err)],
        lambda u, err: (
            [-np.inf, -10, 0, 0, np.max(err) * (1 + 1e-9)],
            [np.inf, 0, 10, _below(err), 10 * np.max(err) + 1],
        ),
        _m4,
        lambda t, u, err: (
            (t[0] + t[1] * np.log(u)) - (np.log(err - t[3]) - t[2] * np.log(t[4] - err))
        ),
    ),
}
ESTIMATORS = tuple(FORMS)


@dataclasses.dataclass
class Law:
    """A fitted estimator. `params` and `stderr` are in units of x / x0."""

    name: str
    converged: bool
    message: str = ""
    x0: float = math.nan
    params: dict = dataclasses.field(default_factory=dict)
    stderr: dict = dataclasses.field(default_factory=dict)
    covariance: np.ndarray | None = None
    residual_variance: float = math.nan
    dof: int = 0

    def _theta(self):
        return np.array([self.params[n] for n in FORMS[self.name].names])

    def predict(self, x) -> np.ndarray:
        """Predicted error at `x` (in the units the law was fitted in, not divided by x0)."""
        u = np.asarray(x, float) / self.x0
        return FORMS[self.name].predict(self._theta(), np.atleast_1d(u)).reshape(np.shape(u))

    def interval(self, x, level=0.95) -> tuple[np.ndarray, np.ndarray]:
        """A `level` interval for the error at `x`: the delta method on the log prediction (the
        curve's uncertainty) plus the residual variance, with Student's t."""
        u = np.atleast_1d(np.asarray(x, float) / self.x0)
        theta, form = self._theta(), FORMS[self.name]
        log_prediction = np.log(form.predict(theta, u))
        gradient = np.empty((len(u), len(theta)))
        for i in range(len(theta)):
            step = 1e-6 * max(1.0, abs(theta[i]))
            up, down = theta.copy(), theta.copy()
            up[i] += step
            down[i] -= step
            gradient[:, i] = (np.log(form.predict(up, u)) - np.log(form.predict(down, u))) / (
                2 * step
            )
        variance = np.einsum("ij,jk,ik->i", gradient, self.covariance, gradient)
        spread = stats.t.ppf(0.5 + level / 2, self.dof) * np.sqrt(variance + self.residual_variance)
        shape = np.shape(np.asarray(x, float))
        return (np.exp(log_prediction - spread).reshape(shape),
                np.exp(log_prediction + spread).reshape(shape))  # fmt: skip


def fit(name: str, x, err) -> Law:
    """Fit estimator `name` to points (x, err). Raises ScalingError, naming the reason, when
    the data cannot support the fit; a fit that fails to converge or leaves a parameter
    undetermined comes back with converged=False and the reason."""
    if name not in FORMS:
        raise ScalingError(f"unknown estimator {name!r}; estimators: {', '.join(FORMS)}")
    form = FORMS[name]
    x, err = np.asarray(x, float).ravel(), np.asarray(err, float).ravel()
    if len(x) != len(err):
        raise ScalingError(f"{len(x)} sizes but {len(err)} errors")
    if not (np.all(np.isfinite(x)) and np.all(x > 0)):
        raise ScalingError("sizes must be positive and finite")
    if not (np.all(np.isfinite(err)) and np.all(err > 0)):
        raise ScalingError("errors must be positive and finite (error rates or losses)")
    order = np.argsort(x, kind="stable")
    x, err = x[order], err[order]
    distinct, needed = len(np.unique(x)), len(form.names) + 1
    if distinct < needed:
        raise ScalingError(
            f"{name} has {len(form.names)} parameters: it needs {needed} or more distinct sizes "
            f"to fit with an uncertainty, got {distinct}"
        )
    x0 = float(x[0])
    u = x / x0
    low, high = form.bounds(u, err)
    start = np.clip(form.start(u, err), np.add(low, 1e-12), np.subtract(high, 1e-12))
    try:
        result = optimize.least_squares(
            form.residuals, start, bounds=(low, high), args=(u, err), x_scale="jac",
            max_nfev=20_000,
        )  # fmt: skip
    except (ValueError, FloatingPointError) as error:
        return Law(name, False, f"did not converge: {error}", x0)
    dof = len(x) - len(form.names)
    variance = 2 * result.cost / dof
    jtj = result.jac.T @ result.jac
    with np.errstate(all="ignore"):
        covariance = np.linalg.pinv(jtj) * variance
    stderr = np.sqrt(np.abs(np.diag(covariance)))
    law = Law(
        name, bool(result.success), "" if result.success else result.message, x0,
        dict(zip(form.names, map(float, result.x), strict=True)),
        dict(zip(form.names, map(float, stderr), strict=True)), covariance, float(variance), dof,
    )  # fmt: skip
    if law.converged and (
        not np.all(np.isfinite(stderr)) or np.linalg.matrix_rank(jtj) < len(form.names)
    ):
        law.converged, law.message = False, "parameters not identifiable"
    return law


# ---- Extrapolation: the check that judges a law ----
def extrapolate(x, err, holdout: int, estimators=ESTIMATORS) -> dict:
    """Hold out the points at the `holdout` largest distinct sizes, fit each estimator on the
    rest, and score its predictions of the held-out points by log-RMSE (the root mean square
    of log(predicted / measured)). Returns dict(held_out=[...sizes], results=[per estimator:
    name, law (None when refused), reason, log_rmse, predictions], best=name or None)."""
    x, err = np.asarray(x, float).ravel(), np.asarray(err, float).ravel()
    sizes = np.unique(x)
    if not 1 <= holdout < len(sizes):
        raise ScalingError(
            f"cannot hold out {holdout} of {len(sizes)} distinct sizes: at least one must stay"
        )
    held_sizes = sizes[-holdout:]
    held = np.isin(x, held_sizes)
    results = []
    for name in estimators:
        entry = dict(name=name, law=None, reason="", log_rmse=math.nan, predictions=None)
        try:
            law = fit(name, x[~held], err[~held])
        except ScalingError as refusal:
            entry["reason"] = str(refusal)
        else:
            entry["law"] = law
            if not law.converged:
                entry["reason"] = law.message
            else:
                predictions = law.predict(x[held])
                entry["predictions"] = predictions
                entry["log_rmse"] = float(np.sqrt(np.mean(np.log(predictions / err[held]) ** 2)))
        results.append(entry)
    scored = [r for r in results if np.isfinite(r["log_rmse"])]
    best = min(scored, key=lambda r: r["log_rmse"])["name"] if scored else None
    return dict(held_out=[float(s) for s in held_sizes], results=results, best=best)


# ---- Shape-optimal scaling: how the best value of one dimension grows with compute ----
def optimum(x, err) -> float:
    """The `x` of least error along one shape dimension: the vertex of a parabola through the
    best point and its two neighbours in log x, or the best measured x itself when it lies at
    an end of the range (the optimum is then outside what was tried, and not extrapolated)."""
    x, err = np.asarray(x, float), np.asarray(err, float)
    order = np.argsort(x)
    x, err = x[order], err[order]
    best = int(np.argmin(err))
    if best in (0, len(x) - 1):
        return float(x[best])
    u = np.log(x[best - 1 : best + 2])
    a, b, _ = np.polyfit(u, err[best - 1 : best + 2], 2)
    return float(np.exp(-b / (2 * a))) if a > 0 else float(x[best])


def growth_exponent(compute, optima) -> tuple[float, float]:
    """(s, its standard error) of optimum = k * compute**s, by least squares in log-log (the
    exponents of Alabdulmohsin et al. 2023, "Getting ViT in shape"). Three or more compute
    budgets are needed for an uncertainty."""
    u, v = np.log(np.asarray(compute, float)), np.log(np.asarray(optima, float))
    if len(np.unique(u)) < 3:
        raise ScalingError(f"a growth exponent needs 3 or more compute budgets, got {len(u)}")
    (slope, intercept), residual, *_ = np.polyfit(u, v, 1, full=True)
    variance = (residual[0] if residual.size else 0.0) / (len(u) - 2)
    return float(slope), float(np.sqrt(variance / np.sum((u - u.mean()) ** 2)))


# ---- The saturating power law of `scaling report` ----
@dataclasses.dataclass
class Fit:
    """err = a * (x / x0 + d) ** -b + c, fitted to points (x, err). With x0 = min(x), `a` is the
    reducible error at the smallest x and `d` is in units of x0; in the unscaled form
    err = A * (x + D) ** -b + c, A = a * x0 ** b and D = d * x0."""

    converged: bool
    message: str = ""
    x0: float = float("nan")
    params: dict = dataclasses.field(default_factory=dict)
    stderr: dict = dataclasses.field(default_factory=dict)
    residuals: list = dataclasses.field(default_factory=list)

    def __call__(self, x):
        p = self.params
        return p["a"] * (np.asarray(x, float) / self.x0 + p["d"]) ** -p["b"] + p["c"]


def power_law(u, a, b, c, d=0.0):
    return a * (u + d) ** -b + c


def fit_power_law(x, err) -> Fit:
    """Fit the saturating power law. Fewer than 4 distinct x values are refused; with 6 or more
    `d` is fitted too, and if that fit fails, fitted again with d = 0. Non-convergence, an
    unidentifiable parameter, error that does not fall with x, or an exponent smaller than its
    standard error give converged=False and the reason."""
    x, err = np.asarray(x, float), np.asarray(err, float)
    distinct = len(np.unique(x))
    if distinct < 4:
        return Fit(False, f"needs 4 or more distinct x values, has {distinct}")
    for free_d in [True, False] if distinct >= 6 else [False]:
        fit = fit_once(x, err, free_d)
        if fit.converged:
            break
    return fit


def fit_once(x, err, free_d) -> Fit:
    x0, names = x.min(), "abcd" if free_d else "abc"
    guess = [max(err.max() - err.min(), 1e-3), 0.5, err.min() / 2] + [0.0] * free_d
    bounds = ([0, 0, 0] + [0] * free_d, [10, 5, 1] + [10] * free_d)
    try:
        popt, pcov = optimize.curve_fit(
            power_law, x / x0, err, p0=guess, bounds=bounds, maxfev=20000
        )
    except (RuntimeError, ValueError) as e:
        return Fit(False, f"did not converge: {str(e).splitlines()[0]}", x0)
    stderr = np.sqrt(np.diag(pcov))
    params = dict(zip(names, map(float, popt), strict=True)) | ({} if free_d else {"d": 0.0})
    fit = Fit(True, "", float(x0), params, dict(zip(names, map(float, stderr), strict=True)))
    fit.residuals = [float(r) for r in err - fit(x)]
    if not np.all(np.isfinite(stderr)):
        return dataclasses.replace(fit, converged=False, message="parameters not identifiable")
    if popt[0] < 1e-6 or popt[1] < 1e-3:
        return dataclasses.replace(fit, converged=False, message="error does not fall with x")
    if stderr[1] > popt[1]:
        message = f"exponent undetermined (b = {popt[1]:.2g} ± {stderr[1]:.2g})"
        return dataclasses.replace(fit, converged=False, message=message)
    return fit
