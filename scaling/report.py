"""`scaling report DIR...`: a sweep's answer as REPORT.md, PNG figures and runs.csv.

Each figure is drawn only where the trials have the axes for it (a width x depth grid, several
families, several training-set sizes, ...), so one command serves every study, finished or not.
Scaling laws are saturating power laws (`scaling.laws`); a fit that fails says so.
"""

import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on TPU VMs or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from scaling import ScalingError, laws, population, results, rundir  # noqa: E402
from scaling.laws import Fit, fit_power_law  # noqa: E402

DPI = 100
SIZES = {  # inches; figures are DPI times these in pixels
    "heatmap": (11, 4.5),
    "pareto": (19, 4.5),
    "edf": (7, 4.5),
    "data_efficiency": (7, 4.5),
    "generalization": (7, 4.5),
    "curves": (7, 4.5),
}
TABLE_HEADINGS = {
    "mflops": "MFLOP/image (XLA, forward)", "train_acc": "train acc", "test_acc": "test acc",
    "test_acc_std": "± std", "gap": "train-test gap", "wall_s": "wall s", "img_per_s": "images/s",
}  # fmt: skip
RUN_FILES = ("config.json", "summary.json", "metrics.jsonl")  # what a results copy keeps


# ---- Scaling-law fits ----
def fits(done: pd.DataFrame) -> list[dict]:
    """Test-error power laws per group (`fit_groups`)."""
    return [
        dict(group=group, x=x, n=len(rows), fit=fit_power_law(rows[x], rows.test_error))
        for x, group, rows in results.fit_groups(done)
    ]


def extrapolation_table(done: pd.DataFrame, holdout: int) -> str:
    """Each estimator of `scaling.laws` fitted per group without its `holdout` largest sizes,
    scored by the log-RMSE of its predictions of them; the best named, with what it predicted."""
    rows = []
    for x, group, points in results.fit_groups(done):
        if points[x].nunique() <= holdout:
            rows.append(dict(group=group, x=x, best=f"refused: {points[x].nunique()} sizes"))
            continue
        check = laws.extrapolate(points[x], points.test_error, holdout)
        row = dict(group=group, x=x, held_out=", ".join(f"{v:.3g}" for v in check["held_out"]))
        for r in check["results"]:
            row[r["name"]] = f"{r['log_rmse']:.3f}" if r["reason"] == "" else "no fit"
        row["best"] = check["best"] or "none"
        if check["best"]:
            held = points[points[x].isin(check["held_out"])]
            law = next(r["law"] for r in check["results"] if r["name"] == check["best"])
            row["predicted"] = f"{law.predict(held[x]).mean():.4f}"
            row["measured"] = f"{held.test_error.mean():.4f}"
        rows.append(row)
    if not rows:
        return "No axis varies enough to fit."
    reasons = "'no fit': the estimator was refused or did not converge on the points kept."
    return markdown_table(pd.DataFrame(rows).fillna("")) + "\n\n" + reasons


# ---- Tables ----
def pareto_front(points: pd.DataFrame, x: str, y: str = "test_accuracy") -> pd.DataFrame:
    """The points no other point beats on both lower `x` and higher `y`, sorted by `x`."""
    ordered = points.sort_values([x, y], ascending=[True, False])
    best, keep = -np.inf, []
    for i, value in ordered[y].items():
        if value > best:
            keep.append(i)
            best = value
    return ordered.loc[keep]


def summary_table(done: pd.DataFrame) -> pd.DataFrame:
    """Means (and the test accuracy's std) over seeds, one row per setting of the axes. Trials
    that differ in anything but the seed are never averaged: if the axes shown do not tell two
    settings apart, the setting's name is shown too."""
    keys = results.axes_of(done)
    show_setting = done.groupby(keys, dropna=False).setting.nunique().max() > 1
    grouped = done.groupby([*keys, "setting"], dropna=False)
    table = grouped.agg(
        seeds=("test_accuracy", "count"), params=("params", "first"), mflops=("flops", "first"),
        train_acc=("train_accuracy", "mean"), test_acc=("test_accuracy", "mean"),
        test_acc_std=("test_accuracy", "std"), gap=("generalization_gap", "mean"),
        wall_s=("wall_seconds", "mean"), img_per_s=("images_per_second", "mean"),
    )  # fmt: skip
    table["mflops"] /= 1e6
    table["params"] = table["params"].astype(int)
    table = table.reset_index()
    if not show_setting:
        table = table.drop(columns="setting")
    return table.rename(columns=TABLE_HEADINGS)


