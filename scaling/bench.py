"""`scaling bench`: how fast each model trains on this machine, against its peak and PyTorch.

    scaling bench                                   # the five standard models, batch 128, 32x32
    scaling bench --models resnet20 wrn28_10 --batch 64 --steps 5 --out results/bench
    scaling bench --compare torch --out results/bench

Per model: compile seconds, training and evaluation images/second (the median of `--windows`
timed windows of `--steps` steps each, after a warm-up, with the device synchronised at the end
of every window), peak memory, FLOPs of one training step by XLA's cost analysis, the FLOP/s
that makes, and the utilisation against this machine's measured peak (a large matmul timed
the same way) and, on accelerators, the chip's datasheet peak; also the images/second of the
training input pipeline alone (in memory, or `--stream SOURCE` decoded from disk as
`config.stream` training reads it), and that as a multiple of what the training step consumes.
With `--compare torch` the PyTorch twins of `scaling.twins` (same layers, same parameter
count, checked; PyTorch is the `torch` extra) are timed window by window in turn with the JAX
model, on the CPU, each twin in a process of its own with glibc's default malloc settings:
PyTorch as a user runs it. In one process with JAX it ran 20-50% slower (JAX's threads and the
malloc settings of `scaling.ops.cpu.configure()` beside it; docs/performance.md). The ratio is
the median, over the windows, of each JAX window's ratio to the PyTorch window beside
it, with its range: the host's speed drifts by more than the libraries differ.
"""

import contextlib
import functools
import itertools
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import jax
import numpy as np
from flax import nnx

from scaling import ScalingError, data, flops, models, ops, pipeline, train
from scaling.config import training_config
from scaling.optim import make_optimizer
from scaling.steps import DTYPES, make_steps

# The standard benchmark: one model per family at CIFAR size, the twins' shapes.
MODELS = {
    "resnet20": ("resnet20", {}),
    "wrn16_4": ("wrn16_4", {}),
    "efficientnet_b0": ("efficientnet_b0", {}),
    "vit_s4": ("vit_s4", {}),
    "coatnet_cctt": (
        "coatnet",
        dict(layout="CCTT", depths=(1, 1, 2, 3, 1), dims=(16, 24, 40, 96, 160), small_images=True),
    ),
}
# Dense bfloat16 peaks from the vendors' datasheets (FLOP/s), by jax's device_kind.
DATASHEET_PEAK = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
}


def spec(name):
    """(registry name, settings) of a benchmark model: a MODELS entry or any registry name."""
    return MODELS.get(name, (name, {}))


def windows_of(runners: dict, windows: int) -> dict[str, list[float]]:
    """Seconds per window of each runner, the runners taking turns window by window so that
    a drift in the machine's speed reaches all of them alike."""
    seconds = {label: [] for label in runners}
    for _ in range(windows):
        for label, run in runners.items():
            start = time.perf_counter()
            run()
            seconds[label].append(time.perf_counter() - start)
    return seconds


