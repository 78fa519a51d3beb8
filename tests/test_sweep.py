"""Sweeps: combinators, stable trial names, resumable runs, failures, multi-host, launchers."""

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, one_line_exit_2, scaling_cli

from scaling import ScalingError, cli, sweep
from scaling.config import load_config
from scaling.launch import Launch, hosts, skypilot_tasks, tpu_commands
from scaling.rundir import read_metrics
from scaling.train import train

WRN_STUDY = str(ROOT / "configs" / "wrn_width_depth.py")
TINY = "depths=10,widths=1+2,seeds=2,steps=6,image_size=8,batch_size=32"


def test_combinators():
    grid = sweep.product(sweep.axis("a", [1, 2]), sweep.axis("b", "xyz"))
    assert len(grid) == 6 and grid[0] == {"a": 1, "b": "x"} and grid[-1] == {"a": 2, "b": "z"}
    pairs = sweep.paired(sweep.axis("a", [1, 2]), sweep.axis("b", [3, 4]))
    assert pairs == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    both = sweep.chain(pairs, sweep.fixed({"a": 9}))
    assert both == [{"a": 1, "b": 3}, {"a": 2, "b": 4}, {"a": 9}]
    assert sweep.product(both, sweep.fixed({"c": 0}))[2] == {"a": 9, "c": 0}
    with pytest.raises(ScalingError, match="equal lengths"):
        sweep.paired(sweep.axis("a", [1, 2]), sweep.axis("b", [3]))


def test_trial_names_are_stable_and_readable():
    assert sweep.trial_name({"model.name": "wrn16_4", "seed": 0}) == "name=wrn16_4,seed=0"
    assert sweep.trial_name({"lr": 0.1, "model.depths": (2, 3)}) == "lr=0.1,depths=2x3"
    # The same last component twice: the full keys keep the name unambiguous.
    assert sweep.trial_name({"a.name": 1, "b.name": 2}) == "a.name=1,b.name=2"
    long = sweep.trial_name({"x": "y" * 300})
    assert len(long) <= 120 and long == sweep.trial_name({"x": "y" * 300})
    assert sweep.trial_name({"path": "a/b c"}) == "path=a_b_c"


def test_overrides_must_name_existing_keys():
    study = load_config(f"{WRN_STUDY}:{TINY}")
    trials = sweep.expand(study)
    assert [t.config.model.name for t in trials] == ["wrn10_1", "wrn10_1", "wrn10_2", "wrn10_2"]
    assert [t.config.seed for t in trials] == [0, 1, 0, 1]
    config = sweep.apply_overrides(study.base, {"model.width_multiplier": 0.5, "lr": 0.2})
    assert config.model.width_multiplier == 0.5 and config.lr == 0.2 and study.base.lr == 0.1
    with pytest.raises(ScalingError, match="does not exist"):
        sweep.apply_overrides(study.base, {"learning_rate": 0.1})
    with pytest.raises(ScalingError, match="batch_size"):
        sweep.apply_overrides(study.base, {"batch_size": "large"})
    study.trials = study.trials + study.trials[:1]
    with pytest.raises(ScalingError, match="same trial twice"):
        sweep.expand(study)


def test_dry_run_lists_without_running(tmp_path):
    out = scaling_cli("sweep", "--config", f"{WRN_STUDY}:{TINY}", "--workdir", str(tmp_path / "w"),
                      "--dry-run")  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"4 trials in {tmp_path / 'w'}"
    assert lines[1].split() == [
        "name=wrn10_1,seed=0",
        '{"model.name":',
        '"wrn10_1",',
        '"seed":',
        "0}",
    ]
    assert not (tmp_path / "w").exists()


def _sweep_args(workdir, study=f"{WRN_STUDY}:{TINY}"):
    return [
        sys.executable,
        "-m",
        "scaling.cli",
        "sweep",
        "--config",
        study,
        "--workdir",
        str(workdir),
    ]