# ---- Figures ----
def figure(name):
    return plt.subplots(1, {"heatmap": 2, "pareto": 4}.get(name, 1), figsize=SIZES[name], dpi=DPI)


MAX_LEGEND = 16  # more names than this would cover the plot; runs.csv names every variant


def legend(ax, entries: int, **style):
    if entries <= MAX_LEGEND:
        ax.legend(**style)
    else:
        ax.text(0.99, 0.01, f"{entries} variants, unlabelled (see runs.csv)", fontsize=8,
                ha="right", va="bottom", transform=ax.transAxes)  # fmt: skip


def save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=DPI)
    plt.close(fig)
    return f"{name}.png"


def heatmap(done, out):
    if not {"depth", "width"} <= set(done) or done.depth.nunique() < 2 or done.width.nunique() < 2:
        return None
    fig, axes = figure("heatmap")
    grid = done.groupby(["depth", "width"]).agg(
        acc=("test_accuracy", "mean"), flops=("flops", "first")
    )
    grid["per_gflop"] = grid.acc / (grid.flops / 1e9)
    for ax, column, title in zip(
        axes, ["acc", "per_gflop"], ["test accuracy", "test accuracy per GFLOP"], strict=True
    ):
        table = grid[column].unstack("width")
        image = ax.imshow(table.values, cmap="viridis", origin="lower", aspect="auto")
        for (i, j), value in np.ndenumerate(table.values):
            ax.text(j, i, f"{value:.3g}", ha="center", va="center", color="w", fontsize=9)
        ax.set(xticks=range(table.shape[1]), xticklabels=table.columns, yticks=range(len(table)),
               yticklabels=table.index, xlabel="widening factor k", ylabel="depth d")  # fmt: skip
        ax.set_title(title)
        fig.colorbar(image, ax=ax)
    return save(fig, out, "heatmap")


def pareto(done, out, fitted):
    fig, axes = figure("pareto")
    for ax, x, label in zip(
        axes,
        ["params", "flops", "activations", "wall_seconds"],
        ["parameters", "FLOP/image (XLA, forward)", "activations/image", "wall seconds per trial"],
        strict=True,
    ):
        # A baseline without parameters or FLOPs (k-NN) has no place on a log axis: a line.
        for arch, rows in done[~(done[x] > 0)].groupby("arch"):
            level = rows.test_accuracy.mean()
            ax.axhline(level, ls=":", lw=1, color="grey")
            ax.annotate(f"{arch} (baseline)", (0.01, level), xycoords=("axes fraction", "data"),
                        fontsize=6, xytext=(0, 2), textcoords="offset points")  # fmt: skip
        for family, rows in done[done[x] > 0].groupby("family"):
            points = ax.scatter(rows[x], rows.test_accuracy, s=18, alpha=0.6, label=family)
            front = pareto_front(rows, x)
            ax.step(front[x], front.test_accuracy, where="post", color=points.get_facecolor()[0])
            law = next((f for f in fitted if f["x"] == x and f["group"] == str(family)), None)
            if law and law["fit"].converged:
                grid = np.geomspace(rows[x].min(), rows[x].max(), 100)
                ax.plot(grid, 1 - law["fit"](grid), "--", color=points.get_facecolor()[0])
        if done.variant.nunique() <= 16:  # name each architecture at its mean over seeds
            means = done[done[x] > 0].groupby("variant")[[x, "test_accuracy"]].mean()
            for arch, mean in means.iterrows():
                ax.annotate(arch, (mean[x], mean.test_accuracy), fontsize=6, alpha=0.8,
                            xytext=(3, -8), textcoords="offset points")  # fmt: skip
        ax.set(xscale="log", xlabel=label, ylabel="test accuracy")
    axes[0].legend(fontsize=8)
    axes[0].set_title("points; step line: Pareto front; dashed: fitted law", fontsize=9)
    return save(fig, out, "pareto")


def data_efficiency(done, out, fitted):
    if "train_examples" not in done or done.train_examples.nunique() < 2:
        return None
    fig, ax = figure("data_efficiency")
    for arch, rows in done.groupby("variant"):
        stats = rows.groupby("train_examples").test_accuracy.agg(["mean", "std"]).fillna(0)
        line = ax.errorbar(
            stats.index, stats["mean"], yerr=stats["std"], marker="o", capsize=3, label=arch
        )
        law = next(
            (f for f in fitted if f["x"] == "train_examples" and f["group"] == str(arch)), None
        )
        if law and law["fit"].converged:
            grid = np.geomspace(stats.index.min(), stats.index.max(), 100)
            ax.plot(grid, 1 - law["fit"](grid), "--", color=line.lines[0].get_color())
    ax.set(xscale="log", xlabel="training examples", ylabel="test accuracy (mean ± std over seeds)")
    ax.legend(fontsize=8)
    return save(fig, out, "data_efficiency")


