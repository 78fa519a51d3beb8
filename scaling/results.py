"""Sweep results as a pandas DataFrame: one row per trial, finished or not.

    df = scaling.results.load("runs/wrn")          # or several sweep directories at once
    df[df.status == "done"].groupby("arch").test_accuracy.mean()

A directory is a sweep (its `trials.jsonl` index), a single run (its `summary.json`), or any
tree of runs, such as a study's copy in `results/`.
"""

import json
import re
from pathlib import Path

import pandas as pd

from scaling import ScalingError
from scaling.sweep import read_index, trial_name
from scaling.train import read_metrics

# The summary fields every finished row carries (see train.train).
SUMMARY = (
    "model", "dataset", "params", "flops", "macs", "activations", "image_size", "num_classes",
    "train_examples", "steps", "train_accuracy", "test_accuracy", "train_loss", "test_loss",
    "generalization_gap", "examples_seen", "wall_seconds", "images_per_second", "devices", "seed",
)  # fmt: skip
WRN = re.compile(r"wrn(\d+)_(\d+)$")


def trial_dirs(directory: Path) -> dict[Path, dict]:
    """{trial directory: its sweep index record (empty when it has none)}."""
    found = {}
    for index_dir in [directory, *(p.parent for p in directory.rglob("trials.jsonl"))]:
        for name, record in read_index(index_dir).items():
            found[index_dir / name] = record
    for marker in directory.rglob("config.json"):
        found.setdefault(marker.parent, {})
    return found


def row(trial_dir: Path, record: dict) -> dict:
    config_path, summary_path = trial_dir / "config.json", trial_dir / "summary.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    model = config.get("model", {})
    overrides = record.get("overrides", {})
    out = dict(trial=record.get("name", trial_dir.name), path=str(trial_dir))
    out.update(
        model=model.get("name", overrides.get("model.name")), seed=config.get("seed"),
        batch_size=config.get("batch_size"), lr=config.get("lr"),
        optimizer=config.get("optimizer", {}).get("name"),
        data_fraction=config.get("data_fraction"), image_size=config.get("image_size"),
    )  # fmt: skip
    columns = axis_columns(overrides)
    out.update(columns)
    out["_axes"] = [c for c in columns if c != "seed" and not c.startswith("model.")]
    # One key per setting of the axes, the seed aside: what a table may average over.
    others = {k: v for k, v in overrides.items() if k != "seed"}
    out["setting"] = trial_name(others) if overrides else trial_dir.name
    model.setdefault("layout", overrides.get("model.layout"))
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if missing := [k for k in SUMMARY if k not in summary]:
            raise ScalingError(f"{summary_path} lacks {', '.join(missing)}")
        out.update({k: summary[k] for k in SUMMARY}, status="done", steps_done=summary["steps"])
    else:
        metrics = [r for r in read_metrics(trial_dir / "metrics.jsonl") if "loss" in r]
        last = metrics[-1] if metrics else {}
        state = record.get("state", "pending")
        out.update(
            # "done" without its summary (a partial copy; another host's view of the run)
            status="no summary.json" if state == "done" else state,
            error=record.get("error"),
            steps_done=last.get("step", 0),
            running_loss=last.get("loss"),
        )
    name = out["model"] or ""
    out["family"] = re.match(r"[a-z]*", name.removeprefix("preact_")).group()
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


def axis_columns(overrides: dict) -> dict:
    """Override keys as columns: by their last component (seed, train_examples, ...) unless two
    share it; model settings keep their prefix (model.width); the model's name is `model`."""
    lasts = [k.rsplit(".", 1)[-1] for k in overrides]
    return {
        key if key.startswith("model.") or lasts.count(last) > 1 else last: value
        for (key, value), last in zip(overrides.items(), lasts, strict=True)
        if key != "model.name"
    }


def study_name(directory: Path) -> str:
    """A sweep directory's name; a report's copy (STUDY/runs) goes by its study's."""
    directory = Path(directory).resolve()
    return directory.parent.name if directory.name == "runs" else directory.name


def load(*directories) -> pd.DataFrame:
    """One row per trial under `directories`: its axes (the sweep's override keys, last
    component), model/family/arch, the training summary when it finished, else its status and
    progress. Columns that no trial has are absent."""
    rows = []
    for directory in map(Path, directories):
        if not directory.is_dir():
            raise ScalingError(f"no such results directory: {directory}")
        for trial_dir, record in sorted(trial_dirs(directory).items()):
            rows.append({"study": study_name(directory), **row(trial_dir, record)})
    if not rows:
        raise ScalingError(f"no trials found in {', '.join(map(str, directories))}")
    # The sweeps' own axes (not model settings, which `arch` names), for grouping in reports.
    axes = {c: None for r in rows for c in r.pop("_axes")}
    df = pd.DataFrame(rows)
    df.attrs["axes"] = list(axes)
    if "test_accuracy" in df:
        df["test_error"] = 1 - df["test_accuracy"]
    return df


def curves(trial_dir) -> pd.DataFrame:
    """A trial's training curve: its metrics.jsonl records as rows (step, loss, accuracy, ...)."""
    path = Path(trial_dir) / "metrics.jsonl"
    if not path.exists():
        raise ScalingError(f"no metrics.jsonl in {trial_dir}")
    return pd.DataFrame(read_metrics(path))
