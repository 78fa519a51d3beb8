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
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_collections

from scaling import Diverged, ScalingError, Stopped
from scaling.config import check_training_config, load_config
from scaling.rundir import (
    LOCK,
    LOCK_FD_VARIABLE,
    check_writable,
    config_conflicts,
    is_marked,
    json_config,
    mark,
    read_index,
    read_json,
    warn,
    write_index,
    write_json_atomic,
)
from scaling.signals import on_stop_signals

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


def strategies(model, names, budgets, image_size, *, num_classes=10, **settings) -> list[dict]:
    """`model` (at `image_size`, with `settings`) grown by each scaling strategy of `names`
    (`scaling.scale.STRATEGIES`: "w", "dWr", "compound", ...) to each of `budgets`, multiples of
    its FLOPs, solved through the families' rounding rules (`scaling.scale.solve_for_flops`,
    counted with `num_classes` classes; training takes the dataset's). Each trial sets the model,
    its settings and the image size, and is labelled `tags.strategy` and `tags.budget`; chain
    `fixed({"model.name": model, ...})` for the base."""
    from scaling import flops, models, scale

    settings["num_classes"] = num_classes
    built = image_size if models.family_of(model).resolution_dependent else None
    base = models.abstract(model, image_size=built, **settings)
    base_macs = flops.macs_and_activations(base, image_size)[0]
    trials = []
    for budget in budgets:  # the smaller budgets first: a study cut short has them all
        for name in names:
            solution = scale.solve_for_macs(
                model, name, budget * base_macs, image_size, tol=1e-2, **settings
            )
            model_settings = {k: v for k, v in solution.settings.items() if k != "num_classes"}
            trials.append(
                {"model.name": model}
                | {f"model.{k}": v for k, v in model_settings.items()}
                | {"image_size": solution.image_size, "tags.strategy": name, "tags.budget": budget}
            )
    return trials


def star(centre: dict, vary: dict, budget_key: str, budgets) -> list[dict]:
    """Shape-optimal scaling's design (Alabdulmohsin et al. 2023): at each of `budgets` (values
    of `budget_key`, such as "steps"), the `centre` trial and, one key of `vary` at a time, the
    centre with that key at each of its values. Labelled `tags.dimension` (the key varied, or
    "centre") and `tags.budget`; `scaling report` fits each dimension's optimal growth with
    compute."""
    trials = []
    for budget in budgets:
        at = {budget_key: budget, "tags.budget": budget}
        trials.append({**centre, **at, "tags.dimension": "centre"})
        for key, values in vary.items():
            trials += [
                {**centre, key: v, **at, "tags.dimension": key}
                for v in values
                if v != centre.get(key)
            ]
    return trials


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


def label(value) -> str:
    """A setting's value as a short name part: 0.1, 1x1x2, adamw (a sub-config's values)."""
    if isinstance(value, float):
        return f"{value:.8g}"
    if isinstance(value, list | tuple):
        return "x".join(map(label, value))
    if isinstance(value, dict):  # a whole sub-config, e.g. {"name": "adamw"}: its values
        return "+".join(map(label, value.values()))
    return str(value)


def trial_name(overrides: dict) -> str:
    """A readable, stable directory name, e.g. 'name=wrn16_4,seed=0'."""
    short = [key.rsplit(".", 1)[-1] for key in overrides]
    parts = [
        f"{s if short.count(s) == 1 else key}={label(v)}"
        for (key, v), s in zip(overrides.items(), short, strict=True)
    ]
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts)) or "base"
    if len(name) > 120:  # file systems cap names; keep it readable and unique
        name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return name


def apply_overrides(base: ml_collections.ConfigDict, overrides: dict):
    """A copy of `base` with dotted-key overrides. Keys must exist, except model settings
    (`model.*`), which the model's constructor validates, and a trial's labels (`tags.*`)."""
    config = copy.deepcopy(base)
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        node = config
        for part in path:
            if part not in node:
                raise ScalingError(f"trial override {key!r}: the config has no {part!r}")
            node = node[part]
        if leaf not in node and path not in (["model"], ["tags"]):
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
    if not trials:
        raise ScalingError("the study has no trials")
    names = [t.name for t in trials]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ScalingError(f"the study lists the same trial twice: {', '.join(dupes)}")
    return trials


def dry_run(trials: list[Trial], workdir) -> str:
    lines = [f"{len(trials)} trials in {workdir}"]
    lines += [f"  {t.name}  {json.dumps(t.overrides)}" for t in trials]
    return "\n".join(lines)


# ---- Running ----
RETRIES_AFTER_KILL = 1  # a trainer killed by SIGKILL (the OOM killer, most often) runs again once