def processor() -> str:
    """The CPU's model name (Linux), else what the platform module knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def measured_peak(dtype, windows=5) -> float:
    """FLOP/s of a large square matmul, the practical peak of this device."""
    n = 2048 if ops.backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)  # constant data runs faster on GPUs
    matmul = jax.jit(lambda a: a @ a)
    jax.block_until_ready(matmul(a))
    reps = 4
    seconds = windows_of(
        {"mm": lambda: jax.block_until_ready([matmul(a) for _ in range(reps)])}, windows
    )
    return 2 * n**3 * reps / statistics.median(seconds["mm"])


def jax_runners(name, batch, image_size, steps, dtype, stream=None):
    """Compile one model's train and eval steps; returns (facts, and runners of the training
    step, the evaluation step and the training input pipeline)."""
    registry_name, settings = spec(name)
    arg = f"model={registry_name},image_size={image_size},batch_size={batch},steps=1000"
    config = training_config(arg)  # the package's own: no configs/ file needed
    with config.unlocked():
        config.model.update(settings)
        config.augment = "none"  # the twins do not augment: time the networks alone
        config.compute_dtype = dtype
    model_settings = dict(train.settings_of(config), num_classes=10)
    stats = np.zeros(3, np.float32), np.ones(3, np.float32)
    program = train.build(config, model_settings, 1000, *stats)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, image_size, image_size, 3)).astype(np.uint8)
    labels = rng.integers(0, 10, batch).astype(np.int32)
    x, y = (jax.device_put(a, program.batch_sharding) for a in (images, labels))
    mask = jax.device_put(np.ones(batch, np.float32), program.batch_sharding)

    start = time.perf_counter()
    train_step = program.train_step.lower(program.state, x, y).compile()
    compile_seconds = time.perf_counter() - start
    eval_step = program.eval_step.lower(program.state, x, y, mask).compile()
    memory = train_step.memory_analysis()
    peak_bytes = None
    if memory is not None:
        peak_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                      + memory.temp_size_in_bytes - memory.alias_size_in_bytes)  # fmt: skip
    box = {"state": program.state}

    def run_train():
        for _ in range(steps):
            box["state"] = train_step(box["state"], x, y)
        jax.block_until_ready(box["state"])

    def run_eval():
        jax.block_until_ready([eval_step(box["state"], x, y, mask) for _ in range(steps)])

    run_train(), run_eval()  # warm-up: first-call allocations, thread pools
    run_input = input_runner(batch, image_size, steps, program.batch_sharding, stream)
    facts = dict(
        params=models.count_params(program.abstract_model),
        compile_seconds=compile_seconds,
        flops_per_step=train_step_flops(config, model_settings, program.state, x, y),
        peak_memory_bytes=peak_bytes,
    )
    return facts, run_train, run_eval, run_input


def input_runner(batch, image_size, steps, sharding, stream=None):
    """The training input pipeline alone, as `scaling train` runs it by default: `steps`
    batches from an in-memory set of CIFAR-10's 50,000 training images (fewer at sizes where
    they would pass 512 MiB), gathered on the devices on accelerators, on the host on CPU; or
    decoded from the `stream` source as `config.stream` training reads it."""
    ds, box = input_dataset(batch, image_size, stream), {"step": 0}
    on_device = pipeline.data_on_device(None, ds)  # as `scaling train` decides by default
    if on_device:  # the devices' copy of the training set is made once, as in a run
        endless = pipeline.global_batches(ds, 0, 2**31 - 1, batch, 0, sharding, True)
    # A host pipeline starts afresh each window, so batches read ahead between windows never count.

    def run_input():
        start, box["step"] = box["step"], box["step"] + steps
        batches = (
            itertools.islice(endless, steps)
            if on_device
            else pipeline.global_batches(ds, start, start + steps, batch, 0, sharding, False)
        )
        for arrays in batches:
            jax.block_until_ready(arrays)

    run_input()
    return run_input


@functools.lru_cache(maxsize=1)  # the same for every model of a run: made once
def input_dataset(batch, image_size, stream=None):
    if stream:
        ds = data.open_stream(stream, image_size)
        if len(ds.train_labels) < batch:
            raise ScalingError(f"--stream {stream} has fewer than {batch} training images")
        return ds
    count = min(50_000, max(4 * batch, 2**29 // (3 * image_size**2)))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, image_size, image_size, 3), np.uint8)
    return data.Dataset("bench", images, rng.integers(0, 10, count, np.int32), None, None, ())


def train_step_flops(config, model_settings, state, x, y) -> float:
    """XLA's FLOP count of one training step. XLA counts a loop's body once, so the step is
    lowered (not compiled) again with scanned layers unrolled and depthwise convolutions as
    XLA's (whose CPU backward pass loops over the examples), as flops.xla_flops does."""
    abstract = models.abstract(config.model.name, **model_settings)
    abstract.train()
    train_def = nnx.graphdef(abstract)
    abstract.eval()
    tx, _ = make_optimizer(config, 1000)
    step, _ = make_steps(config, train_def, nnx.graphdef(abstract), tx)
    with ops.counting():  # traced in the counted form
        return flops.cost_flops(step, (state, x, y))


