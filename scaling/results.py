"""Sweep results as a pandas DataFrame: one row per trial, finished or not.

    df = scaling.results.load("runs/wrn")          # or several sweep directories at once
    df[df.status == "done"].groupby("arch").test_accuracy.mean()

A directory is a sweep (its `trials.jsonl` index), a single run (its `summary.json`), or any
tree of runs, such as a study's copy in `results/`.
"""

import os
import re
from pathlib import Path

import pandas as pd

from scaling import ScalingError
from scaling.rundir import read_index, read_json, read_metrics, warn
from scaling.sweep import label, trial_name

# The summary fields every finished row carries (see train.train).
SUMMARY = (
    "model", "dataset", "params", "flops", "macs", "activations", "image_size", "num_classes",
    "train_examples", "steps", "train_accuracy", "test_accuracy", "train_loss", "test_loss",
    "generalization_gap", "examples_seen", "wall_seconds", "images_per_second", "devices", "seed",
)  # fmt: skip
TEXT = ("model", "dataset")  # the summary fields that are not numbers
WRN = re.compile(r"wrn(\d+)_(\d+)$")


def trial_dirs(directory: Path) -> dict[Path, dict]:
    """{trial directory: its sweep index record (empty when it has none)}. The index names only
    plain path components (rundir.read_index), so a record never leads out of its sweep."""
    found = {}
    # Each index once (rglob finds the top one too): one warning per damaged line.
    indexes = dict.fromkeys([directory, *(p.parent for p in directory.rglob("trials.jsonl"))])
    for index_dir in indexes:
        for name, record in read_index(index_dir).items():
            found[index_dir / name] = record
    for marker in directory.rglob("config.json"):
        found.setdefault(marker.parent, {})
    return found


def mapping(value) -> dict:
    """`value` if it is a JSON object, else {}: a damaged record or config reads as empty."""
    return value if isinstance(value, dict) else {}


def row(trial_dir: Path, record: dict) -> dict:
    """A trial's row. A damaged config.json or summary.json is warned about (once) and read as
    missing, so that one bad file never blocks the report; such a trial is never "done"."""
    config = mapping(read_json(trial_dir / "config.json"))
    model = dict(mapping(config.get("model")))
    overrides = mapping(record.get("overrides"))
    # A trial found by its config.json alone is named after its directory (absolute: "." too).
    out = dict(trial=record.get("name", Path(os.path.abspath(trial_dir)).name), path=str(trial_dir))
    out.update(
        model=model.get("name", overrides.get("model.name")), seed=config.get("seed"),
        batch_size=config.get("batch_size"), lr=config.get("lr"),
        optimizer=mapping(config.get("optimizer")).get("name"),
        data_fraction=config.get("data_fraction"), image_size=config.get("image_size"),
    )  # fmt: skip
    columns = axis_columns(overrides)
    out.update(columns)
    out["_axes"] = [c for c in columns if c != "seed" and not c.startswith("model.")]
    # One key per setting of the axes, the seed aside: what a table may average over.
    others = {k: v for k, v in overrides.items() if k != "seed"}
    out["setting"] = trial_name(others) if overrides else out["trial"]
    model.setdefault("layout", overrides.get("model.layout"))
    out.update(outcome(trial_dir, record))
    name = out["model"] if isinstance(out["model"], str) else ""
    out["family"] = family_name(name)
    out["arch"] = name
    if name == "coatnet":
        out["arch"] = f"coatnet-{model['layout']}"
    elif "width" in model or "depth" in model:  # a named model resized by its settings
        out["arch"] = "-".join(
            [name] + [f"{k[0]}{model[k]}" for k in ("width", "depth") if k in model]
        )
    if match := WRN.match(name):
        out["depth"], out["width"] = int(match[1]), int(match[2])
    return out


def family_name(model: str) -> str:
    """The family a report groups a model under: its name's leading letters (wrn16_4: wrn)."""
    return re.match(r"[a-z]*", model.removeprefix("preact_")).group()


def outcome(trial_dir: Path, record: dict) -> dict:
    """The summary of a finished trial (status "done"); else its state and progress. A summary
    that is damaged or lacks fields gives a status that says so, with one warning."""
    path = trial_dir / "summary.json"
    summary = read_json(path)  # None when absent, or (warned) damaged
    problem = summary_problem(summary) if summary is not None else None
    if problem == "":
        return {k: summary[k] for k in SUMMARY} | dict(status="done", steps_done=summary["steps"])
    state = record.get("state", "pending")
    if problem:
        warn(f"{path} {problem}: its trial is not counted as done")
        state = "incomplete summary.json"
    elif path.exists():
        state = "unreadable summary.json"
    elif state == "done":  # "done" without its summary (a partial copy; another host's view)
        state = "no summary.json"
    last = progress(trial_dir / "metrics.jsonl")
    return dict(
        status=state if isinstance(state, str) else "unknown state",
        error=record.get("error"),
        steps_done=last.get("step", 0),
        running_loss=last.get("loss"),
    )


