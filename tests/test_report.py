"""Reports: results as a DataFrame, scaling-law fits, figures, partial sweeps."""

import json

import numpy as np
import pytest
from conftest import scaling_cli
from PIL import Image

from scaling import ScalingError, report, results, sweep, train

GRID = [(10, 1), (10, 2), (16, 1), (16, 2)]  # WRN depth x widening factor


def copy_run(sweep_dir, source, model, **summary):
    """A copy of trial `source`'s files (checkpoints and events left out) as a trial of `model`,
    its summary (if any) updated with `summary`; returns its name."""
    import shutil

    name = sweep.trial_name({"model.name": model})
    shutil.copytree(sweep_dir / source, sweep_dir / name,
                    ignore=shutil.ignore_patterns("checkpoints", "events.*"))  # fmt: skip
    for file, update in [("config.json", {}), ("summary.json", summary)]:
        if (sweep_dir / name / file).exists():
            record = json.loads((sweep_dir / name / file).read_text())
            record.update(update, **({"model": model} if file == "summary.json" else {}))
            if file == "config.json":
                record["model"]["name"] = model
            (sweep_dir / name / file).write_text(json.dumps(record))
    return name


@pytest.fixture(scope="module")
def synthetic_sweep(tmp_path_factory):
    """A 2x2 WRN sweep on synthetic data, indexed as `scaling sweep` does: four finished trials,
    one stopped half-way (running) and one not started (pending). One, wrn10_1, is trained for
    real (in this process, to save the interpreter start); the others are copies of its files as
    their own model, with their own parameter counts: wrn10_4 as it was half-way."""
    from conftest import TRAIN_CONFIG

    from scaling import models
    from scaling.config import load_config

    workdir = tmp_path_factory.mktemp("sweep")
    config = load_config(f"{TRAIN_CONFIG}:dataset=synthetic,image_size=8,steps=4,batch_size=32")
    config.model.name, config.log_every, config.checkpoint_every = "wrn10_1", 1, 2
    real = workdir / "name=wrn10_1"
    real.mkdir()
    (real / "config.json").write_text(json.dumps(train.json_config(config)))
    train.train(config, real, stop_after=2)
    records = {}

    def record(model, state):
        name = sweep.trial_name({"model.name": model})
        records[name] = dict(name=name, state=state, error=None, overrides={"model.name": model})

    copy_run(workdir, real.name, "wrn10_4")
    record("wrn10_4", "running")
    train.train(config, real)  # to the end
    for depth, width in GRID:
        model = f"wrn{depth}_{width}"
        if model != "wrn10_1":
            copy_run(workdir, real.name, model, params=models.count_params(models.abstract(model)))
        record(model, "done")
    record("wrn16_4", "pending")
    sweep.write_index(workdir, records)
    return workdir


def test_dataframe_has_one_row_per_trial(synthetic_sweep):
    df = results.load(synthetic_sweep)
    assert len(df) == 6
    assert sorted(df.status) == ["done"] * 4 + ["pending", "running"]
    done = df[df.status == "done"]
    for column in ["model", "arch", "family", "depth", "width", "params", "flops", "activations",
                   "train_accuracy", "test_accuracy", "train_loss", "test_loss",
                   "generalization_gap", "wall_seconds", "images_per_second", "examples_seen",
                   "seed", "test_error"]:  # fmt: skip
        assert done[column].notna().all(), column
    assert sorted(zip(done.depth, done.width, strict=True)) == GRID
    assert set(done.family) == {"wrn"} and (done.examples_seen == 4 * 32).all()
    assert (done.params > 0).all() and done.params.nunique() == 4
    running = df[df.status == "running"].iloc[0]
    assert running.steps_done == 2 and running.running_loss > 0