def generalization(done, out):
    if done.variant.nunique() < 2:
        return None
    fig, ax = figure("generalization")
    for arch, rows in done.groupby("variant"):
        stats = rows.groupby("train_examples")[["train_accuracy", "generalization_gap"]].agg(
            ["mean", "std"]
        )
        stats = stats.fillna(0)
        ax.errorbar(stats["train_accuracy"]["mean"], stats["generalization_gap"]["mean"],
                    xerr=stats["train_accuracy"]["std"], yerr=stats["generalization_gap"]["std"],
                    marker="o", ls="", capsize=3, label=arch)  # fmt: skip
        for n, point in stats.iterrows():
            xy = point["train_accuracy"]["mean"], point["generalization_gap"]["mean"]
            ax.annotate(f"{n:,}", xy, fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="training accuracy (capacity)", ylabel="train - test accuracy (gap)",
           title="labels: training examples")  # fmt: skip
    legend(ax, done.variant.nunique(), fontsize=8)
    return save(fig, out, "generalization")


def population_column(done):
    """What tells populations apart: a study's `strategy` labels, else the family."""
    return "strategy" if "strategy" in done and done.strategy.notna().any() else "family"


def edf_figure(done, out):
    by = population_column(done)
    groups = [(name, rows) for name, rows in done.groupby(by) if len(rows) >= 3]
    if not any(len(rows) >= 5 for _, rows in groups):
        return None
    fig, ax = figure("edf")
    for name, rows in groups:
        errors, cumulative = population.edf(rows.test_error)
        ax.step(errors, cumulative, where="post", label=f"{name} (n={len(rows)})")
    ax.set(xlabel="test error", ylabel="fraction of trials with lower error (EDF)")
    ax.legend(fontsize=8)
    return save(fig, out, "edf")


def population_sections(done) -> list[str]:
    """The populations' analysis: good ranges of the largest population's settings, training
    time against FLOPs and activations, and each budget's winning strategy."""
    lines = []
    by = population_column(done)
    largest = done[done[by] == done[by].value_counts().idxmax()]
    model = [c for c in done if c.startswith("model.") or c in ("depth", "width")]
    settings = list(dict.fromkeys([*done.attrs.get("axes", []), *model]))
    if len(largest) >= 8 and not (ranges := population.good_ranges(largest, settings)).empty:
        lines += ["## Good ranges", "", f"Of the {len(largest)} trials of `{by}` = "
                  f"{largest[by].iloc[0]}: the 95% bootstrap interval of the best trial's value "
                  "in draws of a quarter of them (Radosavovic et al. 2020).", "",
                  markdown_table(ranges), ""]  # fmt: skip
    timed = done[(done.flops > 0) & (done.activations > 0) & (done.images_per_second > 0)]
    if len(timed) >= 3:
        lines += ["## Training time against FLOPs and activations", "",
                  "Pearson r of log seconds per training image with the log of each, over the "
                  "finished trials, on the machine that ran them.", "",
                  markdown_table(population.time_correlations(timed)), ""]  # fmt: skip
    if {"strategy", "budget"} <= set(done) and done.budget.notna().any():
        table = population.verdicts(done.dropna(subset=["budget"]))
        lines += ["## Which strategy wins at each budget", "",
                  "Test error, mean ± std over seeds; 'clear': the margin exceeds the larger "
                  "seed std of the two best.", "", markdown_table(table), ""]  # fmt: skip
    return lines


