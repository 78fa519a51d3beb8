"""Populations of trials, as design-space studies read them (Radosavovic et al. 2019, 2020;
Dollar, Singh & Girshick 2021): distributions rather than best points.

- `edf`: the empirical distribution function of errors, F(e) = fraction of trials with error
  below e; one curve per design space or strategy compares whole populations.
- `good_range`: a bootstrap interval of a hyperparameter's best values: draw a quarter of the
  trials with replacement, keep the value of the best one, repeat; the central 95% of those
  values is where good trials live.
- `time_correlations`: how well FLOPs, and activations, predict the time a step takes on the
  machine that ran the trials (Pearson r of the logs).
- `verdicts`: at each budget, which strategy (or axis) has the lowest mean error, by how much,
  and whether that margin exceeds the seeds' spread.

pandas and numpy only, like `scaling.laws`.
"""

import numpy as np
import pandas as pd

from scaling import ScalingError


def edf(errors) -> tuple[np.ndarray, np.ndarray]:
    """(sorted errors, F) with F[i] = (i + 1) / n: the fraction of trials with error <= e[i]."""
    e = np.sort(np.asarray(errors, float))
    if e.size == 0:
        raise ScalingError("an EDF needs at least one error")
    return e, np.arange(1, e.size + 1) / e.size


def good_range(values, errors, fraction=0.25, draws=10_000, level=0.95, seed=0) -> tuple:
    """The central `level` interval of the hyperparameter value of the best trial in `draws`
    bootstrap samples of ceil(fraction * n) trials drawn with replacement."""
    values, errors = np.asarray(values, float), np.asarray(errors, float)
    if values.size != errors.size or values.size < 2:
        raise ScalingError("a good range needs two or more trials, each with a value and error")
    size = int(np.ceil(fraction * values.size))
    rng = np.random.default_rng(seed)
    picks = rng.integers(values.size, size=(draws, size))
    best = values[picks[np.arange(draws), np.argmin(errors[picks], axis=1)]]
    tail = (1 - level) / 2
    # Values of the trials themselves ("lower"/"higher"), never a value between two of them.
    return (float(np.quantile(best, tail, method="lower")),
            float(np.quantile(best, 1 - tail, method="higher")))  # fmt: skip


def good_ranges(done: pd.DataFrame, columns) -> pd.DataFrame:
    """`good_range` of each numeric column of `columns` that varies, with the span it had."""
    rows = []
    for column in columns:
        values = pd.to_numeric(done[column], errors="coerce")
        kept = values.notna()
        if values[kept].nunique() < 3:
            continue
        low, high = good_range(values[kept], done.test_error[kept])
        rows.append(dict(setting=column, trials=int(kept.sum()), tried=f"{values.min():.4g} - "
                         f"{values.max():.4g}", good=f"{low:.4g} - {high:.4g}"))  # fmt: skip
    return pd.DataFrame(rows)


def time_correlations(done: pd.DataFrame) -> pd.DataFrame:
    """Pearson r between log seconds per training image and log FLOPs, and log activations,
    over the finished trials."""
    seconds = np.log(1 / done.images_per_second.astype(float))
    rows = []
    for measure in ("flops", "activations"):
        x = np.log(done[measure].astype(float))
        r = float(np.corrcoef(x, seconds)[0, 1]) if len(done) > 2 else float("nan")
        rows.append(dict(measure=measure, trials=len(done), pearson_r=r))
    return pd.DataFrame(rows)


def verdicts(done: pd.DataFrame, by="strategy", budget="budget") -> pd.DataFrame:
    """Per budget: each `by` group's mean error ± std over seeds, the winner (lowest mean), its
    margin over the runner-up, and whether that margin is larger than the two groups' larger
    seed std (else the budget has no clear winner)."""
    rows = []
    names = sorted(done[by].dropna().unique(), key=str)
    for level, trials in done.groupby(budget):
        stats = trials.groupby(by).test_error.agg(["mean", "std", "count"]).sort_values("mean")
        row = {budget: level}
        row |= {name: f"{s['mean']:.4f} ± {s['std']:.4f}" for name, s in stats.iterrows()}
        row["winner"] = stats.index[0]
        if len(stats) > 1:
            margin = stats["mean"].iloc[1] - stats["mean"].iloc[0]
            spread = stats["std"].iloc[:2].max()
            row["margin"] = f"{margin:.4f}"
            row["clear"] = "yes" if margin > spread else "no"
        rows.append(row)
    columns = [budget, *names, "winner", "margin", "clear"]
    return pd.DataFrame(rows).reindex(columns=columns).fillna("")
