"""Reliability: kills, SIGTERM, damaged checkpoints, divergence, fuzzed bad input."""

import json
import math
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TRAIN_CONFIG, run_python
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scaling import Diverged, ScalingError, Stopped, models, sweep
from scaling.config import load_config
from scaling.models import resnet
from scaling.train import read_metrics, train

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


def test_sigkill_at_five_moments_then_resume(tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    moments = [
        lambda: any(".orbax-checkpoint-tmp" in p.name for p in checkpoint_dirs(workdir)),
        lambda: len(read_metrics(workdir / "metrics.jsonl")) >= 3,
        lambda: any(p.name == "12" for p in checkpoint_dirs(workdir)),
        lambda: len(read_metrics(workdir / "metrics.jsonl")) >= 8,
        lambda: (workdir / "config.json").exists(),  # before any step
    ]
    killed = 0
    for moment in moments:
        proc = start(workdir)
        if wait_for(moment, proc):
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait()
    assert killed >= 4  # the moments race a short run; most must land
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


def test_damaged_checkpoint_falls_back(tmp_path, uninterrupted, capsys):
    workdir = tmp_path / "run"
    assert train(tiny(), workdir, stop_after=10) is None  # checkpoints at steps 4, 8 and 10
    latest = workdir / "checkpoints" / "10"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncate every file
    train(tiny(), workdir)
    assert "checkpoint 10 is unreadable" in capsys.readouterr().err
    same_run(workdir, uninterrupted)


def test_checkpoint_of_another_structure_is_refused_and_kept(tmp_path, monkeypatch):
    # An unrolled ResNet's checkpoint (as written before ResNets scanned their blocks) does not
    # fit the scanned model the same config now builds: refused, never deleted as "unreadable".
    config = load_config(f"{TRAIN_CONFIG}:model=resnet20,image_size=8,steps=6,batch_size=32")
    config.checkpoint_every = 3
    monkeypatch.setitem(resnet.ResNet.__init__.__kwdefaults__, "scan", False)
    train(config, tmp_path, stop_after=3)
    monkeypatch.undo()
    with pytest.raises(ScalingError, match="checkpoint 3 .* model.scan=False"):
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
    st.sampled_from(["resnet", "wrn", "preact_resnet", "vgg", ""]).flatmap(
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