def test_report_writes_files_and_figures(synthetic_sweep, tmp_path):
    result = scaling_cli("report", str(synthetic_sweep), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert f"report: {out / 'REPORT.md'}" in result.stdout
    text = (out / "REPORT.md").read_text()
    assert "6 trials: 4 done, 1 running, 1 pending." in text
    assert "`name=wrn10_4` running: step 2" in text
    for name in ["heatmap", "pareto", "generalization", "curves"]:
        assert f"![{name}.png]({name}.png)" in text
        width, height = Image.open(out / f"{name}.png").size
        assert (width, height) == tuple(round(s * report.DPI) for s in report.SIZES[name])
    assert not (out / "data_efficiency.png").exists()  # one training-set size: nothing to draw
    assert len((out / "runs.csv").read_text().splitlines()) == 1 + 6
    # The copy of the run records rebuilds the same report, in place.
    again = scaling_cli("report", str(out / "runs"), "--out", str(out))
    assert again.returncode == 0, again.stderr
    rebuilt = (out / "REPORT.md").read_text()
    assert rebuilt.startswith("# Report: out\n")  # named after the study the copy is in
    assert rebuilt.split("\n", 1)[1] == text.split("\n", 1)[1]
    assert sorted(results.load(out / "runs").trial) == sorted(results.load(synthetic_sweep).trial)


def test_bad_report_directory_is_one_line_error(tmp_path):
    result = scaling_cli("report", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"scaling report: error: no such results directory: {tmp_path}/missing"
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScalingError, match="no trials found"):
        results.load(tmp_path / "empty")


@pytest.mark.parametrize("d", [0.0, 0.7])
def test_power_law_fit_recovers_known_parameters(d):
    x = np.geomspace(1e3, 1e6, 8)
    a, b, c = 0.6, 0.45, 0.05
    err = power = a * (x / x[0] + d) ** -b + c
    noise = np.random.default_rng(0).normal(0, 1e-4, (3, len(x)))  # three seeds per x
    fit = report.fit_power_law(np.tile(x, 3), (power + noise).ravel())
    assert fit.converged, fit.message
    assert fit.params["b"] == pytest.approx(b, rel=0.05)
    assert fit.params["c"] == pytest.approx(c, abs=0.01)
    assert fit.params["d"] == pytest.approx(d, abs=0.1)
    assert np.max(np.abs(fit.residuals)) < 1e-3 and len(fit.residuals) == 24
    assert np.allclose(fit(x), err, atol=1e-3)


def test_power_law_fit_refuses_degenerate_data():
    x = np.array([1e3, 1e4, 1e5, 1e6])
    assert not report.fit_power_law(x[:3], [0.5, 0.4, 0.3]).converged  # too few sizes
    flat = report.fit_power_law(x, [0.3, 0.3, 0.3, 0.3])
    assert not flat.converged and "does not fall" in flat.message
    rising = report.fit_power_law(x, [0.1, 0.2, 0.3, 0.4])
    assert not rising.converged


def test_pareto_front():
    import pandas as pd

    points = pd.DataFrame(dict(params=[1, 2, 3, 4, 5], test_accuracy=[0.5, 0.4, 0.7, 0.6, 0.8]))
    front = report.pareto_front(points, "params")
    assert list(front.params) == [1, 3, 5]


def test_data_efficiency_figure_draws_fitted_curves(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = [
        dict(arch=arch, variant=arch, family=arch, train_examples=n, seed=seed,
             test_error=scale * (n / 100) ** -0.5 + 0.1 + rng.normal(0, 0.002))
        for arch, scale in [("conv", 0.4), ("attention", 0.8)]
        for n in [100, 300, 1000, 3000]
        for seed in range(2)
    ]  # fmt: skip
    done = pd.DataFrame(rows).assign(test_accuracy=lambda df: 1 - df.test_error)
    laws = report.fits(done)
    assert [(law["group"], law["fit"].converged) for law in laws] == [
        ("attention", True),
        ("conv", True),
    ]
    assert report.data_efficiency(done, tmp_path, laws) == "data_efficiency.png"
    size = Image.open(tmp_path / "data_efficiency.png").size
    assert size == tuple(round(s * report.DPI) for s in report.SIZES["data_efficiency"])


def test_runs_write_tensorboard_events(synthetic_sweep):
    """The scalars of metrics.jsonl, as TensorBoard event records (TFRecord framing), one file
    per process (the run was stopped at its step-2 checkpoint and resumed: two files). Read as
    TensorBoard does: a session START at step s hides the earlier files' events from step s."""
    import struct

    from tensorboardX.proto import event_pb2

    files = sorted((synthetic_sweep / "name=wrn10_1").glob("events.out.tfevents.*"))
    assert len(files) == 2
    scalars = {}
    for events_file in files:
        data = events_file.read_bytes()
        while data:
            (length,) = struct.unpack("<Q", data[:8])
            event = event_pb2.Event.FromString(data[12 : 12 + length])
            data = data[12 + length + 4 :]
            if event.session_log.status == event_pb2.SessionLog.START:
                for values in scalars.values():
                    for step in [s for s in values if s >= event.step]:
                        del values[step]
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    metrics = results.curves(synthetic_sweep / "name=wrn10_1")
    train_rows = metrics.dropna(subset=["loss"])
    assert scalars["loss"] == pytest.approx(
        dict(zip(train_rows.step, train_rows.loss, strict=True))
    )
    assert {"accuracy", "learning_rate", "images_per_second", "test_accuracy"} <= set(scalars)


def test_settings_that_differ_beyond_the_seed_are_never_averaged():
    import pandas as pd

    done = pd.DataFrame(
        dict(arch="efficientnet_cifar", setting=["w=1.1", "w=1.1", "w=1.2"], seed=[0, 1, 0],
             params=[10, 10, 12], flops=[1e6] * 3, train_accuracy=[0.5, 0.7, 0.9],
             test_accuracy=[0.4, 0.6, 0.8], generalization_gap=[0.1] * 3,
             wall_seconds=[1.0] * 3, images_per_second=[9.0] * 3)
    )  # fmt: skip
    table = report.summary_table(done)
    assert list(table.setting) == ["w=1.1", "w=1.2"]  # shown: the arch alone does not tell
    assert list(table.seeds) == [2, 1] and list(table["test acc"]) == pytest.approx([0.5, 0.8])


def test_partial_and_colliding_directories(synthetic_sweep, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(synthetic_sweep, copy)
    (copy / "name=wrn10_1" / "summary.json").unlink()  # indexed as done, summary lost
    df = results.load(copy)
    assert df.set_index("trial").status["name=wrn10_1"] == "no summary.json"
    text = report.write([copy]).read_text()
    assert "6 trials: 3 done, 1 no summary.json, 1 running, 1 pending." in text
    assert "- `name=wrn10_1` no summary.json" in text
    with pytest.raises(ScalingError, match="trial names repeat across the directories"):
        report.write([synthetic_sweep, copy], tmp_path / "both")


# ---- Damaged and hostile results directories (no training: the files are written here) ----
def fake_trial(sweep_dir, name, model="wrn10_1", seed=0, state="done", **files):
    """A trial directory as training leaves it (config, summary, metrics), any file replaced by
    the text in `files` (summary_json="{" for a truncated summary.json); its index record."""
    from scaling.results import SUMMARY

    summary = {k: 1 for k in SUMMARY} | dict(
        model=model, dataset="synthetic", test_accuracy=0.5, train_accuracy=0.6, seed=seed,
        params=1000 * (seed + 1), flops=2e6 * (seed + 1), steps=4,
    )  # fmt: skip
    texts = {
        "config.json": json.dumps(dict(model=dict(name=model), seed=seed, batch_size=32)),
        "summary.json": json.dumps(summary),
        "metrics.jsonl": "".join(json.dumps(dict(step=s, loss=2.0 / s)) + "\n" for s in (1, 2)),
    }
    texts |= {key.replace("_", "."): text for key, text in files.items()}
    (sweep_dir / name).mkdir(parents=True)
    for file, text in texts.items():
        if text is not None:
            (sweep_dir / name / file).write_text(text)
    return dict(name=name, state=state, error=None, overrides={"seed": seed, "model.name": model})


def write_index_lines(sweep_dir, records, *extra_lines):
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    (sweep_dir / "trials.jsonl").write_text("\n".join(lines) + "\n")


def tree(root, skip):
    """Every path under `root` but those under `skip`: what a command may not have added."""
    return {p for p in root.rglob("*") if not p.is_relative_to(skip)}


def test_damaged_trial_files_are_skipped_with_one_warning_each(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    records = [
        fake_trial(sweep_dir, "good", seed=0),
        fake_trial(sweep_dir, "bad-config", seed=1, config_json='{"model": {"na'),
        fake_trial(sweep_dir, "list-config", seed=2, config_json="[1, 2]"),
        fake_trial(sweep_dir, "truncated-summary", seed=3, summary_json='{"model": "wrn'),
        fake_trial(sweep_dir, "list-summary", seed=4, summary_json="[]"),
        fake_trial(sweep_dir, "short-summary", seed=5, summary_json='{"model": "wrn10_1"}'),
        fake_trial(sweep_dir, "typed-summary", seed=6, summary_json=json.dumps(
            json.loads((sweep_dir / "good" / "summary.json").read_text()) | {"params": "many"}
        )),
    ]  # fmt: skip
    write_index_lines(sweep_dir, records)
    capsys.readouterr()
    status = results.load(sweep_dir).set_index("trial").status.to_dict()
    assert status == {
        "good": "done",
        "bad-config": "done",  # its summary still says what it trained
        "list-config": "done",
        "truncated-summary": "unreadable summary.json",
        "list-summary": "unreadable summary.json",
        "short-summary": "incomplete summary.json",
        "typed-summary": "incomplete summary.json",
    }
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 6 and all(w.startswith("warning: ") for w in warnings), warnings
    for name in ["bad-config", "list-config", "truncated-summary", "list-summary"]:
        assert sum(f"/{name}/" in w for w in warnings) == 1, (name, warnings)
    assert any("short-summary/summary.json lacks dataset" in w for w in warnings)
    assert any("typed-summary/summary.json has values of the wrong type (params)" in w
               for w in warnings)  # fmt: skip
    text = report.write([sweep_dir]).read_text()
    assert "7 trials: 3 done, 2 unreadable summary.json, 2 incomplete summary.json." in text
    assert "- `truncated-summary` unreadable summary.json" in text


def test_report_over_a_damaged_index_renders_the_other_trials(tmp_path, capsys):
    sweep_dir = tmp_path / "a" / "b" / "c" / "sweep"
    records = [fake_trial(sweep_dir, f"seed={s}", seed=s) for s in range(2)]
    records.append(dict(name="seed=2", state="pending", error=None, overrides={"seed": 2}))
    escape = dict(name="../../../../x", state="done", error=None, overrides={"seed": 9})
    write_index_lines(sweep_dir, records, "{garbage", json.dumps(escape), '"a string"')
    capsys.readouterr()
    text = report.write([sweep_dir], tmp_path / "out").read_text()
    assert "3 trials: 2 done, 1 pending." in text
    assert "../" not in (tmp_path / "out" / "runs.csv").read_text()
    assert len(capsys.readouterr().err.splitlines()) == 3  # one warning per skipped line


def test_report_never_writes_outside_out(tmp_path, capsys):
    """Hostile trial names in the index (`../../../../escape`, an absolute path) copy nothing
    outside --out; a run found by its config.json deep in the tree is reported."""
    sweep_dir = tmp_path / "a" / "b" / "c" / "sweep"
    records = [fake_trial(sweep_dir, "seed=0", seed=0)]
    fake_trial(sweep_dir / "nested" / "deeper", "run", seed=1)  # no index: found by config.json
    hostile = [str(tmp_path / "abs-escape"), "../../../../escape", "..", ".", "a/../../escape"]
    for name in hostile:
        records.append(dict(name=name, state="done", error=None, overrides={"seed": 7}))
        fake_trial(sweep_dir, name.replace("/", "_").replace(".", "dot"), seed=7)
    write_index_lines(sweep_dir, records)
    out = tmp_path / "a" / "b" / "c" / "out"  # out/runs/../../../../escape is in tmp_path/a
    before = tree(tmp_path, out)
    text = report.write([sweep_dir], out).read_text()
    assert tree(tmp_path, out) == before
    assert "7 trials: 7 done." in text
    copied = sorted(p.name for p in (out / "runs").iterdir() if p.is_dir())
    assert "run" in copied and "seed=0" in copied and len(copied) == 7
    capsys.readouterr()


def test_copy_runs_refuses_targets_outside_out_runs(tmp_path, capsys):
    """Defence in depth: whatever names the results carry, a copy lands in its own directory
    right under out/runs or not at all (a warning), even through a symbolic link there."""
    import pandas as pd

    source = tmp_path / "sweep"
    fake_trial(source, "ok")
    out, outside = tmp_path / "deep" / "out", tmp_path / "outside"
    (out / "runs").mkdir(parents=True)
    outside.mkdir()
    (out / "runs" / "linked").symlink_to(outside)
    names = ["ok", "../../escape", str(tmp_path / "abs"), "", "..", "linked"]
    df = pd.DataFrame(dict(trial=names, path=str(source / "ok")))
    before = tree(tmp_path, out / "runs")
    report.copy_runs(df, out)
    assert tree(tmp_path, out / "runs") == before and not any(outside.iterdir())
    assert (out / "runs" / "ok" / "summary.json").is_file()
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 5 and all("not copying trial" in w for w in warnings), warnings


@pytest.mark.parametrize("case", ["out is a file", "out under a file", "no such dir",
                                  "dir is a file", "no trials", "notes unreadable"])  # fmt: skip
def test_report_bad_input_is_one_line_error_before_any_write(case, tmp_path, capsys):
    from scaling import cli

    sweep_dir, out = tmp_path / "sweep", tmp_path / "out"
    write_index_lines(sweep_dir, [fake_trial(sweep_dir, "seed=0")])
    (tmp_path / "file").write_text("mine\n")
    (tmp_path / "empty").mkdir()
    args = {
        "out is a file": [str(sweep_dir), "--out", str(tmp_path / "file")],
        "out under a file": [str(sweep_dir), "--out", str(tmp_path / "file" / "out")],
        "no such dir": [str(sweep_dir), str(tmp_path / "missing"), "--out", str(out)],
        "dir is a file": [str(tmp_path / "file"), "--out", str(out)],
        "no trials": [str(tmp_path / "empty"), "--out", str(out)],
        "notes unreadable": [str(sweep_dir), "--out", str(out), "--notes", str(sweep_dir)],
    }[case]
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("scaling report: error: "), err
    assert "Traceback" not in err
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before


def test_report_of_a_sweep_whose_every_file_is_corrupt(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    for name in ["seed=0", "seed=1", "seed=2"]:
        fake_trial(sweep_dir, name, config_json="{", summary_json="\0\xff", metrics_jsonl="[[[")
    (sweep_dir / "seed=3").mkdir()
    (sweep_dir / "seed=3" / "config.json").write_text("null")
    (sweep_dir / "seed=3" / "metrics.jsonl").write_text('{"step": 1, "loss": "x"}\n')
    (sweep_dir / "trials.jsonl").write_bytes(b"\xff\xfe{{{\n[]\n")
    text = report.write([sweep_dir], tmp_path / "out").read_text()
    assert "4 trials: 3 unreadable summary.json, 1 pending." in text
    for name in ["seed=0", "seed=1", "seed=2"]:
        assert f"- `{name}` unreadable summary.json" in text
    assert "Traceback" not in capsys.readouterr().err


def test_variants_tell_apart_trials_of_one_architecture():
    import pandas as pd

    df = pd.DataFrame(
        dict(
            arch=["resnet20", "resnet20", "resnet20", "wrn16_2", "wrn16_2"],
            seed=[0, 1, 0, 0, 1],
            train_examples=[100, 100, 100, 100, 200],
            **{"model.stochastic_depth": [None, None, 0.5, None, None]},
            optimizer=["sgd", "sgd", "sgd", "adamw", "adamw"],
        )
    )
    df.attrs["axes"] = ["train_examples", "optimizer"]
    assert list(results.variants(df)) == [
        "resnet20", "resnet20", "resnet20, stochastic_depth=0.5", "wrn16_2", "wrn16_2"
    ]  # fmt: skip