def load_twins():
    """`scaling.twins`, imported only here: it needs PyTorch (the `torch` extra)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ScalingError(
            "--compare torch needs PyTorch: pip install torch "
            "--index-url https://download.pytorch.org/whl/cpu"
        ) from None
    from scaling import twins

    return twins


def torch_runners(twins, name, batch, image_size, steps, params):
    """The PyTorch twin's train and eval runners, after checking its parameter count."""
    import torch

    model = twins.build(name, num_classes=10)
    if (count := twins.count_params(model)) != params:
        raise ScalingError(f"the PyTorch twin of {name} has {count} parameters, JAX {params}")
    model = model.to(memory_format=torch.channels_last)  # PyTorch's fastest CPU conv layout
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, image_size, image_size, generator=generator)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=generator)
    loss_fn = torch.nn.CrossEntropyLoss()

    def run_train():
        model.train()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()

    def run_eval():
        model.eval()
        with torch.no_grad():
            for _ in range(steps):
                model(x)

    run_train(), run_eval()
    return run_train, run_eval


def torch_worker(conn, name, batch, image_size, steps, params):
    """The twin's side of `torch_process`: build and warm up, say so, then run a window per
    request ("train" or "eval") until told None."""
    try:
        twin = torch_runners(load_twins(), name, batch, image_size, steps, params)
    except ScalingError as e:
        conn.send(("error", str(e)))
        return
    conn.send(("ready", None))
    runners = dict(train=twin[0], eval=twin[1])
    while (kind := conn.recv()) is not None:
        runners[kind]()
        conn.send(kind)


@contextlib.contextmanager
def torch_process(name, batch, image_size, steps, params):
    """Train and eval runners that each time one window of the PyTorch twin in a process of
    its own, started with glibc's malloc defaults (SCALING_MALLOPT=0)."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no JAX threads
    conn, child_conn = context.Pipe()
    args = (child_conn, name, batch, image_size, steps, params)
    process = context.Process(target=torch_worker, args=args, daemon=True)
    with mock.patch.dict(os.environ, SCALING_MALLOPT="0"):  # inherited as the child starts
        process.start()
    child_conn.close()  # the child's end stays open in the child alone: its exit is an EOF

    def receive():
        try:
            return conn.recv()
        except EOFError:
            raise ScalingError(
                f"the PyTorch twin of {name} stopped (exit code {process.exitcode})"
            ) from None

    def request(kind):
        conn.send(kind)
        return receive()

    try:
        status, message = receive()
        if status == "error":
            raise ScalingError(message)
        yield functools.partial(request, "train"), functools.partial(request, "eval")
    finally:
        if process.is_alive():
            with contextlib.suppress(OSError):
                conn.send(None)
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def bench(names, *, batch=128, image_size=32, steps=3, windows=5, dtype=None, compare=None,
          stream=None, echo=print):  # fmt: skip
    """One record per model (see the module docstring); also the machine's facts."""
    dtype = dtype or ("float32" if ops.backend() == "cpu" else "bfloat16")
    if compare and ops.backend() != "cpu":
        raise ScalingError("--compare torch times the PyTorch twins on the CPU: run it there")
    if batch % jax.device_count():
        raise ScalingError(f"--batch {batch} is not divisible by {jax.device_count()} devices")
    twins = load_twins() if compare else None
    for name in names:  # bad names fail before any timing
        registry_name, settings = spec(name)
        models.abstract(registry_name, image_size=image_size, **settings)
        if compare and name not in twins.TWINS:
            raise ScalingError(f"no PyTorch twin of {name}; twins: {', '.join(MODELS)}")
    if stream:
        input_dataset(batch, image_size, stream)  # a bad source fails before any timing too
    device = jax.devices()[0]
    peak = measured_peak(DTYPES[dtype])
    machine = dict(
        device=device.device_kind, platform=ops.backend(), devices=jax.device_count(),
        processor=processor(), python=sys.version.split()[0],
        jax=jax.__version__, dtype=dtype, measured_peak_flops=peak,
        datasheet_peak_flops=DATASHEET_PEAK.get(device.device_kind),
        input=f"streamed from {stream}" if stream else "in memory",
    )  # fmt: skip
    if compare:
        import torch

        machine["torch"] = torch.__version__
    echo(f"{device.device_kind} ({ops.backend()}), {dtype}: peak {peak / 1e9:.1f} GFLOP/s")
    records = []
    for name in names:
        facts, jax_train, jax_eval, jax_input = jax_runners(
            name, batch, image_size, steps, dtype, stream
        )
        runners = {"jax_train": jax_train, "jax_eval": jax_eval, "input": jax_input}
        with contextlib.ExitStack() as stack:
            if compare:
                torch_train, torch_eval = stack.enter_context(
                    torch_process(name, batch, image_size, steps, facts["params"])
                )
                runners |= {"torch_train": torch_train, "torch_eval": torch_eval}
            seconds = windows_of(runners, windows)
        rates = {f"{k}_images_per_second": batch * steps / statistics.median(v)
                 for k, v in seconds.items()}  # fmt: skip
        record = dict(model=name, batch=batch, image_size=image_size, **facts, **rates)
        achieved = facts["flops_per_step"] * rates["jax_train_images_per_second"] / batch
        record |= dict(achieved_flops=achieved, utilisation=achieved / peak)
        record["input_over_train"] = (
            rates["input_images_per_second"] / rates["jax_train_images_per_second"]
        )
        if machine["datasheet_peak_flops"] and dtype == "bfloat16":  # the datasheet's is bf16
            record["datasheet_utilisation"] = achieved / machine["datasheet_peak_flops"]
        if compare:
            # Window by window: each pair of neighbouring windows saw the same host speed.
            ratios = [t / j for j, t in zip(seconds["jax_train"], seconds["torch_train"],
                                            strict=True)]  # fmt: skip
            record["jax_over_torch"] = statistics.median(ratios)
            record["jax_over_torch_range"] = [min(ratios), max(ratios)]
        echo(table([record])[-1])
        records.append(record)
    return dict(machine=machine, records=records)


