"""Training: one pure, jitted step, data parallel over every local device.

Reads top to bottom: the optimizer and schedule from the config, the on-device augmentation and
loss, the train and eval steps, then `train()`, which loads data, builds or restores the state,
loops, evaluates and writes `metrics.jsonl`, `summary.json` and orbax checkpoints into the workdir.

Parallelism: a one-axis `Mesh` named 'data' over all devices; the state is replicated and each
global batch is sharded along its first axis, so XLA splits the work and BatchNorm statistics
(a mean over the batch axis) cover the whole global batch.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from tensorboardX import SummaryWriter
from tqdm import tqdm

from scaling import Diverged, ScalingError, Stopped, data, flops, models, pretrained, rundir
from scaling import checkpoints as ckpt
from scaling.config import check_training_config
from scaling.rundir import json_config, read_metrics, write_json_atomic

OPTIMIZERS = {
    "sgd": optax.sgd,
    "adam": optax.adam,
    "adamw": optax.adamw,
    "rmsprop": optax.rmsprop,
    "adagrad": optax.adagrad,
    "adadelta": optax.adadelta,
    "lamb": optax.lamb,
}
DECOUPLED_DECAY = ("adamw", "lamb")  # these apply weight decay themselves
AUGMENTATIONS = ("none", "crop", "flip", "crop_flip")


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ZERO_SUMS = dict(loss=np.float32(0), accuracy=np.float32(0), steps=np.int32(0))


def make_schedule(config, total_steps):
    """Learning rate per step: constant, cosine to zero, or step decay; linear warmup first."""
    s, lr = config.schedule, config.lr
    warmup = min(s.warmup_steps, total_steps)
    rest = max(total_steps - warmup, 1)
    if s.name == "constant":
        main = optax.constant_schedule(lr)
    elif s.name == "cosine":
        main = optax.cosine_decay_schedule(lr, rest)
    elif s.name == "step":
        bounds = {int(b * total_steps) - warmup: s.decay_factor for b in s.boundaries}
        main = optax.piecewise_constant_schedule(lr, bounds)
    else:
        raise ScalingError(f"unknown schedule {s.name!r}; valid: constant, cosine, step")
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(config, total_steps):
    """The optax transformation named by the config, with decay and clipping around it."""
    settings = dict(config.optimizer)
    name = settings.pop("name")
    if name not in OPTIMIZERS:
        raise ScalingError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    schedule = make_schedule(config, total_steps)

    # Decay conv and dense kernels only, found by name (a scanned stack of norm scales is 2-D
    # too): biases, norm scales, position embeddings and relative-bias tables are not decayed.
    def kernels(params):
        is_kernel = lambda path, _: any(getattr(k, "key", None) == "kernel" for k in path)  # noqa: E731
        return jax.tree_util.tree_map_with_path(is_kernel, params)

    if name in DECOUPLED_DECAY:
        settings.update(weight_decay=config.weight_decay, mask=kernels)
    try:
        optimizer = OPTIMIZERS[name](schedule, **settings)
    except TypeError as e:
        raise ScalingError(f"optimizer {name}: {str(e).split('() ')[-1]}") from None
    chain = []
    if config.grad_clip_norm:
        chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.weight_decay and name not in DECOUPLED_DECAY:
        chain.append(optax.add_decayed_weights(config.weight_decay, mask=kernels))
    return optax.chain(*chain, optimizer), schedule


def augment(images, key, kind, pad=4):
    """Pad-`pad` random crop and/or horizontal flip, per image, on the device."""
    n, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)
    if "crop" in kind:
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        corners = jax.random.randint(crop_key, (n, 2), 0, 2 * pad + 1)
        crop = lambda im, yx: jax.lax.dynamic_slice(im, (yx[0], yx[1], 0), (h, w, c))  # noqa: E731
        images = jax.vmap(crop)(padded, corners)
    if "flip" in kind:
        flip = jax.random.bernoulli(flip_key, 0.5, (n, 1, 1, 1))
        images = jnp.where(flip, images[:, :, ::-1], images)
    return images


def cross_entropy(logits, labels, smoothing=0.0):
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if smoothing:
        targets = optax.smooth_labels(targets, smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def normalize(images, state):
    run = state["run"]
    return (images.astype(jnp.float32) - run["pixel_mean"]) / run["pixel_std"]


def make_steps(config, train_def, eval_def, tx):
    """The pure train and eval step functions, closed over the static pieces. The seed's key
    and the pixel statistics travel in the state, not in the program, so trials that differ
    only in seed or data subset share one compiled step (JAX's compilation cache)."""

    def train_step(state, images, labels):
        key = jax.random.fold_in(state["run"]["key"], state["step"])
        images = normalize(augment(images, key, config.augment), state)

        def loss_fn(params):
            # copy: the statistics are updated inside this trace, so they must be born in it
            model = nnx.merge(train_def, params, state["model_state"], copy=True)
            logits = model(images)
            loss = cross_entropy(logits, labels, config.label_smoothing).mean()
            return loss, (logits, nnx.state(model, nnx.Not(nnx.Param)))

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, model_state)), grads = grad_fn(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = dict(
            step=state["step"] + 1,
            params=optax.apply_updates(state["params"], updates),
            model_state=model_state,
            opt_state=opt_state,
            run=state["run"],
        )
        # Running sums since the last log line; kept in the state, so a resumed run logs
        # exactly what an uninterrupted one would have.
        sums = state["metric_sums"]
        new_state["metric_sums"] = dict(
            loss=sums["loss"] + loss,
            accuracy=sums["accuracy"] + jnp.mean(jnp.argmax(logits, -1) == labels),
            steps=sums["steps"] + 1,
        )
        return new_state

    def eval_step(state, images, labels, mask):
        model = nnx.merge(eval_def, state["params"], state["model_state"])
        logits = model(normalize(images, state))
        loss = cross_entropy(logits, labels) * mask
        correct = (jnp.argmax(logits, -1) == labels) * mask
        return {"loss": loss.sum(), "correct": correct.sum(), "count": mask.sum()}

    return train_step, eval_step


def pixel_statistics(ds, sample=10_000):
    """Per-channel mean and std of the training images, for normalisation inside the step: all
    of them in memory; for a stream the first `sample` (a stratified subset, by the order of
    `data.nested_subset_order`), so that it costs one pass of decoding, not an epoch."""
    if isinstance(ds, data.Dataset):
        pixels = ds.train_images.reshape(-1, ds.train_images.shape[-1]).astype(np.float64)
        mean, std = pixels.mean(0), pixels.std(0)
    else:
        first = grain.MapDataset.range(min(sample, len(ds.train))).map(lambda i: ds.train[i][0])
        count, sums, squares = 0, 0.0, 0.0  # every host reads the same images: they agree
        for images in read_ahead(first, 512).batch(256):
            pixels = images.reshape(-1, images.shape[-1]).astype(np.float64)
            count += len(pixels)
            sums = sums + pixels.sum(0)
            squares = squares + np.square(pixels).sum(0)
        mean = sums / count
        std = np.sqrt(squares / count - mean**2)
    return mean.astype(np.float32), std.astype(np.float32) + 1e-3


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


def batch_indices(step, num_examples, batch_size, seed):
    """Example indices of global batch `step`: a fresh permutation each epoch, a pure function
    of (seed, step), so a resumed run sees exactly the batches it would have seen."""
    epoch, i = divmod(step, num_examples // batch_size)
    return epoch_order(num_examples, seed, epoch)[i * batch_size : (i + 1) * batch_size]


@functools.lru_cache(maxsize=2)  # computed once per epoch, not once per step
def epoch_order(num_examples, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def evaluate(eval_step, state, examples, count, *, batch_size, sharding):
    """Mean loss and accuracy over the first `count` of `examples` (a `data.Examples` split);
    the last batch is padded and masked."""
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for batch in eval_batches(examples, count, batch_size):
        out = eval_step(state, *to_global(batch, sharding))
        for k, v in jax.device_get(out).items():
            totals[k] += float(v)
    return totals["loss"] / totals["count"], totals["correct"] / totals["count"]


@contextlib.contextmanager
def stop_on_signal():
    """An event set by SIGTERM (what a preempted VM gets) or Ctrl-C, so the loop can checkpoint
    and stop. A second Ctrl-C interrupts at once."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals reach main only
        yield event
        return

    def stop(signum, _):
        event.set()
        event.signal = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield event
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def host_slice(indices):
    """This host's contiguous share of a global batch (all of it on a single host)."""
    return np.array_split(indices, jax.process_count())[jax.process_index()]


def to_global(arrays, sharding):
    """Global arrays sharded along the batch from each host's share (multi-controller JAX)."""
    return tuple(jax.make_array_from_process_local_data(sharding, a) for a in arrays)


# Reading runs ahead of the step on host threads (grain): decoding (PIL) and copying release
# the GIL. Bounded, because a batch of large images is large.
READ_THREADS = min(16, os.cpu_count() or 1)


def read_ahead(dataset, buffer):
    """`dataset`'s elements in order, computed up to `buffer` ahead on `READ_THREADS` threads."""
    options = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=buffer)
    return dataset.to_iter_dataset(options)


def train_batches(ds, start, end, batch_size, seed):
    """This host's share of global training batches start..end-1, as uint8 images and labels.
    In memory a batch is one gather; a `data.Stream` decodes example by example on the threads.
    Augmentation runs later, on the devices, in the step."""
    n, local = len(ds.train_labels), batch_size // jax.process_count()

    @functools.lru_cache(maxsize=4 * READ_THREADS)  # a stream asks once per example
    def indices(step):
        return host_slice(batch_indices(step, n, batch_size, seed))

    if isinstance(ds, data.Stream):
        positions = grain.MapDataset.range(start * local, end * local)
        examples = positions.map(lambda p: ds.train[indices(p // local)[p % local]])
        return read_ahead(examples, 2 * local).batch(local)

    def gather(step):
        return ds.train_images[indices(step)], ds.train_labels[indices(step)]

    return read_ahead(grain.MapDataset.range(start, end).map(gather), 2)


def global_batches(ds, start, end, batch_size, seed, sharding, on_device):
    """Global training batches start..end-1, sharded along the batch, as the step takes them:
    gathered on the devices (`device_batches`) or read by this host (`train_batches`).
    `scaling bench` times this."""
    if on_device:
        return device_batches(ds, start, end, batch_size, seed, sharding)
    batches = train_batches(ds, start, end, batch_size, seed)
    return (to_global(batch, sharding) for batch in batches)


def data_on_device(setting, ds) -> bool:
    """Whether the training set is held on the devices (`device_batches`): `setting` when given
    (config.data_on_device); else on accelerators when it is in memory and takes under a quarter
    of a device's memory, and never on CPU, whose device memory is the host's."""
    if isinstance(ds, data.Stream):
        return False
    if setting is not None:
        return setting
    if jax.default_backend() == "cpu":
        return False
    memory = jax.local_devices()[0].memory_stats() or {}
    return ds.train_images.nbytes < memory.get("bytes_limit", 0) / 4


def device_batches(ds, start, end, batch_size, seed, sharding):
    """Global training batches start..end-1 gathered on the devices, each from a copy of the
    training set it holds: per step only the batch's indices leave the host. The same batches
    as `train_batches`."""
    replicated = NamedSharding(sharding.mesh, P())
    images, labels = to_global((ds.train_images, ds.train_labels), replicated)
    take = jax.jit(lambda x, y, i: (x[i], y[i]), out_shardings=sharding)
    for step in range(start, end):
        indices = batch_indices(step, len(ds.train_labels), batch_size, seed)
        yield take(images, labels, indices.astype(np.int32))


def eval_batches(examples, count, batch_size):
    """This host's share of (images, labels, mask) batches over the first `count` examples."""
    local = batch_size // jax.process_count()
    image_shape, offsets = examples[0][0].shape, host_slice(np.arange(batch_size))

    def example(p):
        position = p // local * batch_size + offsets[p % local]
        if position >= count:  # padding: masked out
            return np.zeros(image_shape, np.uint8), np.int32(0), np.float32(0)
        image, label = examples[position]
        return image, np.int32(label), np.float32(1)

    positions = grain.MapDataset.range(-(-count // batch_size) * local)
    return read_ahead(positions.map(example), 2 * local).batch(local)


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
    model_settings = settings_of(config)
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
    n_train = len(ds.train_labels)
    if n_train < config.batch_size:
        raise ScalingError(
            f"batch_size {config.batch_size} exceeds the {n_train} training examples"
        )
    model_settings["num_classes"] = ds.num_classes
    total_steps = num_train_steps(config, n_train)
    if jax.process_index():  # process 0 writes for a multi-host job, and holds the lock
        workdir.mkdir(parents=True, exist_ok=True)
        return run(config, workdir, ds, model_settings, total_steps, stop_after)
    with rundir.lock(workdir):
        rundir.prepare_run_directory(workdir, config, overwrite)
        return run(config, workdir, ds, model_settings, total_steps, stop_after)


def run(config, workdir: Path, ds, model_settings, total_steps, stop_after):
    """The training loop of a checked, prepared run directory (see `train`)."""
    devices, n_train = jax.device_count(), len(ds.train_labels)
    program = build(config, model_settings, total_steps, *pixel_statistics(ds))
    state, train_step, schedule = program.state, program.train_step, program.schedule
    abstract_model, batch_sharding = program.abstract_model, program.batch_sharding
    eval_batch = -(-config.eval_batch_size // devices) * devices  # a multiple of the devices
    run_eval = functools.partial(
        evaluate, program.eval_step, batch_size=eval_batch, sharding=batch_sharding
    )

    checkpoints = ckpt.manager(
        workdir / "checkpoints", keep=config.keep_checkpoints, every=config.checkpoint_every
    )
    metrics_path = workdir / "metrics.jsonl"
    state = ckpt.restore_latest(checkpoints, state)
    start = int(state["step"])
    is_writer = jax.process_index() == 0
    # Steps after the checkpoint are redone: drop their records (and any line a kill cut short).
    kept = [r for r in read_metrics(metrics_path) if r["step"] <= start]
    if is_writer and metrics_path.exists():
        tmp = metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, metrics_path)
    wall_before = max((r["wall_time"] for r in kept), default=0.0)
    finished = start >= total_steps and rundir.read_json(workdir / "summary.json")
    if finished:
        print(f"{workdir} already holds a finished run")
        return finished
    if start:
        print(f"resumed from step {start} in {workdir}")

    # TensorBoard event files beside metrics.jsonl, to watch a run (or a sweep directory) live;
    # purge_step hides the events of steps that a resume redoes.
    board = SummaryWriter(str(workdir), purge_step=start or None) if is_writer else None

    def log(record):
        if is_writer:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            for key, value in record.items():
                if key != "step" and type(value) in (int, float):
                    board.add_scalar(key, value, record["step"])
            board.flush()

    t0 = time.perf_counter()
    wall = lambda: wall_before + time.perf_counter() - t0  # noqa: E731
    end = total_steps if stop_after is None else min(total_steps, start + stop_after)
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
            if stopping.is_set():  # SIGTERM or Ctrl-C: checkpoint now and leave, resumable
                end = done
            ckpt.save(checkpoints, done, state, force=done == end)
            bar.update(1)
            if done == end:
                break
    bar.close()
    if stopping.is_set() and end < total_steps:
        raise Stopped(f"stopped by {stopping.signal} at step {end} of {total_steps}")
    if end < total_steps:
        return None

    # Final evaluation: the test split, and a fixed, un-augmented training subset of equal size.
    n_fit = min(n_train, len(ds.test_labels))
    train_loss, train_acc = run_eval(state, ds.train, n_fit)
    test_loss, test_acc = run_eval(state, ds.test, len(ds.test_labels))
    wall_seconds = wall()
    log(dict(step=total_steps, test_loss=test_loss, test_accuracy=test_acc, wall_time=wall_seconds))
    records = [r for r in read_metrics(metrics_path) if "images_per_second" in r]
    macs, activations = flops.macs_and_activations(abstract_model, config.image_size)
    summary = dict(
        model=config.model.name,
        dataset=config.dataset,
        params=models.count_params(abstract_model),
        flops=flops.xla_flops(abstract_model, config.image_size),
        macs=macs,
        activations=activations,
        image_size=config.image_size,
        num_classes=ds.num_classes,
        train_examples=n_train,
        steps=total_steps,
        train_accuracy=train_acc,
        test_accuracy=test_acc,
        train_loss=train_loss,
        test_loss=test_loss,
        generalization_gap=train_acc - test_acc,
        examples_seen=total_steps * config.batch_size,
        wall_seconds=wall_seconds,
        images_per_second=float(np.median([r["images_per_second"] for r in records])),
        devices=devices,
        seed=config.seed,
        config=json_config(config),
    )
    if is_writer:
        write_json_atomic(workdir / "summary.json", summary)
        board.close()
    return summary