def shape_section(done) -> list[str]:
    """Shape-optimal scaling (a `sweep.star` study): per dimension, the optimum at each budget
    and its growth exponent with training compute (3 x FLOPs x examples seen)."""
    if "dimension" not in done or "budget" not in done:
        return []
    done = done.assign(compute=3 * done.flops * done.examples_seen)
    rows = []
    for dimension in sorted(set(done.dimension.dropna()) - {"centre"}):
        column = results.axis_columns({dimension: None}).popitem()[0]
        optima, compute = [], []
        for _, trials in done[done.dimension.isin([dimension, "centre"])].groupby("budget"):
            means = trials.groupby(column)[["test_error", "compute"]].mean().reset_index()
            optima.append(laws.optimum(means[column], means.test_error))
            compute.append(means.compute.median())
        row = dict(dimension=dimension, optima=", ".join(f"{v:.4g}" for v in optima))
        try:
            exponent, stderr = laws.growth_exponent(compute, optima)
            row["exponent"] = f"{exponent:.3f} ± {stderr:.3f}"
        except ScalingError as refusal:
            row["exponent"] = f"refused: {refusal}"
        rows.append(row)
    return ["## Shape-optimal scaling", "", "Per budget, the value of least error along each "
            "dimension (a parabola in log x through the best point and its neighbours), and the "
            "exponent s of optimum ~ compute^s with its standard error.", "",
            markdown_table(pd.DataFrame(rows)), ""]  # fmt: skip


def training_curve(trial_dir) -> pd.DataFrame:
    """(step, loss) of a trial's training records; empty when it has none, or they are
    unreadable (results.load has warned) or damaged (a loss that is not a number)."""
    try:
        train = results.curves(trial_dir)
    except (ScalingError, OSError):  # no metrics.jsonl; one that cannot be read
        return pd.DataFrame(columns=["step", "loss"])
    if "loss" not in train:
        return pd.DataFrame(columns=["step", "loss"])
    train = train[["step", "loss"]].apply(pd.to_numeric, errors="coerce")
    return train.dropna()


def curves(df, out):
    fig, ax = figure("curves")
    colors = {v: f"C{i % 10}" for i, v in enumerate(sorted(df.variant.dropna().unique()))}
    labelled, drawn = set(), False
    for _, trial in df.iterrows():
        train = training_curve(trial.path)
        if train.empty:
            continue
        label = None if trial.variant in labelled else trial.variant
        labelled.add(trial.variant)
        ax.plot(train.step, train.loss, lw=1, alpha=0.7, label=label, color=colors[trial.variant])
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="step", ylabel="training loss (mean since the previous point)")
    legend(ax, len(colors), fontsize=7, ncol=2)
    return save(fig, out, "curves")


# ---- The report ----
def markdown_table(df: pd.DataFrame) -> str:
    def cell(v):
        if isinstance(v, int | np.integer):
            return f"{v:,}"
        if isinstance(v, float) and v.is_integer() and abs(v) >= 1000:  # counts, e.g. examples
            return f"{int(v):,}"
        if isinstance(v, float):
            return "" if np.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def fit_table(fitted) -> str:
    rows = []
    for law in fitted:
        fit = law["fit"]
        values = {k: f"{v:.3g} ± {fit.stderr[k]:.2g}" if k in fit.stderr else f"{v:.3g}"
                  for k, v in fit.params.items()}  # fmt: skip
        residuals = " ".join(f"{r:+.3f}" for r in fit.residuals)
        rows.append(dict(group=law["group"], x=law["x"], points=law["n"], x0=f"{fit.x0:.4g}",
                         **{k: values.get(k, "") for k in "abcd"},
                         status="fitted" if fit.converged else f"no fit: {fit.message}",
                         residuals=residuals))  # fmt: skip
    return markdown_table(pd.DataFrame(rows))


def status_lines(df) -> list[str]:
    counts = df.status.value_counts()
    lines = [f"{len(df)} trials: " + ", ".join(f"{n} {state}" for state, n in counts.items()) + "."]
    for _, trial in df[~df.status.isin(["done", "running", "pending"])].iterrows():
        error = trial.get("error")
        lines.append(
            f"- `{trial.trial}` {trial.status}" + (f": {error}" if isinstance(error, str) else "")
        )
    for _, trial in df[df.status == "running"].iterrows():
        lines.append(f"- `{trial.trial}` running: step {trial.steps_done}")
    return lines


