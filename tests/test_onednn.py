"""oneDNN's convolutions (scaling.ops.onednn): the same function as XLA's, sharded like it."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python
from flax import nnx
from jax import lax

from scaling import flops, models
from scaling.ops import onednn
from scaling.ops.conv import NHWC

# CI installs the `cpu` extra (make test), so there the convolutions must be built, not skipped.
if not onednn.available():
    assert not os.environ.get("CI"), "oneDNN's convolutions did not build"
    pytest.skip("the `cpu` extra or a C++ compiler is missing", allow_module_level=True)


# (image shape, kernel side, stride, padding)
GEOMETRIES = [
    ((3, 9, 7, 4), 3, 1, ((1, 1), (1, 1))), ((3, 9, 7, 4), 3, 2, ((1, 1), (1, 0))),
    ((3, 9, 7, 4), 5, 3, ((2, 1), (0, 2))), ((3, 9, 7, 4), 1, 2, ((0, 0), (0, 0))),
    ((2, 33, 30, 3), 7, 2, ((3, 3), (3, 3))), ((3, 8, 8, 4), 2, 2, ((0, 0), (0, 0))),
]  # fmt: skip


@pytest.mark.parametrize("shape,kernel,stride,padding", GEOMETRIES)
def test_conv_is_xlas_convolution(shape, kernel, stride, padding):
    # Values and both gradients, for strides 1-3, odd sides, uneven padding and a 7x7 stem.
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, shape[-1], 5))

    def loss(conv):
        return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), (0, 1)))

    def xla(x, w):
        return lax.conv_general_dilated(x, w, (stride,) * 2, padding, dimension_numbers=NHWC)

    def ours(x, w):
        return onednn.conv(x, w, (stride,) * 2, padding)

    (y1, g1), (y2, g2) = loss(xla)(x, w), loss(ours)(x, w)
    assert float(y2) == pytest.approx(float(y1), rel=1e-5)
    for a, b in zip(g2, g1, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4)


@pytest.mark.hlo
@pytest.mark.parametrize("shape,kernel,stride,padding", GEOMETRIES)
def test_kernel_gradient_is_onednns(shape, kernel, stride, padding):
    # ... and the compiled program's kernel gradient is oneDNN's for each of them.
    x, w = jnp.ones(shape), jnp.ones((kernel, kernel, shape[-1], 5))

    def loss(x, w):
        return jnp.sum(jnp.sin(onednn.conv(x, w, (stride,) * 2, padding)))

    text = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(x, w).compile().as_text()
    assert "scaling_conv_kernel_gradient" in text


@pytest.mark.parametrize("groups,features", [(2, 6), (4, 4), (4, 8)])
def test_grouped_conv_is_xlas_grouped_convolution(groups, features):
    # A kernel with fewer inputs than the image has channels is grouped: depthwise (4 groups of
    # one channel) with one or two outputs per group, and two groups of two channels.
    x = jax.random.normal(jax.random.key(0), (3, 9, 7, 4))
    w = jax.random.normal(jax.random.key(1), (3, 3, 4 // groups, features))
    padding = ((1, 1), (0, 1))

    def loss(conv):
        return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), (0, 1)))

    def xla(x, w):
        return lax.conv_general_dilated(x, w, (2, 1), padding, dimension_numbers=NHWC,
                                        feature_group_count=groups)  # fmt: skip

    (y1, g1), (y2, g2) = (
        loss(xla)(x, w),
        loss(lambda x, w: onednn.conv(x, w, (2, 1), padding))(x, w),
    )
    assert float(y2) == pytest.approx(float(y1), rel=1e-5)
    for a, b in zip(g2, g1, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4)


def resnet8_programs():
    """resnet8 and its forward pass lowered with oneDNN's convolutions, then with XLA's."""
    model = models.create("resnet8", num_classes=10, seed=0)
    model.eval()  # as xla_flops counts it
    graphdef, state = nnx.split(model)
    x = jnp.ones((2, 16, 16, 3))

    def lowered():  # traced afresh on each call
        return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)).lower(state, x)

    ours = lowered()
    with onednn.disabled():
        xlas = lowered()
    return model, ours, xlas


@pytest.mark.hlo
def test_resnet_convolutions_are_onednn_calls():
    _, ours, xlas = resnet8_programs()
    assert ours.as_text().count("scaling_conv_forward") == 7  # stem, two 3x3 convs per block
    assert "scaling_conv" not in xlas.as_text()


def test_resnets_train_with_it_and_count_xlas_flops():
    # ResNet's convolutions go to oneDNN on CPU; FLOPs are still counted on XLA's convolutions,
    # since XLA's cost analysis counts a custom call as free.
    model, ours, xlas = resnet8_programs()
    counted = 2 * flops.xla_flops(model, 16)
    assert counted == pytest.approx(xlas.cost_analysis()["flops"], rel=1e-3)
    assert counted > 5 * ours.cost_analysis()["flops"]


def sharded_gradient() -> dict:
    """The gradients of oneDNN's convolution with the batch sharded over 4 devices: their errors
    against XLA's, their shardings, and the compiled program's collectives and oneDNN calls."""
    code = """
