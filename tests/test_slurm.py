"""SLURM through submitit, with submitit's local executor standing in for the cluster: each
trial one task of an array, a task signalled for its time limit is requeued and resumes, and the
sweep index stays the record of every trial's state."""

import json
import os
import time
from pathlib import Path

import ml_collections
import pytest
from conftest import ROOT, one_line_exit_2

from scaling import rundir, slurm

pytest.importorskip("submitit")
from submitit.local.local import LocalJobEnvironment  # noqa: E402


def metrics(trial_dir):
    return [r for r in rundir.read_metrics(trial_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
def test_a_requeued_task_ends_as_an_uninterrupted_one(tmp_path, tiny_config):
    """Two trials with one config (they differ by a label only); the first task gets the
    time-limit signal half-way: its trainer checkpoints, the task is requeued and resumes, and
    both trials end with the same losses and accuracy."""
    study = ml_collections.ConfigDict()
    study.base = tiny_config(num_steps=60, log_every=1, checkpoint_every=5)
    study.trials = [{"tags.copy": "a"}, {"tags.copy": "b"}]
    workdir = tmp_path / "sweep"
    interrupted = workdir / "copy=a"

    def interrupt(jobs):
        deadline = time.time() + 240
        while not (interrupted / "metrics.jsonl").exists() or len(metrics(interrupted)) < 8:
            assert time.time() < deadline, "the task never started training"
            time.sleep(0.05)
        # What SLURM sends a task near its time limit, to the task itself (submitit's local
        # controller, the job's process, would not pass it on).
        controller = jobs["copy=a"]._process.pid
        (task,) = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
        os.kill(int(task), LocalJobEnvironment._usr_sig())

    lines = []
    settings = dict(cluster="local", time_min=10)
    states = slurm.run(study, workdir, settings=settings, on_submit=interrupt, echo=lines.append)
    assert states == {"copy=a": "done", "copy=b": "done"}
    log = (interrupted / "train.log").read_text()
    assert "stopped by SIGTERM at step" in log and "resumed from step" in log
    a, b = metrics(interrupted), metrics(workdir / "copy=b")
    assert [r["step"] for r in a] == list(range(1, 61))  # each step logged once
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    summaries = [
        json.loads((workdir / n / "summary.json").read_text()) for n in ("copy=a", "copy=b")
    ]
    assert summaries[0]["test_accuracy"] == summaries[1]["test_accuracy"]
    index = rundir.read_index(workdir)
    assert {r["state"] for r in index.values()} == {"done"} and all(
        "job" in r for r in index.values()
    )
    assert lines[0] == "2 trials: 0 finished or skipped, 2 to run"


def test_no_slurm_is_one_line_before_any_write(tmp_path, capsys):
    study = f"{ROOT / 'configs' / 'wrn_width_depth.py'}:depths=10,widths=1,steps=2"
    err = one_line_exit_2(["sweep", "--config", study, "--workdir", str(tmp_path / "w"),
                           "--executor", "slurm"], capsys)  # fmt: skip
    assert "no SLURM here (sbatch is not on PATH)" in err
    assert not (tmp_path / "w").exists()