def copy_runs(df, out: Path):
    """The sweep index and the small per-trial files (config, summary, metrics) under
    out/runs/, so that the report can be rebuilt from the copy alone. A trial whose copy would
    land anywhere but in its own directory right under out/runs (a name such as `../x`, a
    symbolic link) is skipped with a warning: nothing outside --out is ever written."""
    if repeated := df.trial[df.trial.duplicated()].tolist():
        raise ScalingError(
            f"trial names repeat across the directories ({repeated[0]}, ...): report them "
            "separately, or together into the first directory's report/"
        )
    runs = out / "runs"
    runs.mkdir(exist_ok=True)
    records = df.attrs.get("index", [])  # as results.load read them: warned about once
    rundir.write_index(runs, {r["name"]: r for r in records if rundir.safe_name(r.get("name"))})
    for _, trial in df.iterrows():
        target = runs / str(trial.trial)
        if not rundir.safe_name(trial.trial) or target.resolve().parent != runs.resolve():
            rundir.warn(f"not copying trial {trial.trial!r}: its copy would leave {runs}")
            continue
        target.mkdir(exist_ok=True)
        for name in RUN_FILES:
            source, copy = Path(trial.path) / name, target / name
            if not source.exists() or source.resolve() == copy.resolve():
                continue
            if copy.is_symlink():  # write the copy itself, never through a link
                copy.unlink()
            shutil.copy2(source, copy)


def check_output(out: Path, given: bool):
    """One error, before any work, when `out` cannot hold the report (a file, say), or would
    write through a symbolic link out of it."""
    rundir.check_writable(out, "--out" if given else "report directory")
    if (out / "runs").is_symlink():
        raise ScalingError(f"{out / 'runs'} is a symbolic link; remove it or choose another --out")


def read_notes(notes) -> str:
    if not notes:
        return ""
    try:
        return Path(notes).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ScalingError(f"cannot read the notes file {notes} ({rundir.first_line(e)})") from None


def write(directories, out=None, notes=None, extrapolate=0) -> Path:
    """REPORT.md, figures and runs.csv for the trials under `directories`, in `out`
    (default: the first directory's report/); with `extrapolate` K, the held-out check of every
    estimator on each group's K largest sizes. Returns the REPORT.md path. Bad input (a
    directory that is not one, an --out that cannot be, a notes file that cannot be read) is
    refused before anything is read or written; damaged trial files are skipped with warnings."""
    if extrapolate < 0:
        raise ScalingError(
            f"--extrapolate must be >= 0 (largest sizes held out), got {extrapolate}"
        )
    results.check_directories(directories)
    given, out = out is not None, Path(out or Path(directories[0]) / "report")
    check_output(out, given)
    notes = read_notes(notes)
    df = results.load(*directories)
    out.mkdir(parents=True, exist_ok=True)
    for name in SIZES:  # a figure the trials no longer have the axes for must not linger
        (out / f"{name}.png").unlink(missing_ok=True)
    if not out.resolve().is_relative_to(Path(directories[0]).resolve()):
        copy_runs(df, out)
    df.drop(columns=["path"]).to_csv(out / "runs.csv", index=False)
    numbers = [k for k in results.SUMMARY if k in df and k not in results.TEXT]
    finite = np.isfinite(df[numbers].apply(pd.to_numeric, errors="coerce")).all(axis=1)
    df.loc[(df.status == "done") & ~finite, "status"] = "done, metrics not finite"
    done = df[df.status == "done"]
    lines = [f"# Report: {', '.join(results.study_name(d) for d in directories)}", ""]
    if notes:
        lines += [notes, ""]
    lines += ["## Status", "", *status_lines(df), ""]
    if not done.empty:
        fitted = fits(done)
        seconds = done.wall_seconds.sum()
        lines += [f"Training time of the finished trials: {seconds / 60:.1f} min in all.", ""]
        lines += ["## Results (means over seeds)", "", markdown_table(summary_table(done)), ""]
        drawn = [heatmap(done, out), pareto(done, out, fitted), data_efficiency(done, out, fitted),
                 generalization(done, out), edf_figure(done, out)]  # fmt: skip
        lines += ["## Figures", ""] + [f"![{name}]({name})" for name in drawn if name] + [""]
        lines += population_sections(done) + shape_section(done)
        lines += ["## Scaling-law fits", "", Fit.__doc__.strip().replace("\n    ", " "), ""]
        lines += [fit_table(fitted) if fitted else "No axis varies enough to fit.", ""]
        if extrapolate:
            lines += [f"## Extrapolation: the {extrapolate} largest sizes held out", "",
                      "Log-RMSE of each estimator's predictions of the held-out points "
                      "(scaling.laws: M1-M4 of Alabdulmohsin et al. 2022).", "",
                      extrapolation_table(done, extrapolate), ""]  # fmt: skip
    if name := curves(df, out):
        lines += ["## Training curves", "", f"![{name}]({name})", ""]
    lines += ["Every trial: [runs.csv](runs.csv)."]
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")
    return out / "REPORT.md"
