"""Training: one pure, jitted step, data parallel over every local device.

Reads top to bottom: `check` (every setting, before any I/O), `build` (the state and the jitted
steps of `steps.py`, with the optimizer of `optim.py`), then `train()`, which loads the data, takes
the run directory (`rundir.py`), restores the newest sound checkpoint (`checkpoints.py`), loops over
the batches of `pipeline.py`, evaluates and writes `metrics.jsonl` and `summary.json`.

Parallelism: a one-axis `Mesh` named 'data' over all devices; the state is replicated and each
global batch is sharded along its first axis, so XLA splits the work and BatchNorm statistics
(a mean over the batch axis) cover the whole global batch.
"""

import contextlib
import dataclasses
import functools
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from scaling import (
    Diverged,
    ScalingError,
    Stopped,
    data,
    flops,
    models,
    pretrained,
    rundir,
    tracking,
)
from scaling import checkpoints as ckpt
from scaling import early_stopping as early
from scaling.config import check_training_config
from scaling.optim import make_optimizer
from scaling.pipeline import data_on_device, evaluate, global_batches, pixel_statistics
from scaling.rundir import json_config, read_metrics, write_json_atomic
from scaling.signals import on_stop_signals
from scaling.steps import AUGMENTATIONS, DTYPES, ZERO_SUMS, make_steps


def num_train_steps(config, num_examples):
    if (config.num_steps is None) == (config.num_epochs is None):
        raise ScalingError("set exactly one of num_steps and num_epochs")
    if config.num_steps is not None:
        steps = config.num_steps
    else:
        steps = math.ceil(config.num_epochs * num_examples / config.batch_size)
    if steps < 1:
        raise ScalingError(f"training needs at least one step, got {steps}")
    return steps


@contextlib.contextmanager
def stop_on_signal():
    """An event set by SIGTERM (what a preempted VM gets) or Ctrl-C, so the loop can checkpoint
    and stop. A second Ctrl-C interrupts at once."""
    event = threading.Event()

    def stop(signum, _):
        event.set()
        event.signal = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    with on_stop_signals(stop):
        yield event


def summary_writer():
    """tensorboardX's SummaryWriter, imported without PyTorch where nothing has imported it yet:
    tensorboardX imports torch, when installed, only to accept its tensors, which are never
    written here (4 s of every training process's start)."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError meanwhile
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def settings_of(config) -> dict:
    """The model's constructor settings from a training config."""
    settings = {k: v for k, v in config.model.items() if k not in ("name", "num_classes")}
    return dict(settings, dtype=DTYPES[config.compute_dtype], image_size=config.image_size)


@dataclasses.dataclass
class Program:
    """A run's jitted pieces over a one-axis data-parallel mesh: its initial state, the train
    step (donating the state), the eval step, and what the loop needs besides."""

    state: dict
    train_step: Callable
    eval_step: Callable
    reset_sums: Callable
    schedule: Callable
    abstract_model: nnx.Module
    batch_sharding: NamedSharding


