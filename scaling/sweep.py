"""Sweeps: a study declared once, run anywhere, finished by re-running the same command.

A study file is an ml_collections config file whose `get_config(arg)` returns a ConfigDict with
`base`, a training config (usually `configs/train.py` with a variant), and `trials`, a list of
override dicts built from the combinators below; keys are dotted config paths:

    c.trials = sweep.product(sweep.axis("model.name", ["wrn10_1", "wrn16_2"]),
                             sweep.axis("seed", [0, 1]))

Each trial trains in its own directory, named from its overrides so that the same study always
maps a trial to the same directory. `DIR/trials.jsonl` indexes the trials' states (pending,
running, done, failed, diverged); only the sweep process writes it, atomically. A trial runs
as its own `scaling train --workdir TRIAL_DIR` process, which holds an exclusive lock on the
trial directory while it lives, so two sweeps never train one trial at once. Re-running a sweep
skips finished trials (those with a summary.json), resumes unfinished ones from their last
checkpoint, and retries failed or diverged ones only when asked.
"""

import copy
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_collections

from scaling import Diverged, ScalingError
from scaling.config import load_config
from scaling.train import config_conflicts, json_config, write_json_atomic

STATES = ("pending", "running", "done", "failed", "diverged")


# ---- Combinators: each returns a list of override dicts. ----
def axis(key: str, values) -> list[dict]:
    """One config key taking each of `values`."""
    return [{key: v} for v in values]


def fixed(overrides: dict) -> list[dict]:
    """A single trial's worth of fixed values (combine with `product` to set them everywhere)."""
    return [dict(overrides)]


def product(*sweeps) -> list[dict]:
    """Every combination (a grid); later sweeps vary fastest."""
    result = [{}]
    for sweep in sweeps:
        result = [{**a, **b} for a in result for b in sweep]
    return result


def paired(*sweeps) -> list[dict]:
    """Trials side by side (zip): the i-th trial merges the i-th of every sweep."""
    if len({len(s) for s in sweeps}) > 1:
        raise ScalingError(f"paired sweeps need equal lengths, got {[len(s) for s in sweeps]}")
    return [
        {k: v for part in parts for k, v in part.items()} for parts in zip(*sweeps, strict=True)
    ]


def chain(*sweeps) -> list[dict]:
    """One sweep after another (concatenation)."""
    return [trial for sweep in sweeps for trial in sweep]


def base_config(train_file, **variant) -> ml_collections.ConfigDict:
    """A study's base: the training config file with its argument string built from `variant`.
    With a `steps` budget, trials log 10 times and checkpoint 4 times over it, whatever its size."""
    config = load_config(f"{train_file}:" + ",".join(f"{k}={v}" for k, v in variant.items()))
    if steps := variant.get("steps"):
        config.log_every, config.checkpoint_every = max(steps // 10, 1), max(steps // 4, 1)
    return config


# ---- Trials ----
@dataclasses.dataclass
class Trial:
    name: str
    overrides: dict
    config: ml_collections.ConfigDict


def _label(value) -> str:
    if isinstance(value, float):
        return f"{value:.8g}"
    if isinstance(value, list | tuple):
        return "x".join(map(_label, value))
    return str(value)


def trial_name(overrides: dict) -> str:
    """A readable, stable directory name, e.g. 'name=wrn16_4,seed=0'."""
    short = [key.rsplit(".", 1)[-1] for key in overrides]
    parts = [
        f"{s if short.count(s) == 1 else key}={_label(v)}"
        for (key, v), s in zip(overrides.items(), short, strict=True)
    ]
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts)) or "base"
    if len(name) > 120:  # file systems cap names; keep it readable and unique
        name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return name


def apply_overrides(base: ml_collections.ConfigDict, overrides: dict):
    """A copy of `base` with dotted-key overrides. Keys must exist, except model settings
    (`model.*`), which the model's constructor validates."""
    config = copy.deepcopy(base)
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        node = config
        for part in path:
            if part not in node:
                raise ScalingError(f"trial override {key!r}: the config has no {part!r}")
            node = node[part]
        if leaf not in node and path != ["model"]:
            raise ScalingError(f"trial override {key!r} names a key that does not exist")
        try:
            with config.unlocked():  # config files load locked; model settings may be new keys
                node[leaf] = value
        except (TypeError, KeyError) as e:
            raise ScalingError(f"trial override {key}={value!r}: {e}") from None
    return config


