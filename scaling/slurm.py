"""SLURM through submitit: a sweep's pending trials as one job array, each task one trial.

    scaling sweep --config configs/STUDY.py --workdir /shared/runs/study --executor slurm \
        --partition gpu --gpus-per-trial 1 --time 240 --array-parallelism 8

The sweep process submits the array (submitit's `AutoExecutor`, job files under
WORKDIR/submitit), then waits, recording each trial's end in the sweep index, which stays the
one record of trial states. A task trains its trial as the local sweep does (`sweep.run_trial`:
the trial directory's lock, train.log, the same states). Near its time limit, or when SLURM
preempts it, a task is signalled: it asks its trainer to checkpoint and stop (SIGTERM), and
submitit requeues it; the requeued task resumes from the orbax checkpoint, so the trial ends
as it would have uninterrupted. If the submitting process is stopped, the tasks keep running;
running the same command again later records what they finished and submits what is left.
"""

import signal
import threading
import time
from pathlib import Path

from scaling import ScalingError, Stopped, sweep
from scaling.signals import on_stop_signals

CLUSTERS = ("slurm", "local")  # local: submitit's stand-in, processes on this machine (tests)


class TrialTask:
    """Trains one trial (its directory, the argument) as a submitit job; requeued, and resumed,
    after a time limit or a preemption."""

    def __init__(self, train_args=()):
        self.train_args = tuple(train_args)

    def __call__(self, trial_dir):
        # The trainer is waited on in a thread, so that the signal which asks this task to
        # checkpoint can stop it from the main thread.
        self._trainers, result = sweep.Trainers(), {}
        self._worker = threading.Thread(
            target=lambda: result.update(
                outcome=sweep.run_trial(Path(trial_dir), self.train_args, self._trainers)
            )
        )
        self._worker.start()
        while self._worker.is_alive():
            self._worker.join(0.2)
        return result["outcome"]

    def checkpoint(self, trial_dir):
        """submitit calls this on the time-limit or preemption signal: the trainer saves a
        checkpoint and exits, and the task is requeued as a fresh copy that resumes it."""
        import submitit

        if getattr(self, "_trainers", None) is not None:
            self._trainers.stop(signal.SIGTERM)
            self._worker.join()
        return submitit.helpers.DelayedSubmission(TrialTask(self.train_args), trial_dir)

    def __getstate__(self):  # what is pickled for a job: the settings, not the running trainer
        return {"train_args": self.train_args}


def check(cluster="slurm", partition=None, gpus_per_trial=0, time_min=60, array_parallelism=None):
    """One clear error, before any work, for settings no cluster takes or a missing SLURM."""
    try:
        import submitit
    except ImportError:
        raise ScalingError(
            "--executor slurm needs submitit: pip install 'scaling[slurm]'"
        ) from None
    if cluster not in CLUSTERS:
        raise ScalingError(f"unknown cluster {cluster!r}; valid: {', '.join(CLUSTERS)}")
    if time_min <= 0 or gpus_per_trial < 0 or (array_parallelism or 1) < 1:
        raise ScalingError(
            "--time must be positive, --gpus-per-trial >= 0, --array-parallelism >= 1"
        )
    if cluster == "slurm" and submitit.AutoExecutor.which() != "slurm":
        raise ScalingError("--executor slurm: no SLURM here (sbatch is not on PATH)")


def executor(workdir: Path, cluster="slurm", partition=None, gpus_per_trial=0, time_min=60,
             array_parallelism=None):  # fmt: skip
    """A submitit executor for the sweep's tasks, its job files under WORKDIR/submitit."""
    import submitit

    check(cluster, partition, gpus_per_trial, time_min, array_parallelism)
    ex = submitit.AutoExecutor(folder=workdir / "submitit", cluster=cluster)
    ex.update_parameters(timeout_min=time_min, name=f"scaling-{workdir.name}")
    if cluster == "slurm":
        slurm = dict(slurm_partition=partition, slurm_gpus_per_task=gpus_per_trial or None,
                     slurm_array_parallelism=array_parallelism)  # fmt: skip
        ex.update_parameters(**{k: v for k, v in slurm.items() if v is not None})
    return ex


def run(study, workdir, *, settings=None, retry_failed=False, shard=(0, 1), train_args=(),
        echo=print, on_submit=None) -> dict[str, str]:  # fmt: skip
    """Submit every unfinished trial of `study` as one array (`executor(**settings)`), wait for
    the tasks and record each end in the index; returns {name: state}. `on_submit(jobs)`
    (tests) sees the submitted jobs, by trial name."""
    workdir = Path(workdir)
    check(**(settings or {}))
    trials, records, todo = sweep.plan(study, workdir, retry_failed, shard)
    executor_ = executor(workdir, **(settings or {}))
    echo(f"{len(trials)} trials: {len(trials) - len(todo)} finished or skipped, {len(todo)} to run")
    directories = [str(sweep.trial_directory(workdir, t)) for t in todo]
    jobs = dict(zip([t.name for t in todo], executor_.map_array(TrialTask(train_args), directories),
                    strict=True))  # fmt: skip
    for name, job in jobs.items():
        records[name].update(state="running", error=None, started=time.time(), job=job.job_id)
    sweep.write_index(workdir, records)
    echo(
        f"submitted {len(jobs)} tasks to {executor_.cluster} (job files in {workdir / 'submitit'})"
    )
    if on_submit:
        on_submit(jobs)
    stopped = []
    with on_stop_signals(lambda signum, _frame=None: stopped.append(signum)):
        waiting = dict(jobs)
        while waiting and not stopped:
            for name in [n for n, job in waiting.items() if job.done()]:
                state, note = outcome(waiting.pop(name))
                sweep.finish(workdir, records, name, state, note, echo)
                echo(sweep.progress({t.name: records[t.name] for t in trials}, len(jobs)))
            time.sleep(0.5)
    if stopped:
        raise Stopped(f"stopped waiting: {len(waiting)} task(s) still run under {executor_.cluster}"
                      "; run the same command later to record them")  # fmt: skip
    return {t.name: records[t.name]["state"] for t in trials}


def outcome(job) -> tuple[str, str | None]:
    """A finished task's (state, note): what `sweep.run_trial` returned, or the job's failure."""
    try:
        return job.result()
    except Exception as e:  # submitit's job failure (the task's exception, or a lost job)
        lines = [line for line in str(e).splitlines() if line.strip()]
        return "failed", f"task failed: {lines[-1] if lines else type(e).__name__}"
