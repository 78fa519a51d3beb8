"""Weights & Biases in offline mode: what a run logs there equals what it writes itself."""

import importlib.util
import json

import pytest

from scaling import ScalingError
from scaling.rundir import mark, read_json, read_metrics
from scaling.train import train

# wandb is imported where a test uses it: importing it costs each pytest worker 2 s.
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is absent"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:wandb"),
]


def key(item) -> str:
    return item.key or "/".join(item.nested_key)


def offline_records(workdir):
    """(run records, history rows, summary updates) of every offline W&B run file in `workdir`."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    runs, history, summary = [], [], {}
    for path in sorted((workdir / "wandb").glob("offline-run-*/run-*.wandb")):
        store = datastore.DataStore()
        store.open_for_scan(str(path))
        while (data := store.scan_data()) is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                runs.append(record.run)
            elif kind == "history":
                row = {key(i): json.loads(i.value_json) for i in record.history.item}
                history.append({k: v for k, v in row.items() if not k.startswith("_")} | {
                    "step": row["_step"]})  # fmt: skip
            elif kind == "summary":
                summary |= {key(i): json.loads(i.value_json) for i in record.summary.update}
    return runs, history, summary


def test_a_resumed_run_logs_its_metrics_config_and_summary_to_one_wandb_run(tmp_path, tiny_config):
    sweep = tmp_path / "my-sweep"
    sweep.mkdir()
    mark(sweep, "sweep")  # a trial of a sweep joins the sweep's group
    workdir = sweep / "trial"
    config = tiny_config(wandb=dict(project="study", entity=None, group=None, mode="offline"))
    assert train(config, workdir, stop_after=12) is None  # preempted, then resumed
    summary = train(config, workdir)

    runs, history, logged_summary = offline_records(workdir)
    assert len(runs) == 2 and len({r.run_id for r in runs}) == 1  # one W&B run, resumed
    assert {(r.project, r.run_group, r.display_name) for r in runs} == {
        ("study", "my-sweep", "trial")
    }
    logged_config = {key(i): json.loads(i.value_json) for i in runs[0].config.update}
    assert {k: v for k, v in logged_config.items() if not k.startswith("_")} == read_json(
        workdir / "config.json"
    )
    # Every metrics.jsonl value at its step (a step's records are merged into one row).
    rows = {}
    for record in read_metrics(workdir / "metrics.jsonl"):
        rows.setdefault(record["step"], {}).update(record)
    assert {r["step"]: r for r in history} == rows
    assert logged_summary.items() >= {k: v for k, v in summary.items() if k != "config"}.items()


def test_wandb_settings_are_checked_before_any_work(tmp_path, tiny_config):
    config = tiny_config(wandb=dict(project="study", entity=None, group=None, mode="sometimes"))
    with pytest.raises(ScalingError, match="config.wandb.mode='sometimes' is invalid"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
