"""The CPU optimisations keep results: same programs, same losses, only faster."""

import functools
import json
import platform
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python
from flax import nnx
from jax import lax

from scaling import flops, models
from scaling.models import resnet
from scaling.ops import onednn
from scaling.ops.conv import NHWC, conv_general_dilated
from scaling.ops.cpu import CONVOLUTION_FLAG


def ynn_convolutions(compiled_text):
    """How many of a compiled CPU program's YNNPACK fusions hold a convolution."""
    called = re.findall(r"calls=%([\w.-]+)[^\n]*__ynn_fusion", compiled_text)
    bodies = dict(re.findall(r"^%([\w.-]+) .*?\{\n(.*?)\n\}", compiled_text, re.S | re.M))
    return sum(" convolution(" in bodies[name] for name in called)


def conv_gradient_program():
    """The compiled CPU program of a convolution's weight gradient."""

    def loss(kernel, x):
        dims = ("NHWC", "HWIO", "NHWC")
        return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=dims).sum()

    args = jnp.ones((3, 3, 8, 8)), jnp.ones((32, 16, 16, 8))
    return jax.jit(jax.grad(loss)).lower(*args).compile().as_text()


@pytest.mark.hlo
def test_convolutions_stay_with_xla_on_cpu():
    text = conv_gradient_program()
    assert " convolution(" in text and ynn_convolutions(text) == 0


@pytest.mark.hlo
def test_cpu_convolution_flag_keeps_the_loss_curve():
    code = """
import json, tempfile
from scaling.config import load_config
from scaling.rundir import read_metrics
from scaling.train import train
config = load_config('configs/train.py:model=resnet8,image_size=16,steps=12,batch_size=64,lr=0.01')
config.log_every = 1
with tempfile.TemporaryDirectory() as d:
    train(config, d)
    losses = [r['loss'] for r in read_metrics(d + '/metrics.jsonl') if 'loss' in r]
import sys; sys.path.insert(0, 'tests')
from test_performance import conv_gradient_program, ynn_convolutions
print(json.dumps([ynn_convolutions(conv_gradient_program()), losses]))
"""
    ynn, ours = json.loads(run_python(code).splitlines()[-1])
    # XLA's default, YNNPACK convolutions, by the user's own setting of the flag.
    flag = f"{CONVOLUTION_FLAG}=+individual_convolution"
    default_ynn, default = json.loads(run_python(code, xla_flags=flag).splitlines()[-1])
    assert ynn == 0 and default_ynn > 0 and len(ours) == 12
    # Another library sums each convolution in another order: the same bound as sharding gets
    # in test_train.test_one_device_equals_eight_devices.
    np.testing.assert_allclose(ours[:5], default[:5], rtol=1e-5)
    np.testing.assert_allclose(ours, default, rtol=5e-4)


@pytest.mark.parametrize(
    "kernel,stride,padding",
    [(3, 1, "SAME"), (1, 1, "SAME"), (5, 1, ((1, 3), (2, 0))), (3, 1, "VALID"), (3, 2, "SAME"),
     (3, 2, ((1, 1), (1, 1))), (1, 2, "VALID"), (5, 3, ((2, 1), (0, 2))), (2, 2, "VALID")],
)  # fmt: skip
def test_conv_is_xlas_convolution(kernel, stride, padding):
    # ResNet's convolutions spell their kernel gradient out in XLA:CPU's canonical layouts: the
    # same function, values and gradients, for any padding and stride (odd sides: the last
    # strided window leaves pixels out).
    x = jax.random.normal(jax.random.key(0), (3, 9, 7, 4))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, 4, 5))

    def loss(conv):
        def f(x, w):
            y = conv(x, w, (stride,) * 2, padding, (1, 1), (1, 1), dimension_numbers=NHWC)
            return jnp.sum(jnp.sin(y))

        return jax.jit(jax.value_and_grad(f, (0, 1)))(x, w)

    (y1, g1), (y2, g2) = loss(lax.conv_general_dilated), loss(conv_general_dilated)
    assert float(y2) == pytest.approx(float(y1), rel=1e-5)
    for ours, xlas in zip(g2, g1, strict=True):
        np.testing.assert_allclose(ours, xlas, atol=1e-4)