def build(config, model_settings, total_steps, pixel_mean, pixel_std) -> Program:
    tx, schedule = make_optimizer(config, total_steps)
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    abstract_model = models.abstract(config.model.name, **model_settings)
    abstract_model.train()
    train_def = nnx.graphdef(abstract_model)
    abstract_model.eval()
    eval_def = nnx.graphdef(abstract_model)

    def init_state(key, pixel_mean, pixel_std):
        model = models.create(config.model.name, seed=key, **model_settings)
        model.train()
        _, params, model_state = nnx.split(model, nnx.Param, ...)
        opt_state = tx.init(params)
        return dict(
            step=jnp.array(0, jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            metric_sums=ZERO_SUMS,
            run=dict(key=jax.random.fold_in(key, 1), pixel_mean=pixel_mean, pixel_std=pixel_std),
        )

    # Built inside jit with replicated outputs, so every host of a multi-host job holds the same
    # state without a host-to-device copy of the whole model.
    key = jax.random.key(config.seed)
    state = jax.jit(init_state, out_shardings=replicated)(key, pixel_mean, pixel_std)
    if config.get("init_from"):  # fine-tuning: imported weights replace the initialisation
        params, model_state, fresh_head = pretrained.initial_state(
            config.init_from, state["params"], state["model_state"], config.image_size
        )
        if fresh_head:
            print(f"init_from {config.init_from}: the classifier is re-initialised for "
                  f"{model_settings['num_classes']} classes")  # fmt: skip
        weights = jax.device_put(dict(params=params, model_state=model_state), replicated)
        state = {**state, **weights}
    if early.enabled(config):
        state["early_stopping"] = jax.jit(early.initial_tracker, out_shardings=replicated)(state)
    reset_sums = jax.jit(
        lambda s: {**s, "metric_sums": ZERO_SUMS}, donate_argnums=0, out_shardings=replicated
    )
    train_step, eval_step = make_steps(config, train_def, eval_def, tx)
    return Program(
        state=state,
        train_step=jax.jit(train_step, donate_argnums=0, out_shardings=replicated),
        eval_step=jax.jit(eval_step, out_shardings=replicated),
        reset_sums=reset_sums,
        schedule=schedule,
        abstract_model=abstract_model,
        batch_sharding=batch_sharding,
    )


def check(config) -> dict:
    """Every setting that can be checked without the data, before any I/O; returns the model's
    constructor settings."""
    check_training_config(config)
    if config.augment not in AUGMENTATIONS:
        raise ScalingError(f"unknown augment {config.augment!r}; valid: {', '.join(AUGMENTATIONS)}")
    if config.compute_dtype not in DTYPES:
        raise ScalingError(
            f"unknown compute_dtype {config.compute_dtype!r}; valid: float32, bfloat16"
        )
    if config.stream and config.data_on_device:
        raise ScalingError("data_on_device needs the data in memory: set stream=False")
    if config.batch_size % jax.device_count():
        raise ScalingError(
            f"batch_size {config.batch_size} is not divisible by {jax.device_count()} devices"
        )
    make_optimizer(config, total_steps=1)  # an unknown optimizer, schedule or setting
    early.check(config)
    tracking.check(config)
    model_settings = settings_of(config)
    if model_settings.get("in_channels", 3) != 3:  # every data source gives RGB images
        raise ScalingError(
            f"in_channels must be 3 (the images are RGB), got {config.model.in_channels!r}"
        )
    models.abstract(config.model.name, **model_settings)  # a bad name or setting
    if config.get("init_from"):
        pretrained.check(config.init_from, config.model.name, model_settings)
    return model_settings


def train(config: ml_collections.ConfigDict, workdir, *, overwrite=False, stop_after=None):
    """Train (or resume) the run in `workdir`; returns the summary dict when training finished.

    Every check (settings, workdir, data) comes before the first write into `workdir`, and the
    run holds the workdir's lock while it writes there. `stop_after` ends this process's share
    of the run after that many steps, leaving a checkpoint to resume from, as a preempted job
    would; SIGTERM or Ctrl-C does the same and raises `Stopped`.
    """
    workdir = Path(workdir)
    model_settings = check(config)
    rundir.check_run_directory(workdir, config, overwrite)
    ds = (data.open_stream if config.stream else data.load)(
        config.dataset,
        config.image_size,
        train_examples=config.train_examples,
        data_fraction=config.data_fraction,
        holdout_fraction=config.holdout_fraction,
        seed=config.data_seed,
    )
    validation = None
    if early.enabled(config):
        ds, validation = early.carve_validation(ds, config.early_stopping.validation_fraction)
    n_train = len(ds.train_labels)
    if n_train < config.batch_size:
        raise ScalingError(
            f"batch_size {config.batch_size} exceeds the {n_train} training examples"
        )
    model_settings["num_classes"] = ds.num_classes
    total_steps = num_train_steps(config, n_train)
    if jax.process_index():  # process 0 writes for a multi-host job, and holds the lock
        workdir.mkdir(parents=True, exist_ok=True)
        return run(config, workdir, ds, validation, model_settings, total_steps, stop_after)
    with rundir.lock(workdir):
        rundir.prepare_run_directory(workdir, config, overwrite)
        return run(config, workdir, ds, validation, model_settings, total_steps, stop_after)


def run(config, workdir: Path, ds, validation, model_settings, total_steps, stop_after):
    """The training loop of a checked, prepared run directory (see `train`); `validation`: the
    split early stopping monitors, or None."""
    devices, n_train = jax.device_count(), len(ds.train_labels)
    program = build(config, model_settings, total_steps, *pixel_statistics(ds))
    state, train_step, schedule = program.state, program.train_step, program.schedule
    abstract_model, batch_sharding = program.abstract_model, program.batch_sharding
    eval_batch = -(-config.eval_batch_size // devices) * devices  # a multiple of the devices
    run_eval = functools.partial(
        evaluate, program.eval_step, batch_size=eval_batch, sharding=batch_sharding
    )
    if validation is not None:  # early stopping
        track = early.tracker_update(config, state["step"].sharding)

    checkpoints = ckpt.manager(
        workdir / "checkpoints", keep=config.keep_checkpoints, every=config.checkpoint_every
    )
    metrics_path = workdir / "metrics.jsonl"
    state = ckpt.restore_latest(checkpoints, state)
    start = int(state["step"])
    is_writer = jax.process_index() == 0
    # Steps after the checkpoint are redone: drop their records.
    kept = rundir.rewind_metrics(metrics_path, start) if is_writer else []
    wall_before = max((r["wall_time"] for r in kept), default=0.0)
    stopped_early = functools.partial(early.stopped, config)
    finished = (start >= total_steps or stopped_early(state)) and rundir.read_json(
        workdir / "summary.json"
    )
    if finished:
        print(f"{workdir} already holds a finished run")
        return finished
    if start:
        print(f"resumed from step {start} in {workdir}")

    def log(record):
        if is_writer:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            for key, value in record.items():
                if key != "step" and type(value) in (int, float):
                    board.add_scalar(key, value, record["step"])
            board.flush()
            tracking.log(wandb_run, record)

    # TensorBoard event files beside metrics.jsonl, to watch a run (or a sweep directory) live;
    # purge_step hides the events of steps that a resume redoes (the first is start + 1). Closed
    # however the run ends: the writer queues events, and only closing writes them all.
    purge = start + 1 if start else None
    board = summary_writer()(str(workdir), purge_step=purge) if is_writer else None
    wandb_run, summary, failed = None, None, False
    try:  # W&B inside: a failing wandb.init still closes the TensorBoard writer
        wandb_run = tracking.start(config, workdir, json_config(config)) if is_writer else None
        t0 = time.perf_counter()
        wall = lambda: wall_before + time.perf_counter() - t0  # noqa: E731
        end = total_steps if stop_after is None else min(total_steps, start + stop_after)
        end = start if stopped_early(state) else end  # stopped, but not yet summarised
        window_start, last_finite_loss = time.perf_counter(), None
        bar = tqdm(total=total_steps, initial=start, unit="step", disable=None, dynamic_ncols=True)
        on_device = data_on_device(config.data_on_device, ds)
        batches = global_batches(
            ds, start, end, config.batch_size, config.seed, batch_sharding, on_device
        )
        # closing: async checkpoint writes finish before the run returns or raises (Diverged).
        with stop_on_signal() as stopping, contextlib.closing(checkpoints):
            for step in range(start, end):
                state = train_step(state, *next(batches))
                done = step + 1
                if done % config.log_every == 0 or done == total_steps:
                    sums = jax.device_get(state["metric_sums"])
                    state = program.reset_sums(state)
                    means = {k: float(sums[k] / sums["steps"]) for k in ("loss", "accuracy")}
                    if not math.isfinite(means["loss"]):
                        log(dict(step=done, loss=means["loss"], diverged=True, wall_time=wall()))
                        raise Diverged(
                            f"loss became {means['loss']} by step {done}; last finite loss "
                            f"{last_finite_loss} (learning rate {schedule(step):.3g})"
                        )
                    last_finite_loss = means["loss"]
                    steps_timed = min(config.log_every, done - start)
                    rate = steps_timed * config.batch_size / (time.perf_counter() - window_start)
                    log(
                        dict(
                            step=done,
                            **means,
                            learning_rate=float(schedule(step)),
                            images_per_second=rate,
                            examples_seen=done * config.batch_size,
                            wall_time=wall(),
                        )
                    )
                    bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means['accuracy']:.3f}")
                    window_start = time.perf_counter()
                if config.eval_every and done % config.eval_every == 0 and done < total_steps:
                    loss, acc = run_eval(state, ds.test, len(ds.test_labels))
                    log(dict(step=done, test_loss=loss, test_accuracy=acc, wall_time=wall()))
                if validation is not None and (
                    done % config.early_stopping.every == 0 or done == total_steps
                ):
                    loss, acc = run_eval(state, validation, len(validation))
                    log(dict(step=done, validation_loss=loss, validation_accuracy=acc,
                             wall_time=wall()))  # fmt: skip
                    state = track(state, dict(loss=loss, accuracy=acc), done)
                    end = done if stopped_early(state) else end
                if stopping.is_set():  # SIGTERM or Ctrl-C: checkpoint now and leave, resumable
                    end = done
                ckpt.save(checkpoints, done, state, force=done == end)
                bar.update(1)
                if done == end:
                    break
        bar.close()
        if end < total_steps and not stopped_early(state):
            if stopping.is_set():
                raise Stopped(f"stopped by {stopping.signal} at step {end} of {total_steps}")
            return None

        # Final evaluation: the test split, and a fixed, un-augmented training subset of equal size;
        # with early stopping, of the best weights (the last ones' results go beside).
        def final_metrics():
            train_loss, train_acc = run_eval(state, ds.train, min(n_train, len(ds.test_labels)))
            test_loss, test_acc = run_eval(state, ds.test, len(ds.test_labels))
            return dict(train_accuracy=train_acc, test_accuracy=test_acc, train_loss=train_loss,
                        test_loss=test_loss, generalization_gap=train_acc - test_acc)  # fmt: skip

        steps_done = int(state["step"])
        stopping_summary = {}
        if validation is not None:
            last = final_metrics()
            state = early.restore_best(state)
            stopping_summary = dict(early_stopping=early.summary(config, state, steps_done, last))
        results = final_metrics()
        wall_seconds = wall()
        final = dict(test_loss=results["test_loss"], test_accuracy=results["test_accuracy"])
        if validation is not None:  # the best weights' results, beside the last ones' above
            final["best_step"] = stopping_summary["early_stopping"]["best_step"]
        log(dict(step=steps_done, **final, wall_time=wall_seconds))
        records = [r for r in read_metrics(metrics_path) if "images_per_second" in r]
        summary = dict(
            summary_of(config, abstract_model, ds, total_steps, steps_done),
            **results,
            wall_seconds=wall_seconds,
            images_per_second=float(np.median([r["images_per_second"] for r in records])),
            **stopping_summary,
        )
        if is_writer:
            write_json_atomic(workdir / "summary.json", summary)
        return summary
    except BaseException:  # Diverged, Stopped, a crash: the W&B run ends marked as failed
        failed = True
        raise
    finally:
        if board is not None:
            board.close()
        tracking.finish(wandb_run, summary, failed)


def summary_of(config, abstract_model, ds, total_steps, steps_done) -> dict:
    """What a finished run's summary.json says besides its results: the model's size and cost,
    the data, the budget (`steps`) and what of it ran (fewer steps when stopped early)."""
    macs, activations = flops.macs_and_activations(abstract_model, config.image_size)
    return dict(
        model=config.model.name,
        dataset=config.dataset,
        params=models.count_params(abstract_model),
        flops=flops.xla_flops(abstract_model, config.image_size),
        macs=macs,
        activations=activations,
        image_size=config.image_size,
        num_classes=ds.num_classes,
        train_examples=len(ds.train_labels),
        steps=total_steps,
        examples_seen=steps_done * config.batch_size,
        devices=jax.device_count(),
        seed=config.seed,
        config=json_config(config),
    )