def table(records) -> list[str]:
    """Markdown rows: the header, then one per record."""
    columns = [("model", "{}"), ("params", "{:,}"), ("compile_seconds", "{:.1f}"),
               ("jax_train_images_per_second", "{:.1f}"), ("jax_eval_images_per_second", "{:.1f}"),
               ("flops_per_step", "{:.3g}"), ("achieved_flops", "{:.3g}"),
               ("utilisation", "{:.1%}"), ("datasheet_utilisation", "{:.1%}"),
               ("peak_memory_bytes", "{:.3g}"), ("input_images_per_second", "{:.0f}"),
               ("input_over_train", "{:.0f}x"), ("torch_train_images_per_second", "{:.1f}"),
               ("torch_eval_images_per_second", "{:.1f}"),
               ("jax_over_torch", "{:.2f}"),
               ("jax_over_torch_range", "{0[0]:.2f}-{0[1]:.2f}")]  # fmt: skip
    present = [(c, f) for c, f in columns if any(r.get(c) is not None for r in records)]
    rows = ["| " + " | ".join(c for c, _ in present) + " |", "|" + "---|" * len(present)]
    for r in records:
        rows.append(
            "| " + " | ".join("" if r.get(c) is None else f.format(r[c]) for c, f in present) + " |"
        )
    return rows


TORCH_NOTE = (" Each PyTorch twin ran in a process of its own with glibc's default malloc "
              "settings; jax_over_torch is the median of the windows' ratios, its range beside "
              "it.")  # fmt: skip


def write(result, out: Path, command: str):
    """out/bench.json and out/README.md (the table, the command and the machine)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(dict(result, command=command), indent=1) + "\n")
    m = result["machine"]
    lines = [f"# Benchmark: {m['device']}", "", f"    {command}", "",
             f"{m['device']} ({m['processor']}, {m['devices']} device(s)), {m['dtype']}, "
             f"jax {m['jax']}" + (f", torch {m['torch']}" if "torch" in m else "") +
             f"; measured matmul peak {m['measured_peak_flops'] / 1e9:.1f} GFLOP/s; "
             f"input pipeline {m.get('input', 'in memory')}." + TORCH_NOTE * ("torch" in m), "",
             *table(result["records"]), ""]  # fmt: skip
    (out / "README.md").write_text("\n".join(lines))