@pytest.mark.parametrize("stride,cin,cout", [(1, 4, 6), (1, 6, 4), (2, 6, 4), (2, 4, 6)])
def test_pointwise_conv_is_xlas_convolution(stride, cin, cout):
    # With pointwise=True (EfficientNet, CoAtNet) 1x1 convolutions at any stride are matrix
    # products, their own backward pass included: the same function, values and gradients (odd
    # sides check the strided sampling).
    x = jax.random.normal(jax.random.key(0), (3, 9, 7, cin))
    w = jax.random.normal(jax.random.key(1), (1, 1, cin, cout))
    pointwise = functools.partial(conv_general_dilated, pointwise=True)

    def loss(conv):
        def f(x, w):
            y = conv(x, w, (stride,) * 2, "SAME", (1, 1), (1, 1), dimension_numbers=NHWC)
            return jnp.sum(jnp.sin(y))

        return jax.jit(jax.value_and_grad(f, (0, 1)))

    (y1, g1), (y2, g2) = loss(lax.conv_general_dilated)(x, w), loss(pointwise)(x, w)
    assert float(y2) == pytest.approx(float(y1), rel=1e-5)
    for ours, xlas in zip(g2, g1, strict=True):
        np.testing.assert_allclose(ours, xlas, atol=1e-4)


@pytest.mark.hlo
@pytest.mark.parametrize("stride,cin,cout", [(1, 4, 6), (1, 6, 4), (2, 6, 4), (2, 4, 6)])
def test_pointwise_conv_compiles_to_no_convolution(stride, cin, cout):
    # ... and no convolution is left in the compiled program, its backward pass included.
    x, w = jnp.ones((3, 9, 7, cin)), jnp.ones((1, 1, cin, cout))
    pointwise = functools.partial(conv_general_dilated, pointwise=True)

    def f(x, w):
        y = pointwise(x, w, (stride,) * 2, "SAME", (1, 1), (1, 1), dimension_numbers=NHWC)
        return jnp.sum(jnp.sin(y))

    text = jax.jit(jax.value_and_grad(f, (0, 1))).lower(x, w).compile().as_text()
    assert "convolution(" not in text


@pytest.mark.hlo
def test_kernel_gradient_transposes_its_input_behind_a_conditional():
    # XLA:CPU would fuse the ReLU into the transpose of the kernel gradient's input, which
    # then runs several times slower; a conditional keeps them apart in the compiled program
    # (where oneDNN's convolutions are not used).
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))

    def loss(w, x):
        y = conv_general_dilated(
            jax.nn.relu(x), w, (1, 1), "SAME", (1, 1), (1, 1), dimension_numbers=NHWC
        )
        return jnp.sum(y)

    with onednn.disabled():
        compiled = jax.jit(jax.grad(loss)).lower(w, x).compile().as_text()
    assert compiled.count("conditional(") == 1


def sgd_step(model, x):
    """One plain SGD step of a training-mode loss, in place; returns the loss."""

    def loss(model):
        return jnp.mean(model(x) ** 2)

    value, grads = nnx.value_and_grad(loss)(model)
    nnx.update(model, jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(model, nnx.Param), grads))
    return value


def weights(model):
    return nnx.state(model, nnx.Param, nnx.BatchStat)