def expand(study: ml_collections.ConfigDict) -> list[Trial]:
    """The study's trials, in order, with their full configs."""
    if "base" not in study or "trials" not in study:
        raise ScalingError("a study config needs 'base' (a training config) and 'trials'")
    trials = [Trial(trial_name(o), dict(o), apply_overrides(study.base, o)) for o in study.trials]
    names = [t.name for t in trials]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ScalingError(f"the study lists the same trial twice: {', '.join(dupes)}")
    return trials


def dry_run(trials: list[Trial], workdir) -> str:
    lines = [f"{len(trials)} trials in {workdir}"]
    lines += [f"  {t.name}  {json.dumps(t.overrides)}" for t in trials]
    return "\n".join(lines)


# ---- The index ----
def read_index(workdir: Path) -> dict[str, dict]:
    path = workdir / "trials.jsonl"
    if not path.exists():
        return {}
    return {r["name"]: r for r in map(json.loads, path.read_text().splitlines()) if r}


def write_index(workdir: Path, records: dict[str, dict]):
    tmp = workdir / "trials.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records.values()))
    os.replace(tmp, workdir / "trials.jsonl")


# ---- Running ----
def run_trial(trial_dir: Path, extra_args=()) -> tuple[str, str | None]:
    """Train one trial in a child process; returns (state, error line or None)."""
    lock = os.open(trial_dir / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "running", "another process is training this trial"
        with open(trial_dir / "train.log", "a") as log:
            # The child inherits the locked descriptor: the lock lives as long as either process.
            child = subprocess.run(
                [sys.executable, "-m", "scaling.cli", "train", "--workdir", str(trial_dir),
                 *extra_args],
                stdout=log, stderr=subprocess.STDOUT, pass_fds=(lock,),
            )  # fmt: skip
    finally:
        os.close(lock)
    if child.returncode == 0:  # on a multi-host slice only process 0 writes summary.json
        return "done", None
    lines = [ln for ln in (trial_dir / "train.log").read_text().splitlines() if ln.strip()]
    error = lines[-1] if lines else f"exit status {child.returncode}"
    if child.returncode < 0:
        error = f"killed by signal {-child.returncode}"
    return ("diverged" if child.returncode == Diverged.exit_code else "failed"), error


def run(
    study,
    workdir,
    *,
    parallel: int = 1,
    retry_failed: bool = False,
    shard: tuple[int, int] = (0, 1),
    train_args=(),
    echo=print,
) -> dict[str, str]:
    """Run every unfinished trial of `study` (this shard's share); returns {name: state}."""
    workdir = Path(workdir)
    index, count = shard
    trials = expand(study)[index::count]
    workdir.mkdir(parents=True, exist_ok=True)
    changed = [t.name for t in trials if config_conflicts(workdir / t.name, t.config)]
    if changed:
        raise ScalingError(
            f"the study changed: {len(changed)} trial(s) no longer match their directories in "
            f"{workdir} ({', '.join(changed[:3])}...); use a new workdir or delete them"
        )
    records = read_index(workdir)
    for t in trials:
        record = records.setdefault(t.name, dict(name=t.name, state="pending", error=None))
        record["overrides"] = t.overrides
        if (workdir / t.name / "summary.json").exists():
            record.update(state="done", error=None)
    todo = [
        t for t in trials
        if records[t.name]["state"] != "done"
        and (retry_failed or records[t.name]["state"] not in ("failed", "diverged"))
    ]  # fmt: skip
    lock = threading.Lock()
    write_index(workdir, records)
    echo(f"{len(trials)} trials: {len(trials) - len(todo)} finished or skipped, {len(todo)} to run")

    def launch(trial):
        trial_dir = workdir / trial.name
        trial_dir.mkdir(exist_ok=True)
        if not (trial_dir / "config.json").exists():
            write_json_atomic(trial_dir / "config.json", json_config(trial.config))
        with lock:
            records[trial.name].update(state="running", error=None, started=time.time())
            write_index(workdir, records)
        state, error = run_trial(trial_dir, train_args)
        with lock:
            records[trial.name].update(state=state, error=error, ended=time.time())
            write_index(workdir, records)
        echo(f"{trial.name}: {state}" + (f" ({error})" if error else ""))

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        list(pool.map(launch, todo))
    return {t.name: records[t.name]["state"] for t in trials}


def best_trial(workdir, names) -> dict | None:
    """The finished trial with the highest test accuracy (e.g. the grid search's best triple)."""
    summaries = []
    for name in names:
        path = Path(workdir) / name / "summary.json"
        if path.exists():  # on a multi-host slice only process 0's view has it
            summaries.append({"name": name, **json.loads(path.read_text())})
    return max(summaries, key=lambda s: s["test_accuracy"], default=None)
