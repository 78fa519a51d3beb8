import atexit
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from scaling.ops import cpu

cpu.configure()  # as the command line does, before JAX starts (tests train on the CPU)

from scaling.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = str(ROOT / "configs" / "train.py")

# One compilation cache for the whole session, in-process and in every subprocess: many tests
# compile the same tiny networks, and a cache hit turns a ~10 s start into ~3 s. Set before JAX
# is imported (scaling.config does not import it).
# Removed at exit, after every subprocess has finished with it: each session's cache is ~20 MB.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="scaling-tests-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Tests compile far more than they compute: XLA's slower optimisation passes off, in this
# process and its subprocesses, as the Flax examples' tests do (the whole suite: 23.0 -> 17.8
# CPU minutes).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# For the same reason, XLA:CPU's older loop emitters instead of its MLIR fusion emitters: they
# compile a small EfficientNet's training step in 1.5 s instead of 5.0 s, with the same losses.
# Their programs run slower (resnet20 trains at 558 images/s instead of 661), so the library
# keeps XLA's default; only these compile-bound tests take the trade.
FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false"
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
# oneDNN's convolutions on one thread: two pytest workers already keep both cores busy (one
# run each: 9:52 with OpenMP teams on top of them, 8:49 without).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(items):
    """The slow tests first (each file's in its order): the two workers then end on short tests
    together, not one of them on a 30-second test while the other waits."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def digits_tree(tmp_path_factory) -> Path:
    """scikit-learn's digits as an image-folder tree of PNG files: every fifth image in test/."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits-tree")
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / ("test" if i % 5 == 0 else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image * (255 / 16)).astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture
def tiny_config():
    """A run that takes seconds: ResNet-8 on digits at 8x8."""

    def make(**overrides):
        config = load_config(f"{TRAIN_CONFIG}:model=resnet8,image_size=8,steps=20,batch_size=64")
        config.log_every = 5
        config.checkpoint_every = 10
        config.update(overrides)
        return config

    return make


def run_python(code, *, devices=1, xla_flags="", timeout=300):
    """Run `code` in a fresh interpreter with `devices` simulated CPU devices and any further
    `xla_flags`; return stdout."""
    ours = "" if cpu.CONVOLUTION_FLAG in xla_flags else cpu.CONVOLUTION_SETTING  # theirs wins
    flags = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE} {ours} {xla_flags}"
    env = dict(os.environ, XLA_FLAGS=flags)
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def scaling_cli(*args, timeout=300):
    """Run the `scaling` command line; returns the CompletedProcess (not checked)."""
    return subprocess.run(
        [sys.executable, "-m", "scaling.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def one_line_exit_2(argv, capsys) -> str:
    """Run the command line in this process (no JAX start-up to pay, unlike `scaling_cli`); the
    one stderr line it must fail with."""
    from scaling import cli

    with pytest.raises(SystemExit) as end:
        cli.main(argv)
    err = capsys.readouterr().err
    assert end.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"scaling {argv[0]}: error: "), err
    return lines[0]


def initialised(model, drop_rate=0.2, seed=0):
    """An abstract model given initial values with numpy (He-normal kernels, unit norms, zero
    biases and relative-position tables, every block dropping at `drop_rate`): much cheaper
    than initialising it with JAX here, which compiles each initialiser for each shape (a tiny
    CoAtNet: 2.2 s)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from scaling.models.layers import DropRate

    graphdef, state = nnx.split(model)
    rng, flat = np.random.default_rng(seed), []
    for path, var in nnx.to_flat_state(state):
        x = var.get_value()
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            value = jax.random.split(jax.random.key(seed), x.shape)
        elif path[-1] == "kernel":  # HWIO or (in, out): fan-in is all but the last axis
            fan_in = math.prod(x.shape[-4:-1] if len(x.shape) >= 4 else x.shape[-2:-1])
            value = rng.normal(0, math.sqrt(2 / fan_in), x.shape)
        elif path[-1] in ("scale", "var"):
            value = np.ones(x.shape)
        elif isinstance(var, DropRate):
            value = np.full(x.shape, drop_rate)
        else:  # biases, means, counts, relative-position tables
            value = np.zeros(x.shape)
        if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            value = jax.device_put(np.asarray(value, x.dtype))  # no per-shape compilation
        flat.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