def summary_problem(summary: dict) -> str:
    """What keeps `summary` from being a finished trial's ("" when nothing does)."""
    if missing := [k for k in SUMMARY if k not in summary]:
        return f"lacks {', '.join(missing)}"
    wrong = [
        k for k in SUMMARY
        if not (isinstance(summary[k], str) if k in TEXT else is_number(summary[k]))
    ]  # fmt: skip
    return f"has values of the wrong type ({', '.join(wrong)})" if wrong else ""


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def progress(path: Path) -> dict:
    """The last training record of a metrics.jsonl ({} when none, or unreadable: warned)."""
    try:
        metrics = [r for r in read_metrics(path) if "loss" in r]
    except OSError as e:
        warn(f"skipping {path}: unreadable ({e.strerror})")
        return {}
    return metrics[-1] if metrics else {}


def axis_columns(overrides: dict) -> dict:
    """Override keys as columns: by their last component (seed, train_examples, ...) unless two
    share it; model settings keep their prefix (model.width); the model's name is `model`."""
    lasts = [k.rsplit(".", 1)[-1] for k in overrides]
    return {
        key if key.startswith("model.") or lasts.count(last) > 1 else last: (
            label(value) if isinstance(value, dict) else value  # a sub-config: {"name": "adamw"}
        )
        for (key, value), last in zip(overrides.items(), lasts, strict=True)
        if key != "model.name"
    }


def study_name(directory: Path) -> str:
    """A sweep directory's name; a report's copy (STUDY/runs) goes by its study's."""
    directory = Path(directory).resolve()
    return directory.parent.name if directory.name == "runs" else directory.name


def check_directories(directories):
    """One error, before anything is read, for a results directory that is not one."""
    if not directories:
        raise ScalingError("give at least one results directory")
    for directory in map(Path, directories):
        if not directory.is_dir():
            raise ScalingError(f"no such results directory: {directory}")


def load(*directories) -> pd.DataFrame:
    """One row per trial under `directories`: its axes (the sweep's override keys, last
    component), model/family/arch, the training summary when it finished, else its status and
    progress. Columns that no trial has are absent; `df.attrs["index"]` holds the trials' sweep
    index records."""
    directories = [Path(d) for d in directories]
    check_directories(directories)
    rows, index = [], []
    for directory in directories:
        for trial_dir, record in sorted(trial_dirs(directory).items()):
            rows.append({"study": study_name(directory), **row(trial_dir, record)})
            index += [record] if record else []
    if not rows:
        raise ScalingError(f"no trials found in {', '.join(map(str, directories))}")
    # The sweeps' own axes (not model settings, which `arch` names), for grouping in reports.
    axes = {c: None for r in rows for c in r.pop("_axes")}
    df = pd.DataFrame(rows)
    df.attrs["axes"] = list(axes)
    df.attrs["index"] = index  # the sweep index records, read (and warned about) once
    if "test_accuracy" in df:
        df["test_error"] = 1 - df["test_accuracy"]
    df["variant"] = variants(df)
    return df


DATA_AXES = ("seed", "train_examples", "data_fraction")  # what a line or point averages over
FIT_AXES = {"params": "family", "flops": "family", "train_examples": "variant"}  # x: grouped by


def variants(df: pd.DataFrame) -> pd.Series:
    """Each trial's architecture, and the settings that tell apart trials of one architecture
    (the seed and data size aside), e.g. 'resnet20, stochastic_depth=0.5': what a line of a
    figure or a named point stands for."""
    columns = [c for c in df if c.startswith("model.")] + [
        c for c in df.attrs.get("axes", []) if c not in DATA_AXES and c in df
    ]
    shown = df[columns].map(lambda v: label(v) if isinstance(v, list | dict) or pd.notna(v) else v)
    out = df.arch.astype(str)
    for _, rows in shown.groupby(df.arch.astype(str)):
        varying = [c for c in columns if rows[c].nunique(dropna=False) > 1]
        for i, row in rows[varying].iterrows():
            parts = [f"{c.removeprefix('model.')}={v}" for c, v in row.items() if pd.notna(v)]
            out[i] = ", ".join([out[i], *parts])
    return out


def axes_of(df: pd.DataFrame) -> list[str]:
    """The columns that tell the study's settings apart, the seed aside: the architecture, the
    sweep's own axes, and the source and dataset when several are reported together."""
    candidates = ["study", "dataset", "arch", "depth", "width", *df.attrs.get("axes", [])]
    varying = [c for c in candidates if c in df and df[c].nunique(dropna=True) > 1]
    return list(dict.fromkeys(["arch", *varying]))


def fit_groups(done: pd.DataFrame):
    """(x, group label, rows) for each x that varies enough to fit: per family (or architecture
    for data), and per any other axis the study varies, such as the dataset."""
    # Sizes along the law (resolution too) and a study's labels of its points are not groups.
    model_axes = {"arch", "depth", "width", "image_size", "train_examples", "data_fraction"}
    tags = {"strategy", "budget", "dimension"}
    others = [a for a in axes_of(done) if a not in model_axes | tags]
    for x, by in FIT_AXES.items():
        if x not in done or done[x].nunique() < 2:
            continue
        for group, rows in done.groupby([by, *others], dropna=False):
            if rows[x].nunique() >= 2:
                yield x, ", ".join(str(g) for g in group if pd.notna(g)), rows


def curves(trial_dir) -> pd.DataFrame:
    """A trial's training curve: its metrics.jsonl records as rows (step, loss, accuracy, ...)."""
    path = Path(trial_dir) / "metrics.jsonl"
    if not path.exists():
        raise ScalingError(f"no metrics.jsonl in {trial_dir}")
    return pd.DataFrame(read_metrics(path))