@pytest.mark.slow
def test_killed_sweep_finishes_on_rerun(tmp_path, capsys):
    workdir = tmp_path / "study"
    study = f"{WRN_STUDY}:depths=10,widths=1,seeds=3,steps=6,image_size=8,batch_size=32"
    first, second = workdir / "name=wrn10_1,seed=0", workdir / "name=wrn10_1,seed=1"
    proc = subprocess.Popen(_sweep_args(workdir, study), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240

    # Kill everything (sweep and trial) once the second trial has finished a checkpoint (orbax
    # writes into a temporary directory and renames it to the step number when complete).
    def checkpointed():
        ckpts = second / "checkpoints"
        return ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())

    while not checkpointed():
        assert time.time() < deadline and proc.poll() is None, "the sweep ended too soon"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (second / "summary.json").exists()
    index = sweep.read_index(workdir)
    assert index[second.name]["state"] == "running"  # as the kill left it
    finished = (first / "summary.json").stat().st_mtime_ns

    rerun = subprocess.run([*_sweep_args(workdir, study), "--parallel", "2"], cwd=ROOT,
                           capture_output=True, text=True)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert "3 trials: 1 finished or skipped, 2 to run" in rerun.stdout
    assert (first / "summary.json").stat().st_mtime_ns == finished  # untouched
    assert "resumed from step" in (second / "train.log").read_text()
    for trial in workdir.iterdir():
        if trial.is_dir():
            steps = [r["step"] for r in read_metrics(trial / "metrics.jsonl") if "loss" in r]
            assert steps == [1, 2, 3, 4, 5, 6], trial  # done exactly once, no step twice
            assert json.loads((trial / "summary.json").read_text())["steps"] == 6
    assert {r["state"] for r in sweep.read_index(workdir).values()} == {"done"}

    # A third run has nothing to do; a changed study is refused, not mixed in.
    cli.main(_sweep_args(workdir, study)[3:])  # in this process: no trainer to start
    assert "3 finished or skipped, 0 to run" in capsys.readouterr().out
    changed = ["sweep", "--config", study, "--config.base.lr=0.5", "--workdir", str(workdir)]
    assert "the study changed: 3 trial(s)" in one_line_exit_2(changed, capsys)