def test_scanned_resnet_is_the_unrolled_one():
    scanned = models.create("resnet20", num_classes=10, seed=0)
    plain = models.create("resnet20", num_classes=10, seed=0, scan=False)
    # Stages of three blocks: the first, then a Stack of two scanned ones.
    assert [type(b).__name__ for b in scanned.blocks].count("Stack") == 3
    assert len(plain.blocks) == 9 and models.count_params(scanned) == 269_722
    # Same initial weights, step and running statistics.
    same = lambda a, b: jax.tree.map(  # noqa: E731
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), a, b
    )
    same(weights(resnet.unrolled(scanned)), weights(plain))
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    assert float(sgd_step(scanned, x)) == pytest.approx(float(sgd_step(plain, x)), rel=1e-6)
    same(weights(resnet.unrolled(scanned)), weights(plain))
    # FLOP counters see every layer.
    counted = models.abstract("resnet20", num_classes=10), models.abstract("resnet20", scan=False)
    assert flops.macs_and_activations(counted[0], 32) == flops.macs_and_activations(counted[1], 32)
    assert flops.xla_flops(counted[0], 32) == pytest.approx(flops.xla_flops(counted[1], 32), 1e-3)


@pytest.mark.hlo
@pytest.mark.parametrize("backend,loops", [("cpu", 1), ("gpu", 0), ("tpu", 0)])
def test_scanned_blocks_loop_on_cpu_only(monkeypatch, backend, loops):
    # Accelerators unroll the scan (stack.scan_blocks); the weights stay stacked either way.
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    model = models.create("vit_ti16", num_classes=10, image_size=32, seed=0)
    graphdef, state = nnx.split(model)
    x = jnp.zeros((2, 32, 32, 3))
    text = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).as_text()
    assert text.count("stablehlo.while") == loops


@pytest.mark.hlo
@pytest.mark.parametrize("name,loops", [("resnet20", 0), ("resnet32", 0), ("resnet44", 3)])
def test_short_stacks_are_unrolled(name, loops):
    # Stacks of 2, 4 and 6 blocks: the CPU loops over the last only (stack.SHORT_STACK).
    model = models.create(name, num_classes=10, seed=0)
    assert [type(b).__name__ for b in model.blocks].count("Stack") == 3
    graphdef, state = nnx.split(model)
    x = jnp.zeros((2, 16, 16, 3))
    text = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).as_text()
    assert text.count("stablehlo.while") == loops


def test_resnet_scans_only_dropout_free_runs_of_blocks():
    count = lambda model: [type(b).__name__ for b in model.blocks].count("Stack")  # noqa: E731
    assert count(models.abstract("wrn16_4")) == 0  # two blocks a stage: nothing to scan
    assert count(models.abstract("wrn22_4")) == 3
    assert count(models.abstract("wrn22_4", block_dropout=0.3)) == 0


PAGE_FAULTS = """
import resource
from scaling.ops import cpu
cpu.configure()  # sets up malloc before JAX starts its threads (unless SCALING_MALLOPT=0)
import jax, jax.numpy as jnp
x = jnp.ones(2**24)
# tanh(x) is a temporary buffer of 64 MB, above glibc's largest mmap threshold (32 MB).
tanh_sum = jax.jit(lambda x: (jnp.tanh(x).reshape(4096, 4096) @ jnp.ones(4096)).sum())
for _ in range(3):
    jax.block_until_ready(tanh_sum(x))
faults = []
for _ in range(15):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(tanh_sum(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc settings are glibc's")
def test_freed_buffers_are_reused_without_page_faults(monkeypatch):
    # By default every call's buffer is a fresh mmap, faulted in page by page: 16,384 pages of
    # 4 KB. Kept, it comes back from the heap. The fewest of 15 calls: with the other cores busy,
    # a call's buffers can be freed by XLA's threads after the next call has allocated its own,
    # so the heap grows (and faults) for the first few to eight calls, then serves every call
    # (measured beside a training process: faults in calls 1-8, then none).
    monkeypatch.setenv("SCALING_MALLOPT", "0")
    assert int(run_python(PAGE_FAULTS)) >= 16_384
    monkeypatch.delenv("SCALING_MALLOPT")
    assert int(run_python(PAGE_FAULTS)) < 100