import json, jax, jax.numpy as jnp, numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scaling.ops import onednn
from scaling.ops.conv import NHWC
mesh = Mesh(np.array(jax.devices()), ("data",))
x = jax.random.normal(jax.random.key(0), (8, 8, 8, 4))
w = jax.random.normal(jax.random.key(1), (3, 3, 4, 6))
x = jax.device_put(x, NamedSharding(mesh, P("data")))
w = jax.device_put(w, NamedSharding(mesh, P()))
pad = ((1, 1), (1, 1))
def grad(conv):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), (0, 1)))
ours = grad(lambda x, w: onednn.conv(x, w, (1, 1), pad))
xlas = grad(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=NHWC))
text = ours.lower(x, w).compile().as_text()
for _ in range(3):  # steps dispatched back to back, as training does
    g = ours(x, w)
print(json.dumps(dict(
    errors=[float(jnp.abs(a - b).max()) for a, b in zip(g, xlas(x, w))],
    specs=[list(a.sharding.spec) for a in g],
    gathers=text.count("all-gather"), sums=text.count("all-reduce("),
    calls=text.count("scaling_conv_"))))
"""
    return json.loads(run_python(code, devices=4, timeout=200).splitlines()[-1])


def test_gradient_with_the_batch_sharded_over_devices():
    # Each device convolves its share of the batch; the kernel gradient is summed over them.
    out = sharded_gradient()
    assert max(out["errors"]) < 1e-4
    assert out["specs"] == [["data"], []]


@pytest.mark.hlo
def test_sharded_gradient_sums_once_and_gathers_nothing():
    out = sharded_gradient()
    assert out["gathers"] == 0 and out["sums"] == 1 and out["calls"] == 3


def test_convolutions_xla_runs_at_once_do_not_hang():
    # XLA runs independent operations on threads of its own; oneDNN's OpenMP teams started from
    # two of them at once hung the process, so the calls take turns.
    code = """
import os
os.environ["OMP_NUM_THREADS"] = "2"  # a team per call, whatever the test session sets
import jax, jax.numpy as jnp
from scaling.ops import onednn
xs = [jax.random.normal(jax.random.key(i), (32, 16, 16, 16)) for i in range(4)]
w = jax.random.normal(jax.random.key(9), (3, 3, 16, 16))
def loss(w):
    return sum(jnp.sum(jnp.sin(onednn.conv(x, w, (1, 1), ((1, 1), (1, 1))))) for x in xs)
step = jax.jit(jax.grad(loss))
for _ in range(50):
    g = step(w)
print(float(jnp.abs(g - jax.grad(loss)(w)).max()))
"""
    assert float(run_python(code, timeout=120).splitlines()[-1]) < 1e-3