@pytest.mark.slow
def test_failing_trial_does_not_stop_the_others(tmp_path, capsys):
    study_file = tmp_path / "study.py"
    study_file.write_text(
        "import ml_collections\n"
        "from scaling import sweep\n"
        "from scaling.config import load_config\n"
        "def get_config(arg=None):\n"
        "    c = ml_collections.ConfigDict()\n"
        f"    c.base = load_config('{ROOT}/configs/train.py:model=resnet8,image_size=8,steps=3,"
        "batch_size=32')\n"
        "    c.base.log_every = 1\n"
        "    c.trials = sweep.chain(sweep.axis('model.name', ['resnet9', 'resnet8']),\n"
        "                           sweep.fixed({'lr': 1e38, 'weight_decay': 0.0}))\n"
        "    return c\n"
    )
    args = _sweep_args(tmp_path / "w", str(study_file))
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1  # not everything finished
    index = sweep.read_index(tmp_path / "w")
    assert index["name=resnet8"]["state"] == "done"
    assert index["name=resnet9"]["state"] == "failed"
    assert "6n+2" in index["name=resnet9"]["error"]
    diverged = index["lr=1e+38,weight_decay=0"]
    assert diverged["state"] == "diverged" and "loss became" in diverged["error"]
    assert "1 done, 1 failed, 1 diverged" in out.stdout
    assert "best: name=resnet8 (test accuracy" in out.stdout
    with pytest.raises(SystemExit) as end:  # in this process: no trainer to start
        cli.main(args[3:])
    assert end.value.code == 1 and "0 to run" in capsys.readouterr().out  # until --retry-failed
    retry = subprocess.run([*args, "--retry-failed"], cwd=ROOT, capture_output=True, text=True)
    assert "2 to run" in retry.stdout and "name=resnet9: failed" in retry.stdout


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, digits_tree):
    """Two JAX processes (one CPU device each, gloo collectives) = one process, same batch, each
    decoding its share from disk. The in-memory reading splits its batches across processes with
    the same code (`pipeline`); the 8-device test covers the batches gathered on the devices."""
    config = "configs/train.py:model=resnet8,image_size=16,steps=6,batch_size=64,lr=0.01"
    base = [sys.executable, "-m", "scaling.cli", "train", "--config", config,
            f"--config.dataset=folder:{digits_tree}", "--config.log_every=1",
            "--config.checkpoint_every=3"]  # fmt: skip
    one = load_config(f"{ROOT}/{config}")  # in this process, as `scaling train` would run it
    one.update(dataset=f"folder:{digits_tree}", log_every=1, checkpoint_every=3)
    train(one, tmp_path / "one")
    expected = [r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    for reading, flags in [("stream", ["--config.stream=True"])]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        workdir = tmp_path / reading
        procs = [
            subprocess.Popen([*base, *flags, "--workdir", str(workdir), "--coordinator",
                              f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
                              str(i)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for i in range(2)
        ]  # fmt: skip
        outputs = [p.communicate(timeout=240)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        assert json.loads((workdir / "summary.json").read_text())["devices"] == 2
        losses = [r["loss"] for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r]
        assert len(losses) == 6, reading  # one metrics writer: no line written twice
        # Equal to float rounding at first, then compounding slowly (see the 8-device test).
        np.testing.assert_allclose(expected[:3], losses[:3], rtol=1e-4, err_msg=reading)
        np.testing.assert_allclose(expected, losses, rtol=2e-3, err_msg=reading)


def _launch(accelerator, **kw):
    settings = dict(study=["--config", "configs/wrn_width_depth.py:seeds=2"], name="wrn",
                    zone="us-central2-b", bucket="gs://bkt/studies", num_trials=18)  # fmt: skip
    return Launch(accelerator=accelerator, **{**settings, **kw})


def test_launcher_single_host_v4_8():
    commands = [" ".join(c) for c in tpu_commands(_launch("v4-8"))]
    assert commands[0] == "git archive --format=tar.gz -o scaling-src.tar.gz HEAD"
    assert commands[1] == (
        "gcloud compute tpus tpu-vm create wrn --zone us-central2-b --accelerator-type v4-8 "
        "--version tpu-ubuntu2204-base --spot"
    )
    assert "--worker=all" in commands[2] and "scp scaling-src.tar.gz wrn:~/" in commands[2]
    assert 'pip install -q -e ".[tpu]"' in commands[3]
    run = commands[4]
    assert "gcsfuse --implicit-dirs --only-dir studies bkt ~/bucket" in run
    assert run.endswith(
        "scaling sweep --config configs/wrn_width_depth.py:seeds=2 --workdir ../bucket/wrn "
        "--shard 0/1"
    )  # one host: no --distributed
    assert commands[5] == "gcloud compute tpus tpu-vm delete wrn --zone us-central2-b --quiet"
    assert commands[6] == "gcloud storage rsync -r gs://bkt/studies/wrn runs/wrn"
    assert len(commands) == 7


def test_launcher_multi_host_v4_32_split_across_vms():
    assert hosts("v4-8") == 1 and hosts("v4-32") == 4 and hosts("v5p-128") == 16
    commands = [" ".join(c) for c in tpu_commands(_launch("v4-32", trials_per_vm=5, queued=True))]
    creates = [c for c in commands if " create " in c]
    assert len(creates) == 4  # 18 trials, 5 per VM
    assert creates[3] == (
        "gcloud compute tpus queued-resources create wrn-3 --node-id wrn-3 --zone us-central2-b "
        "--accelerator-type v4-32 --runtime-version tpu-ubuntu2204-base --spot"
    )
    runs = [c for c in commands if "scaling sweep" in c]
    assert [r.split("--shard ")[1] for r in runs] == [f"{i}/4 --distributed" for i in range(4)]
    assert all("--worker=all" in r for r in runs)
    assert sum("queued-resources delete" in c for c in commands) == 4


def test_skypilot_tasks_parse_and_their_run_command_runs_the_shard(tmp_path):
    """Each shard's task, read by SkyPilot's own parser: a spot TPU slice with job recovery, the
    bucket mounted at /results, and the shard's sweep; that command, run here with a directory
    standing in for the bucket, trains its shard's trial."""
    sky = pytest.importorskip("sky")
    study = f"{WRN_STUDY}:depths=10,widths=1+2,seeds=1,steps=2,image_size=8,batch_size=32"
    argv = ["launch", "sky", "--config", study, "--name", "wrn", "--zone", "us-central2-b",
            "--accelerator", "v4-32", "--bucket", "gs://bkt/studies", "--trials-per-vm", "1",
            "--out", str(tmp_path / "tasks")]  # fmt: skip
    out = scaling_cli(*argv)
    assert out.returncode == 0, out.stderr
    files = sorted((tmp_path / "tasks").iterdir())
    assert out.stdout.splitlines() == [f"sky jobs launch {f}" for f in files]
    assert [f.name for f in files] == ["wrn-0.yaml", "wrn-1.yaml"]  # two trials, one per VM
    for i, file in enumerate(files):
        task = sky.Task.from_yaml(str(file))
        (resources,) = task.resources
        assert (task.name, resources.accelerators, resources.use_spot) == (
            f"wrn-{i}", {"tpu-v4-32": 1}, True)  # fmt: skip
        assert resources.zone == "us-central2-b"
        assert resources.accelerator_args["runtime_version"] == "tpu-ubuntu2204-base"
        assert resources.job_recovery == {"strategy": "FAILOVER", "max_restarts_on_errors": 3}
        mount = task.storage_mounts["/results"]
        assert (mount.source, mount.mode.name) == ("gs://bkt/studies", "MOUNT")
        assert task.run == (f"scaling sweep --config {study} --workdir /results/wrn "
                            f"--shard {i}/2 --distributed")  # v4-32: four hosts  # fmt: skip
    bucket = tmp_path / "bucket"
    run = task.run.replace("/results", str(bucket)).replace(" --distributed", "")  # one host here
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    done = subprocess.run(run, shell=True, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in (bucket / "wrn").iterdir() if p.is_dir()] == ["name=wrn10_2,seed=0"]
    assert (bucket / "wrn" / "name=wrn10_2,seed=0" / "summary.json").exists()
    # An existing file of other content is never written over.
    (tmp_path / "tasks" / "wrn-1.yaml").write_text("# mine\n")
    assert "exists with other content" in scaling_cli(*argv).stderr
    assert (tmp_path / "tasks" / "wrn-1.yaml").read_text() == "# mine\n"


def test_bad_launches():
    with pytest.raises(ScalingError, match="unknown accelerator"):
        _launch("a100-8")
    with pytest.raises(ScalingError, match="gs://"):
        Launch(["--config", "x.py"], "wrn", "z", "v4-8", "s3://b", num_trials=1)
    out = scaling_cli("launch", "tpu", "--config", WRN_STUDY, "--name", "Bad_Name", "--zone", "z",
                      "--accelerator", "v4-8", "--bucket", "gs://b")  # fmt: skip
    assert out.returncode == 2 and "--name" in out.stderr


@pytest.mark.parametrize("accelerator", ["v4-0", "v4-7", "v5p-12", "tpu-v4-8", "v4-08", "v4-4"])
def test_launcher_refuses_slices_that_do_not_exist(accelerator):
    with pytest.raises(ScalingError, match=f"unknown accelerator '{accelerator}'; valid: v2-N, "
                       "v3-N, v4-N or v5p-N, N TensorCores: a positive multiple of 8"):  # fmt: skip
        _launch(accelerator)


def test_launcher_accepts_whole_hosts():
    for accelerator, count in [("v4-8", 1), ("v4-32", 4), ("v5p-16", 2), ("v2-8", 1), ("v3-32", 4)]:
        assert hosts(accelerator) == count
        assert _launch(accelerator).accelerator == accelerator
    for zone in ("us-central2-b", "europe-west4-a", "northamerica-northeast1-c"):
        assert _launch("v4-8", zone=zone).zone == zone
    for bucket in ("gs://bkt", "gs://my.bkt_1-x/a-b/c.d/", "gs://123/Runs_2"):
        assert _launch("v4-8", bucket=bucket).bucket == bucket


@pytest.mark.parametrize("bucket", ["gs://b; touch /tmp/x", "gs://B", "gs://ok/../x", "gs://ok/./x",
                                    "gs://bk", "gs://-bkt", "gs://bkt/a b", "gs://bkt/$(id)",
                                    "gs://bkt//x", "gs://bkt\nfoo: bar", "s3://bkt"])  # fmt: skip
def test_launcher_refuses_bad_buckets(bucket):
    with pytest.raises(ScalingError, match=r"--bucket .* is not valid; give gs://BUCKET\[/PATH\]"):
        _launch("v4-8", bucket=bucket)


@pytest.mark.parametrize("zone", ["us-central2-b\nfoo: bar", "z", "US-central2-b", "us-central2",
                                  "us-central2-b; id", "us-central2-b ", ""])  # fmt: skip
def test_launcher_refuses_bad_zones(zone):
    with pytest.raises(ScalingError, match="is not a Google Cloud zone; give REGION-ZONE such as"):
        _launch("v4-8", zone=zone)


def _mount_words(spec):
    """The words of the gcsfuse mount in the remote command of each VM, as its shell splits it."""
    remote = [c[-1] for c in tpu_commands(spec) if "--command" in c]
    return [shlex.split(c.split(" && cd scaling")[0]) for c in remote if "gcsfuse" in c]


def test_launcher_values_are_quoted_where_they_land():
    yaml = pytest.importorskip("yaml")
    spec = _launch("v4-32", zone="europe-west4-a", bucket="gs://my.bkt_1/a-b/c.d")
    (task,) = map(yaml.safe_load, skypilot_tasks(spec).values())
    assert list(task) == ["name", "resources", "workdir", "file_mounts", "setup", "run"]
    assert task["resources"]["zone"] == "europe-west4-a"
    assert task["file_mounts"] == {"/results": {"source": "gs://my.bkt_1/a-b/c.d", "mode": "MOUNT"}}
    assert shlex.split(task["run"]) == [
        *("scaling", "sweep", "--config", "configs/wrn_width_depth.py:seeds=2"),
        *("--workdir", "/results/wrn", "--shard", "0/1", "--distributed"),
    ]
    (words,) = _mount_words(spec)
    assert words[-4:] == ["--only-dir", "a-b/c.d", "my.bkt_1", "~/bucket)"]
    # Validation keeps hostile values out; quoting alone still holds them (defence in depth).
    spec.bucket, spec.zone = "gs://b; touch x$(id)/a b;`id`", "us-central2-b\nfoo: bar"
    (task,) = map(yaml.safe_load, skypilot_tasks(spec).values())
    assert list(task) == ["name", "resources", "workdir", "file_mounts", "setup", "run"]
    assert task["resources"]["zone"] == spec.zone
    assert task["file_mounts"]["/results"]["source"] == spec.bucket
    (words,) = _mount_words(spec)
    assert words[-4:] == ["--only-dir", "a b;`id`", "b; touch x$(id)", "~/bucket)"]


def test_launch_command_line_refuses_bad_values_in_one_line(capsys):
    from scaling import cli

    good = {"--zone": "us-central2-b", "--bucket": "gs://bkt", "--accelerator": "v4-8"}
    bad = [("--zone", "us-central2-b\nfoo: bar", "--zone 'us-central2-b\\nfoo: bar' is not"),
           ("--bucket", "gs://b; touch /tmp/x", "--bucket 'gs://b; touch /tmp/x' is not valid"),
           ("--accelerator", "v4-7", "unknown accelerator 'v4-7'")]  # fmt: skip
    for target in ("tpu", "sky"):
        for flag, value, message in bad:
            options = [word for key, v in {**good, flag: value}.items() for word in (key, v)]
            with pytest.raises(SystemExit) as exit:
                cli.main(["launch", target, "--config", WRN_STUDY, "--name", "wrn", *options])
            out, err = capsys.readouterr()
            assert exit.value.code == 2 and out == ""
            assert err.count("\n") == 1 and err.startswith(f"scaling launch: error: {message}")


@pytest.mark.parametrize("study", sorted(p.name for p in (ROOT / "configs").glob("*.py")
                                         if p.name != "train.py"))  # fmt: skip
def test_example_studies_expand_to_buildable_models(study):
    from scaling import models

    light = {"scaling_strategies.py": ":budgets=2,strategies=w+dWr,samples=3"}  # solving takes long
    trials = sweep.expand(load_config(str(ROOT / "configs" / study) + light.get(study, "")))
    assert len(trials) >= 4
    built = {}
    for t in trials:
        settings = {k: v for k, v in t.config.model.items() if k != "name"}
        key = json.dumps([t.config.model.name, settings], sort_keys=True, default=str)
        if key not in built:  # each distinct model once, shapes only
            model = models.abstract(t.config.model.name, image_size=t.config.image_size, **settings)
            built[key] = models.count_params(model)
    assert all(n > 0 for n in built.values())


def test_efficientnet_compound_arms_double_the_macs():
    """The study's precomputed multipliers still give ~2x the baseline's multiply-adds."""
    import importlib.util

    from scaling import flops, models

    spec = importlib.util.spec_from_file_location(
        "study", ROOT / "configs/efficientnet_compound.py"
    )
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    ratios = {}
    for arm, overrides in study.arms().items():
        settings = {k.split(".")[1]: v for k, v in overrides.items() if k.startswith("model.")}
        model = models.abstract("efficientnet_b0_cifar", num_classes=10, **settings)
        ratios[arm] = flops.macs_and_activations(model, overrides.get("image_size", 32))[0]
    ratios = {arm: macs / ratios["baseline"] for arm, macs in ratios.items()}
    assert all(1.95 < r < 2.2 for arm, r in ratios.items() if arm != "baseline"), ratios


def test_progress_counts_each_state_and_estimates_the_time_left(tmp_path):
    from conftest import run_python

    records = {
        "a": dict(state="done", started=0.0, ended=60.0),
        "b": dict(state="done", started=10.0, ended=130.0),
        "c": dict(state="running", started=130.0),
        "d": dict(state="pending"),
        "e": dict(state="failed", error="exit status 1: boom", started=0.0, ended=5.0),
    }
    line = sweep.progress(records, parallel=2)
    # 3 of 5 finished; two left at a mean of 90 s each, two at a time: 1.5 min, rounded.
    assert line == (
        "[############........] 3/5: 1 pending, 1 running, 2 done, 1 failed; about 2 min left"
    )
    sweep.write_index(tmp_path, {k: {"name": k, **v} for k, v in records.items()})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.jsonl").write_text('{"step": 40, "loss": 1.0}\n')
    out = run_python(
        f"import sys; from scaling import cli; cli.main(['status', {str(tmp_path)!r}]); "
        "assert 'jax' not in sys.modules, 'status imported JAX'"
    )
    assert out.splitlines() == [
        f"{tmp_path}: [############........] 3/5: 1 pending, 1 running, 2 done, 1 failed; "
        "about 3 min left",
        "  running  c: step 40",
        "  failed   e: exit status 1: boom",
    ]


FAKE = f"""#!{sys.executable}
# Records each call (its arguments, as JSON); the call numbered $FAIL_AT fails.
import json, os, sys
with open(os.environ["CALLS"], "a") as calls:
    calls.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
with open(os.environ["CALLS"]) as calls:
    sys.exit(sum(1 for _ in calls) == int(os.environ["FAIL_AT"]))
"""


@pytest.mark.parametrize("accelerator, fail_at", [("v4-8", 0), ("v4-32", 0), ("v4-32", 3)])
def test_launch_execute_runs_each_command_and_stops_at_the_first_failure(
    tmp_path, monkeypatch, capsys, accelerator, fail_at
):
    """`--execute` against a fake gcloud (and git) on PATH: every call in order, for one host
    and for a queued multi-host slice split across VMs; a failing call stops the rest."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "git"):
        (bin_dir / tool).write_text(FAKE)
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("CALLS", str(tmp_path / "calls"))
    monkeypatch.setenv("FAIL_AT", str(fail_at))
    options = ["--name", "wrn", "--zone", "us-central2-b", "--accelerator", accelerator,
               "--bucket", "gs://bkt/studies", "--execute"]  # fmt: skip
    if accelerator == "v4-32":
        options += ["--queued", "--trials-per-vm", "5"]  # 9 trials: two VMs
    with pytest.raises(SystemExit) if fail_at else contextlib.nullcontext() as stopped:
        cli.main(["launch", "tpu", "--config", WRN_STUDY, *options])
    calls = [json.loads(line) for line in (tmp_path / "calls").read_text().splitlines()]
    multi = dict(queued=True, trials_per_vm=5) if accelerator == "v4-32" else {}
    expected = tpu_commands(_launch(accelerator, study=["--config", WRN_STUDY], num_trials=9,
                                    **multi))  # fmt: skip
    err = capsys.readouterr().err
    if not fail_at:
        assert calls == expected and err == ""
        kinds = [c[3] for c in calls if "create" in c]
        assert kinds == (["tpu-vm"] if accelerator == "v4-8" else ["queued-resources"] * 2)
        return
    assert calls == expected[:fail_at] and stopped.value.code == 1
    failed = shlex.join(expected[fail_at - 1])
    assert err.count("\n") == 1 and f"`{failed}` exited with status 1" in err
