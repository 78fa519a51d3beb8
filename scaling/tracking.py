"""Weights & Biases: a run's metrics, config and summary, mirrored from what it writes anyway.

`metrics.jsonl` and `summary.json` stay the record; W&B (the optional `wandb` extra) is a view
of them for the dashboards sweeps are usually watched in. Set `config.wandb.project` to turn it
on. A trial of a sweep joins the group named after its sweep directory, so a sweep is one group.

A resumed run continues the same W&B run: its id is kept in the run directory (`wandb/run-id`),
which `--overwrite` clears with the rest. W&B accepts only increasing steps, so the steps a
resume redoes (after the last checkpoint) keep the values first logged; a resume is bit-identical,
so only their wall times differ.
"""

import secrets
from pathlib import Path

from scaling import ScalingError
from scaling.rundir import atomic_file, is_marked

MODES = ("online", "offline", "disabled")


def enabled(config) -> bool:
    return bool(config.get("wandb") and config.wandb.get("project"))


def check(config):
    """A clear error, before any work, when W&B is asked for and cannot be used."""
    if not enabled(config):
        return
    if config.wandb.mode not in MODES:
        raise ScalingError(
            f"config.wandb.mode={config.wandb.mode!r} is invalid: expected {', '.join(MODES)}"
        )
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ScalingError(
            "config.wandb.project needs Weights & Biases: pip install 'scaling[wandb]'"
        ) from None


def run_id(workdir: Path) -> str:
    """The W&B id of the run in `workdir`: made on its first start, read on every resume."""
    path = workdir / "wandb" / "run-id"
    if not path.exists():  # written whole or not at all: a kill never leaves an empty id
        path.parent.mkdir(exist_ok=True)
        with atomic_file(path) as file:
            file.write(secrets.token_hex(8))
    return path.read_text().strip()


def start(config, workdir: Path, config_json: dict):
    """The W&B run of the run in `workdir` (started or resumed), or None when it is off."""
    if not enabled(config):
        return None
    import wandb

    settings = config.wandb
    sweep = workdir.resolve().parent
    return wandb.init(
        project=settings.project,
        entity=settings.entity,
        group=settings.group or (sweep.name if is_marked(sweep) else None),
        name=workdir.resolve().name,
        id=run_id(workdir),
        resume="allow",
        dir=str(workdir),
        mode=settings.mode,
        config=config_json,
        settings=wandb.Settings(console="off", silent=True),  # train.log has the console
    )


def log(run, record: dict):
    """One metrics.jsonl record, its numbers logged at its step."""
    if run is not None:
        numbers = {k: v for k, v in record.items() if k != "step" and type(v) in (int, float)}
        run.log(numbers, step=record["step"])


def finish(run, summary: dict | None, failed: bool):
    """Close the run; a finished run's summary (less its config) becomes the W&B summary."""
    if run is None:
        return
    if summary:
        run.log({}, commit=True)  # the last row first: its values would overwrite the summary's
        run.summary.update({k: v for k, v in summary.items() if k != "config"})
    run.finish(exit_code=1 if failed else 0)
