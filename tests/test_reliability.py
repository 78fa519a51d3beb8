"""Reliability: kills, SIGTERM, damaged checkpoints, divergence, fuzzed bad input."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TRAIN_CONFIG, run_python
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scaling import Diverged, ScalingError, Stopped, models, rundir, sweep
from scaling.config import load_config
from scaling.models import resnet
from scaling.rundir import read_metrics
from scaling.train import train

SPEC = f"{TRAIN_CONFIG}:model=resnet8,image_size=8,steps=24,batch_size=32"
ARGS = ["--config", SPEC, "--config.log_every=2", "--config.checkpoint_every=4"]


def tiny():
    config = load_config(SPEC)
    config.log_every, config.checkpoint_every = 2, 4
    return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("whole")
    summary = train(tiny(), workdir)
    return summary, read_metrics(workdir / "metrics.jsonl")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A copy, at the path given, of one run stopped at step 10 (checkpoints at steps 4, 8 and
    10), trained once for the module."""
    original = tmp_path_factory.mktemp("stopped") / "run"
    assert train(tiny(), original, stop_after=10) is None
    return lambda workdir: shutil.copytree(original, workdir)


def start(workdir):
    return subprocess.Popen(
        [sys.executable, "-m", "scaling.cli", "train", *ARGS, "--workdir", str(workdir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def wait_for(condition, proc, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(0.01)
    return True


def checkpoint_dirs(workdir):
    ckpts = workdir / "checkpoints"
    return list(ckpts.iterdir()) if ckpts.is_dir() else []


def same_run(workdir, uninterrupted):
    summary, metrics = uninterrupted
    resumed = json.loads((workdir / "summary.json").read_text())
    for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy", "steps"):
        assert resumed[key] == summary[key], key  # bit-identical on CPU
    got = read_metrics(workdir / "metrics.jsonl")

    def strip(records):  # timings differ between runs
        return [{k: v for k, v in r.items() if "wall" not in k and "per_second" not in k}
                for r in records]  # fmt: skip

    assert strip(got) == strip(metrics)  # no step lost, none duplicated


@pytest.mark.slow
def test_sigkill_at_three_moments_then_resume(tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    moments = [
        lambda: (workdir / "config.json").exists(),  # before any step
        lambda: any(".orbax-checkpoint-tmp" in p.name for p in checkpoint_dirs(workdir)),
        lambda: len(read_metrics(workdir / "metrics.jsonl")) >= 8,  # between checkpoints
    ]
    killed = 0
    for moment in moments:
        proc = start(workdir)
        if wait_for(moment, proc):
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait()
    assert killed >= 2  # the moments race a short run; most must land
    final = start(workdir)
    out = final.communicate(timeout=240)[0]
    assert final.returncode == 0, out
    same_run(workdir, uninterrupted)


def test_sigterm_checkpoints_and_exits(tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    proc = start(workdir)
    assert wait_for(lambda: len(read_metrics(workdir / "metrics.jsonl")) >= 2, proc)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == Stopped.exit_code, out
    assert "stopped by SIGTERM at step" in out and len(out.splitlines()) == 1, out
    assert time.time() - sent < 30
    stopped = [p for p in checkpoint_dirs(workdir) if p.name.isdigit()]
    assert stopped and not (workdir / "summary.json").exists()
    resume = subprocess.run([sys.executable, "-m", "scaling.cli", "train", "--workdir",
                             str(workdir)], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert resume.returncode == 0, resume.stderr
    same_run(workdir, uninterrupted)


def test_damaged_checkpoint_falls_back(tmp_path, uninterrupted, stopped, capsys):
    workdir = stopped(tmp_path / "run")
    latest = workdir / "checkpoints" / "10"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncate every file
    train(tiny(), workdir)
    assert "checkpoint 10 is damaged" in capsys.readouterr().err
    same_run(workdir, uninterrupted)


def test_checkpoint_of_another_structure_is_refused_and_kept(tmp_path, monkeypatch):
    # An unrolled ResNet's checkpoint (as written before ResNets scanned their blocks) does not
    # fit the scanned model the same config now builds: refused, never deleted as "unreadable".
    config = load_config(f"{TRAIN_CONFIG}:model=resnet20,image_size=8,steps=6,batch_size=32")
    config.checkpoint_every = 3
    monkeypatch.setitem(resnet.ResNet.__init__.__kwdefaults__, "scan", False)
    train(config, tmp_path, stop_after=3)
    monkeypatch.undo()
    with pytest.raises(ScalingError, match="checkpoint 3 .* does not fit .* it is kept"):
        train(config, tmp_path)
    assert "3" in {p.name for p in checkpoint_dirs(tmp_path)}


def test_partial_metrics_line_is_ignored(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]


def test_divergence_stops_the_trial(tmp_path):
    config = tiny()
    config.lr, config.weight_decay = 1e38, 0.0  # the first update overflows float32
    with pytest.raises(Diverged, match=r"loss became (nan|inf) by step \d+; last finite loss"):
        train(config, tmp_path)
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["diverged"] is True
    out = subprocess.run([sys.executable, "-m", "scaling.cli", "train", "--workdir",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == Diverged.exit_code and "diverged: loss became" in out.stderr


def test_same_seed_same_metrics(tmp_path, uninterrupted):
    train(tiny(), tmp_path)
    same_run(tmp_path, uninterrupted)


def test_batch_not_divisible_by_devices():
    code = f"""
from scaling import ScalingError
from scaling.config import load_config
from scaling.models import resnet
from scaling.train import train
config = load_config('{SPEC}'.replace('batch_size=32', 'batch_size=30'))
try:
    train(config, '/nonexistent/never-created')
except ScalingError as e:
    print(e)
"""
    assert "batch_size 30 is not divisible by 8 devices" in run_python(code, devices=8)


def test_missing_or_empty_dataset_folder(tmp_path):
    config = tiny()
    config.dataset = f"folder:{tmp_path / 'nope'}"
    with pytest.raises(ScalingError, match="does not exist"):
        train(config, tmp_path / "a")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    config.dataset = f"folder:{tmp_path / 'empty'}"
    with pytest.raises(ScalingError, match="no .jpg/.jpeg/.png images"):
        train(config, tmp_path / "b")


names = st.one_of(
    st.sampled_from(
        ["resnet", "wrn", "preact_resnet", "vgg", "densenet", "resnext", "seresnet", ""]
    ).flatmap(
        lambda p: st.builds(
            lambda a, b: f"{p}{a}{b}",
            st.integers(-3, 60),
            st.sampled_from(["", "_0", "_1", "_2", "_x"]),
        )  # fmt: skip
    ),
    st.text(max_size=12),
)
values = st.one_of(st.integers(-2, 3), st.floats(-1, 2), st.just(float("nan")),
                   st.text(max_size=5), st.none(), st.booleans())  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=names, key=st.sampled_from(["num_classes", "width_multiplier", "dropout", "norm",
                                        "shortcut", "block_dropout", "depth", "bogus"]),
       value=values)  # fmt: skip
def test_fuzz_model_names_and_settings(name, key, value):
    """Any name and setting either builds a model or raises one clear ScalingError."""
    try:
        model = models.abstract(name, **{key: value})
    except ScalingError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert models.count_params(model) > 0


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(["lr", "seed", "batch_size", "model.name", "optimizer.name",
                            "nope", "schedule.nope", "model.width_multiplier", "a.b.c"]),
       value=values)  # fmt: skip
def test_fuzz_config_overrides(key, value):
    """A trial override either applies or raises ScalingError, never another exception."""
    base = load_config(SPEC)
    try:
        config = sweep.apply_overrides(base, {key: value})
    except ScalingError as e:
        assert str(e)
    else:
        node = config
        for part in key.split("."):
            node = node[part]
        nan = isinstance(node, float) and math.isnan(node)
        assert node == value or nan or (isinstance(value, int) and node == float(value))


# ---- Issue 23: nothing of the user's lost ----
def tree(root):
    """{relative path: bytes} of every file under `root` (what a fault must leave alone)."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_overwrite_refuses_a_directory_it_did_not_create(tmp_path, monkeypatch):
    # A Hugging Face model directory: its config.json is not a run's.
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    before = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    for workdir in [".", str(tmp_path)]:
        out = scaling_cli_in(tmp_path, "train", *ARGS, "--workdir", workdir, "--overwrite")
        assert out.returncode == 2 and "not a scaling run directory" in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    assert tree(tmp_path) == before


def test_overwrite_clears_only_what_the_run_wrote(tmp_path, stopped):
    workdir = stopped(tmp_path / "run")
    (workdir / "notes.md").write_text("my notes")
    config = tiny()
    config.lr = 0.05
    with pytest.raises(ScalingError, match="different config .* --overwrite"):
        train(config, workdir)
    assert train(config, workdir, overwrite=True)["config"]["lr"] == 0.05
    assert (workdir / "notes.md").read_text() == "my notes"
    steps = [r["step"] for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(2, 25, 2))  # the old run's records are gone


def test_overwrite_never_clears_the_current_directory(tmp_path, monkeypatch, stopped):
    workdir = stopped(tmp_path / "run")
    before = tree(workdir)
    config = tiny()
    config.lr = 0.05
    monkeypatch.chdir(workdir / "checkpoints")
    with pytest.raises(ScalingError, match="refuses .* current directory"):
        train(config, workdir, overwrite=True)
    assert tree(workdir) == before


def test_stray_and_incomplete_checkpoints_are_skipped_not_deleted(tmp_path, uninterrupted, stopped):
    workdir = stopped(tmp_path / "run")
    (workdir / "checkpoints" / "25").mkdir()  # an empty step directory: never committed
    (workdir / "checkpoints" / "notes.txt").write_text("mine")
    out = scaling_cli_in(ROOT, "train", "--workdir", str(workdir))
    assert out.returncode == 0, out.stderr
    warnings = out.stderr.strip().splitlines()
    assert warnings == [
        "warning: checkpoint 25 is incomplete (orbax never committed it); kept as "
        "25.incomplete, trying the previous one"
    ]
    assert "resumed from step 10" in out.stdout
    assert (workdir / "checkpoints" / "25.incomplete").is_dir()
    assert (workdir / "checkpoints" / "notes.txt").read_text() == "mine"
    same_run(workdir, uninterrupted)


def test_a_checkpoint_that_does_not_fit_is_kept_and_named(tmp_path, digits_tree):
    # A folder dataset that gains a class between a stop and the rerun: the classifier no
    # longer fits. One line names the array; nothing is deleted; no silent restart from 0.
    data = tmp_path / "data"
    shutil.copytree(digits_tree, data, ignore=shutil.ignore_patterns("9"))
    config = tiny()
    config.dataset = f"folder:{data}"
    workdir = tmp_path / "run"
    train(config, workdir, stop_after=4)
    before = tree(workdir)
    shutil.copytree(digits_tree / "train" / "9", data / "train" / "9")
    shutil.copytree(digits_tree / "test" / "9", data / "test" / "9")
    with pytest.raises(ScalingError) as error:
        train(config, workdir)
    message = str(error.value)
    assert "checkpoint 4" in message and "head/" in message and "9" in message
    assert "\n" not in message
    assert tree(workdir) == before


def test_a_corrupted_checkpoint_is_detected_and_the_previous_used(tmp_path, uninterrupted, stopped):
    workdir = stopped(tmp_path / "run")
    chunks = (workdir / "checkpoints" / "10").rglob("*")
    biggest = max((p for p in chunks if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
    biggest.write_bytes(bytes(data))
    out = scaling_cli_in(ROOT, "train", "--workdir", str(workdir))
    assert out.returncode == 0, out.stderr
    [warning] = out.stderr.strip().splitlines()  # one line, not orbax's thousands
    assert warning.startswith("warning: checkpoint 10 is damaged (") and "10.damaged" in warning
    assert "resumed from step 8" in out.stdout
    same_run(workdir, uninterrupted)


def test_one_writer_per_run_directory(tmp_path, stopped):
    workdir = stopped(tmp_path / "run")
    before = tree(workdir)
    with rundir.lock(workdir):  # as a trainer running in it would hold it
        out = scaling_cli_in(ROOT, "train", "--workdir", str(workdir))
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"scaling train: error: another process is training in {workdir}; wait for it or stop it"
    ]
    assert tree(workdir) == before


def scaling_cli_in(cwd, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "scaling.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


# ---- A trial is done only with its summary.json ----
STUDY = """
import ml_collections
from scaling import sweep
from scaling.config import load_config
def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.base = load_config('{spec}')
    c.base.log_every, c.base.checkpoint_every = 2, 4
    c.trials = sweep.axis('seed', {seeds})
    return c
"""


def start_sweep(tmp_path, seeds):
    study = tmp_path / "study.py"
    study.write_text(STUDY.format(spec=SPEC, seeds=seeds))
    args = [sys.executable, "-m", "scaling.cli", "sweep", "--config", str(study),
            "--workdir", str(tmp_path / "w")]  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    return proc, args


def trainer_pid(trial_dir):
    """The pid of the `scaling train` process working in `trial_dir` (Linux /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in cmdline and str(trial_dir).encode() in cmdline:
            return int(proc.name)
    return None


def test_sweep_trial_stopped_by_sigterm_stays_pending(tmp_path):
    proc, _ = start_sweep(tmp_path, seeds=[0, 1])
    trial = tmp_path / "w" / "seed=0"
    assert wait_for(lambda: len(read_metrics(trial / "metrics.jsonl")) >= 2, proc)
    os.kill(trainer_pid(trial), signal.SIGTERM)  # the trainer alone, as a preempted job
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 1, err  # not everything finished
    index = sweep.read_index(tmp_path / "w")
    assert (
        index["seed=0"]["state"] == "pending" and "stopped by SIGTERM" in index["seed=0"]["error"]
    )
    assert index["seed=1"]["state"] == "done"  # the sweep carried on; a rerun resumes seed 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_sweep_stops_cleanly_and_resumes(tmp_path, signum, uninterrupted):
    proc, args = start_sweep(tmp_path, seeds=[0])
    trial = tmp_path / "w" / "seed=0"
    assert wait_for(lambda: len(read_metrics(trial / "metrics.jsonl")) >= 2, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == Stopped.exit_code, err
    assert "Traceback" not in err and "Traceback" not in (trial / "train.log").read_text()
    assert err.strip().splitlines()[-1] == (
        f"scaling sweep: stopped by {signal.Signals(signum).name}; 1 trial(s) pending; "
        "run the same command to resume"
    )
    assert sweep.read_index(tmp_path / "w")["seed=0"]["state"] == "pending"
    if signum == signal.SIGTERM:
        return  # the resume below is the same after either signal
    rerun = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    same_run(trial, uninterrupted)  # seed 0 is the uninterrupted run's config


def test_killed_trainer_is_retried_once_then_reported(tmp_path, monkeypatch):
    trial = tmp_path / "t"
    trial.mkdir()
    calls = []

    def killed(self, args, log, lock_fd):
        calls.append(args)
        log.write(f"step {len(calls)}: allocating\n")
        return -signal.SIGKILL

    monkeypatch.setattr(sweep.Trainers, "run", killed)
    state, note = sweep.run_trial(trial)
    assert len(calls) == 2 and state == "failed"
    assert note.startswith("killed by SIGKILL 2 times (out of memory?); last lines: ")
    assert "step 2: allocating" in note

    def killed_once(self, args, log, lock_fd):
        calls.append(args)
        if len(calls) == 3:
            return -signal.SIGKILL
        (trial / "summary.json").write_text("{}")
        return 0

    monkeypatch.setattr(sweep.Trainers, "run", killed_once)
    assert sweep.run_trial(trial) == ("done", None) and len(calls) == 4