class Trainers:
    """The trainer processes a sweep runs. SIGTERM or Ctrl-C to the sweep asks each to
    checkpoint and stop (it exits with `Stopped.exit_code`), and starts no more. Trainers stay
    in the sweep's process group, so whatever kills the whole group kills them too."""

    def __init__(self):
        self.running, self.signal, self._lock = set(), None, threading.Lock()

    def run(self, args, log, lock_fd) -> int | None:
        """Run one trainer to its end; its exit status, or None if the sweep is stopping."""
        env = dict(os.environ, **{LOCK_FD_VARIABLE: str(lock_fd)})
        with self._lock:
            if self.signal:
                return None
            child = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, pass_fds=(lock_fd,), env=env
            )
            self.running.add(child)
        try:
            return child.wait()
        finally:
            with self._lock:
                self.running.discard(child)

    def stop(self, signum, _frame=None):
        with self._lock:
            self.signal = signal.Signals(signum).name
            for child in self.running:
                child.send_signal(signal.SIGTERM)

    def stopped_by_signals(self):
        return on_stop_signals(self.stop)


def run_trial(trial_dir: Path, extra_args=(), trainers=None) -> tuple[str, str | None]:
    """Train one trial in a child process; returns (state, note or None). The trial is done
    only when its summary.json exists."""
    trainers = trainers or Trainers()
    lock = os.open(trial_dir / LOCK, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "running", "another process is training this trial"
        args = [sys.executable, "-m", "scaling.cli", "train", "--workdir", str(trial_dir)]
        for attempt in range(1 + RETRIES_AFTER_KILL):
            with open(trial_dir / "train.log", "a") as log:
                if attempt:
                    log.write("sweep: the trainer was killed (SIGKILL); running it again\n")
                # The child inherits the locked descriptor: the lock lives while either lives.
                status = trainers.run([*args, *extra_args], log, lock)
            if status != -signal.SIGKILL or trainers.signal:
                break
    finally:
        os.close(lock)
    state, note = outcome(trial_dir, status, distributed="--distributed" in extra_args)
    if trainers.signal and state == "failed":  # a Ctrl-C reached it before it could checkpoint
        return "pending", f"stopped with the sweep ({note})"
    return state, note


def outcome(trial_dir: Path, status: int | None, distributed=False) -> tuple[str, str | None]:
    """A finished trainer's exit status as the trial's state and a one-line note."""
    log = trial_dir / "train.log"
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    last = lines[-1] if lines else f"exit status {status}"
    if status is None:
        return "pending", "the sweep stopped before it started"
    if status == 0 and (distributed or (trial_dir / "summary.json").exists()):
        return "done", None  # on a multi-host slice only process 0 writes summary.json
    if status == 0:
        return "pending", "the trainer exited without writing summary.json"
    if status == Stopped.exit_code:
        return "pending", last
    if status == Diverged.exit_code:
        return "diverged", last
    if status == -signal.SIGKILL:
        times, tail = 1 + RETRIES_AFTER_KILL, " | ".join(lines[-3:])
        return "failed", f"killed by SIGKILL {times} times (out of memory?); last lines: {tail}"
    if status < 0:
        return "failed", f"killed by {signal.Signals(-status).name}"
    return "failed", last


def prepare_sweep_directory(workdir: Path):
    """The sweep's directory, created and marked; an unrelated non-empty one is refused."""
    check_writable(workdir, "--workdir")
    if workdir.is_dir() and any(workdir.iterdir()):
        if not (is_marked(workdir) or (workdir / "trials.jsonl").exists()):
            raise ScalingError(
                f"{workdir} is not empty and is not a sweep directory; choose a new or empty one"
            )
    workdir.mkdir(parents=True, exist_ok=True)
    mark(workdir, "sweep")


def unreadable_trials(workdir: Path, trials) -> dict[str, str]:
    """{name: reason} of trials whose directory holds a damaged config.json (skipped, with a
    warning each); a ScalingError when a trial's directory holds another config."""
    changed, unreadable = [], {}
    for t in trials:
        try:
            if config_conflicts(workdir / t.name, t.config):
                changed.append(t.name)
        except ScalingError as e:
            unreadable[t.name] = str(e)
            warn(f"skipping trial {t.name}: {e}")
    if changed:
        raise ScalingError(
            f"the study changed: {len(changed)} trial(s) no longer match their directories in "
            f"{workdir} ({', '.join(changed[:3])}...); use a new workdir or delete them"
        )
    return unreadable


def plan(study, workdir: Path, retry_failed=False, shard=(0, 1)):
    """Everything a run of the sweep checks and records before training: the shard's trials,
    the index records (written, each trial's state brought up to date) and the trials to run.
    Bad settings and a changed study are refused before anything is written."""
    index, count = shard
    trials = expand(study)[index::count]
    for t in trials:  # every trial's settings, before anything is written
        try:
            check_training_config(t.config)
        except ScalingError as e:
            raise ScalingError(f"trial {t.name}: {e}") from None
    unreadable = unreadable_trials(workdir, trials) if workdir.is_dir() else {}
    prepare_sweep_directory(workdir)
    records = read_index(workdir)
    for t in trials:
        record = records.setdefault(t.name, dict(name=t.name, state="pending", error=None))
        record["overrides"] = t.overrides
        if (workdir / t.name / "summary.json").exists():
            record.update(state="done", error=None)
        elif t.name in unreadable:
            record.update(state="failed", error=unreadable[t.name])
    todo = [
        t for t in trials
        if records[t.name]["state"] != "done" and t.name not in unreadable
        and (retry_failed or records[t.name]["state"] not in ("failed", "diverged"))
    ]  # fmt: skip
    write_index(workdir, records)
    return trials, records, todo


def trial_directory(workdir: Path, trial: Trial) -> Path:
    """The trial's directory, created with its config.json (kept if it is there)."""
    trial_dir = workdir / trial.name
    trial_dir.mkdir(exist_ok=True)
    mark(trial_dir, "run")
    if not (trial_dir / "config.json").exists():
        write_json_atomic(trial_dir / "config.json", json_config(trial.config))
    return trial_dir


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
    """Run every unfinished trial of `study` (this shard's share); returns {name: state}.
    Raises `Stopped` (after recording every trial's state) when SIGTERM or Ctrl-C stopped it."""
    workdir = Path(workdir)
    trials, records, todo = plan(study, workdir, retry_failed, shard)
    lock, trainers = threading.Lock(), Trainers()
    echo(f"{len(trials)} trials: {len(trials) - len(todo)} finished or skipped, {len(todo)} to run")

    def launch(trial):
        trial_dir = trial_directory(workdir, trial)
        with lock:
            if trainers.signal:
                return
            records[trial.name].update(state="running", error=None, started=time.time())
            write_index(workdir, records)
        state, note = run_trial(trial_dir, train_args, trainers)
        with lock:
            finish(workdir, records, trial.name, state, note, echo)
            echo(progress({t.name: records[t.name] for t in trials}, parallel))

    with trainers.stopped_by_signals(), ThreadPoolExecutor(max(1, parallel)) as pool:
        list(pool.map(launch, todo))
    if trainers.signal:
        pending = sum(records[t.name]["state"] == "pending" for t in trials)
        raise Stopped(f"stopped by {trainers.signal}; {pending} trial(s) pending")
    return {t.name: records[t.name]["state"] for t in trials}


def finish(workdir, records, name, state, note, echo):
    """Record a trial's end in the index, and say it."""
    records[name].update(state=state, error=note, ended=time.time())
    write_index(workdir, records)
    wall = records[name]["ended"] - records[name].get("started", records[name]["ended"])
    echo(f"{name}: {state} in {duration(wall)}" + (f" ({note})" if note else ""))


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def progress(records: dict, parallel: int = 1, width: int = 20) -> str:
    """One line on a sweep's state: a bar of the trials done, the count in each state, and an
    estimate of the time left from the wall times of the trials that finished (each trial's
    `started` and `ended`), `parallel` at a time."""
    states = [r.get("state", "pending") for r in records.values()]
    counts = {s: states.count(s) for s in STATES if s in states}
    finished = counts.get("done", 0) + counts.get("failed", 0) + counts.get("diverged", 0)
    filled = round(width * finished / len(states)) if states else 0
    line = f"[{'#' * filled}{'.' * (width - filled)}] {finished}/{len(states)}: "
    line += ", ".join(f"{n} {s}" for s, n in counts.items())
    walls = [
        r["ended"] - r["started"] for r in records.values()
        if r.get("state") == "done" and is_time(r.get("started")) and is_time(r.get("ended"))
    ]  # fmt: skip
    left = counts.get("pending", 0) + counts.get("running", 0)
    if walls and left:
        line += f"; about {duration(sum(walls) / len(walls) * left / max(1, parallel))} left"
    return line


def status(workdir: Path) -> list[str]:
    """What a sweep directory holds, read from its index and the trials' metrics (no JAX): the
    progress line, then the step of each running trial and the error of each failed one."""
    from scaling.results import progress as last_record  # results imports this module

    if not (workdir / "trials.jsonl").is_file():
        raise ScalingError(f"{workdir} is not a sweep directory (no trials.jsonl)")
    records = read_index(workdir)
    running = sum(r.get("state") == "running" for r in records.values())
    lines = [f"{workdir}: {progress(records, parallel=max(1, running))}"]
    for name, record in records.items():
        if record.get("state") == "running":
            step = last_record(workdir / name / "metrics.jsonl").get("step", 0)
            lines.append(f"  running  {name}: step {step}")
        elif record.get("state") in ("failed", "diverged"):
            lines.append(f"  {record['state']:<8} {name}: {record.get('error')}")
    return lines


def is_time(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def best_trial(workdir, names) -> dict | None:
    """The finished trial with the highest test accuracy (e.g. the grid search's best triple)."""
    summaries = []
    for name in names:  # on a multi-host slice only process 0's view has the summaries
        summary = read_json(Path(workdir) / name / "summary.json")
        if summary and isinstance(summary.get("test_accuracy"), float):
            summaries.append({"name": name, **summary})
    return max(summaries, key=lambda s: s["test_accuracy"], default=None)
