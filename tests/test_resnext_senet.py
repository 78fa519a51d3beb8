"""ResNeXt, torchvision's wide ResNets, SENet and stochastic depth: exact parameter counts against
torchvision, timm and the ResNeXt authors' code, shapes, a short training run, and each block's
drop rate measured (also inside a scanned `Stack` and a ViT's scanned encoder)."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import initialised
from flax import nnx

from scaling import ScalingError, convert, data, models
from scaling.models import layers, resnet, vit
from scaling.models.stack import Stack
from scaling.ops import onednn

# Trainable parameters (BatchNorm statistics excluded): torchvision 0.29's and timm 1.0's models
# counted with torch; the CIFAR ResNeXt-29s from facebookresearch/ResNeXt models/resnext.lua
# (bias-free convs, projection shortcuts; the paper's Table 7: 34.4M and 68.1M).
PARAMS = [
    ("resnext50_32x4d", {}, 25_028_904),
    ("resnext29_8x64d", {}, 34_426_698),
    ("resnext29_16x64d", {}, 68_155_210),
    ("resnext29_8x64d", {"num_classes": 100}, 34_518_948),
    ("wide_resnet50_2", {}, 68_883_240),
    ("resnext101_32x8d", {}, 88_791_336),
    ("resnext101_64x4d", {}, 83_455_272),
    ("wide_resnet101_2", {}, 126_886_696),
    ("seresnet18", {}, 11_779_624),
    ("seresnet34", {}, 21_960_416),
    ("seresnet50", {}, 28_088_024),
    ("seresnet101", {}, 49_326_872),
    ("seresnet152", {}, 66_821_848),
    ("seresnext50_32x4d", {}, 27_559_896),
    # The settings alone make the named forms: ResNet-50 with 32 groups of 4 is ResNeXt-50.
    ("resnet50", {"groups": 32, "base_width": 4}, 25_028_904),
    # Stochastic depth adds no parameter.
    ("resnext29_8x64d", {"stochastic_depth": 0.5}, 34_426_698),
]


@functools.cache
def abstract(name, **settings):
    return models.abstract(name, **settings)


@pytest.mark.parametrize("name,settings,expected", PARAMS)
def test_parameter_counts(name, settings, expected):
    assert models.count_params(abstract(name, **settings)) == expected


def test_grouped_and_se_layers_have_the_references_shapes():
    model = abstract("resnext50_32x4d")
    first = model.blocks[0]  # 32 groups of 4: a 128-wide grouped 3x3, torch's (128, 4, 3, 3)
    assert first.conv2.kernel.shape == (3, 3, 4, 128)
    assert first.conv3.kernel.shape == (1, 1, 128, 256)
    assert abstract("wide_resnet50_2").blocks[0].conv2.kernel.shape == (3, 3, 128, 128)
    cifar = abstract("resnext29_8x64d")  # 8 groups of 64 at the first stage, 3x3 64-wide stem
    assert cifar.stem.kernel.shape == (3, 3, 3, 64)
    assert cifar.blocks[0].conv2.kernel.shape == (3, 3, 64, 512)
    se = abstract("seresnet50").blocks[0].se  # 256 channels reduced to 16 (timm's rounding)
    assert (se.reduce.kernel.shape, se.expand.kernel.shape) == ((256, 16), (16, 256))
    assert [resnet.se_channels(c, 1 / 16) for c in (64, 96, 176, 2048)] == [8, 8, 8, 128]


NEW_FAMILIES = [("resnext29_8x64d", 10), ("wide_resnet50_2", 1000), ("seresnext50_32x4d", 1000)]


@pytest.mark.parametrize("name,classes", NEW_FAMILIES)
@pytest.mark.parametrize("size", [32, 48])
def test_output_shapes_at_two_resolutions(name, classes, size):
    model = abstract(name)
    model.eval()
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    out = nnx.eval_shape(lambda m, x: m(x), model, x)  # traced through, not computed
    assert (out.shape, out.dtype) == ((2, classes), jnp.float32)


def test_names_and_defaults():
    assert models.list_models("resnext*") == [
        "resnext29_8x64d", "resnext29_16x64d", "resnext50_32x4d", "resnext101_32x8d",
        "resnext101_64x4d",
    ]  # fmt: skip
    sizes = {"resnext29_8x64d": 32, "resnext50_32x4d": 224, "wide_resnet50_2": 224,
             "se_wrn16_4": 32, "seresnet50": 224, "se_preact_resnet18": 224}  # fmt: skip
    assert {name: models.default_image_size(name) for name in sizes} == sizes
    # SE on any ResNet-family name: WRN-16-4's last blocks, 256 channels, reduced to 16.
    assert abstract("se_wrn16_4").blocks[-1].se.reduce.kernel.shape == (256, 16)
    assert abstract("se_resnet20", se_ratio=0).blocks[0].se is None


@pytest.mark.parametrize(
    "name,settings,message",
    [
        ("resnext30_8x64d", {}, "9n+2"),
        ("resnext34_32x4d", {}, "9n+2"),
        ("wide_resnet18_2", {}, "depths are 50, 101, 152, 200"),
        ("resnet18", {"groups": 2}, "bottleneck blocks only"),
        ("resnext50_32x4d", {"groups": 0}, "groups must be a positive integer"),
        ("resnet20", {"se_ratio": 2}, "se_ratio must be in [0, 1]"),
        ("resnet20", {"stochastic_depth": 1.0}, "[0, 1)"),
        ("seresnet50", {"se_ratio": -1}, "se_ratio must be in [0, 1]"),
    ],
)
def test_bad_names_and_settings_are_clear_errors(name, settings, message):
    with pytest.raises(ScalingError, match=re.escape(message)):
        models.abstract(name, **settings)


def test_tiny_se_resnext_learns_digits():
    """16 Adam steps of an SE-ResNeXt-29 with 8 groups of 2-8 channels, one block a stage,
    dropping blocks at 0.2, on 8x8 digits: grouped convs, SE and drop paths all train."""
    ds = data.load("digits", 8)
    images = ds.train_images.astype(np.float32)
    images, labels = (images - images.mean()) / images.std(), ds.train_labels
    settings = dict(width_multiplier=0.25, base_width=8, depth_multiplier=0.3, num_classes=10)
    model = initialised(models.abstract("se_resnext29_8x64d", stochastic_depth=0.2, **settings))
    assert model.blocks[0].conv2.kernel.shape == (3, 3, 2, 16)  # 8 groups of 2
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, rest, opt_state, x, y):
        def loss_fn(params):
            model = nnx.merge(graphdef, params, rest, copy=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
            return loss, nnx.state(model, nnx.Not(nnx.Param))

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    opt_state, losses = jax.jit(tx.init)(params), []  # one compilation, not one per shape
    for i in range(16):
        batch = np.arange(32 * i, 32 * (i + 1)) % len(labels)
        params, rest, opt_state, loss = step(params, rest, opt_state, images[batch], labels[batch])
        losses.append(float(loss))
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses


@pytest.mark.skipif(not onednn.available(), reason="oneDNN (the cpu extra) is not installed")
def test_grouped_convolutions_run_as_onednns_with_xlas_values(monkeypatch):
    """On CPU a ResNeXt's grouped 3x3 convolutions are oneDNN's (XLA:CPU's grouped convolution
    trained ResNeXt-29 8x16d 14x slower), with XLA's loss and gradients to float rounding."""
    settings = dict(width_multiplier=0.25, base_width=8, depth_multiplier=0.3, num_classes=10)
    model = initialised(models.abstract("resnext29_8x64d", **settings), drop_rate=0.0)
    model.eval()  # running statistics: nothing to update
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    grouped, conv = [], onednn.conv

    def spy(lhs, rhs, *args):
        grouped.append(rhs.shape[2] < lhs.shape[3])
        return conv(lhs, rhs, *args)

    monkeypatch.setattr(onednn, "conv", spy)

    def loss_and_grads():  # traced afresh each call
        loss = lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p, rest)(x)))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    (ours, ours_grads) = loss_and_grads()
    assert sum(grouped) == 3  # one block a stage, each with one grouped 3x3 convolution
    with onednn.disabled():
        (xlas, xlas_grads) = loss_and_grads()
    assert float(ours) == pytest.approx(float(xlas), rel=1e-5)
    for a, b in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(xlas_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Stochastic depth

DRAWS = 2000  # examples of one batch: each block drops each example's branch independently


def assert_rate(dropped, rate):
    """`dropped` (booleans, one per draw) is a binomial sample of `rate`: within 4.5 sigma."""
    tolerance = 4.5 * math.sqrt(rate * (1 - rate) / dropped.size) + 1e-9
    assert abs(float(np.mean(dropped)) - rate) <= tolerance, (np.mean(dropped), rate)


def bits(total, count):
    """Which of `count` branches, the k-th adding 2^k, summed to `total` (per example)."""
    codes = np.rint(np.asarray(total, np.float64)).astype(np.int64)
    return np.stack([(codes >> k) & 1 for k in range(count)], axis=-1).astype(bool)


def unstacked(model):
    """A ResNet's blocks, a `Stack` standing for its (stacked) blocks."""
    return [b.blocks if isinstance(b, Stack) else b for b in model.blocks]


def test_every_residual_family_has_a_drop_path_in_every_block():
    assert layers.linear_drop_rates(0.5, 5) == [0.0, 0.125, 0.25, 0.375, 0.5]
    for name in ("resnext29_8x64d", "seresnet18", "wrn16_4"):
        model = abstract(name, stochastic_depth=0.3)
        assert all(b.drop_path is not None for b in unstacked(model)), name
    assert all(b.drop_path is None for b in unstacked(abstract("resnext29_8x64d")))  # off: none
    # The rates, read off a model built by a jitted constructor that returns them alone: resnet20
    # has a block and a Stack of two a stage, and the schedule runs on across the stacks.
    build = lambda: nnx.state(models.create("resnet20", stochastic_depth=0.5), layers.DropRate)  # noqa: E731
    rates = sorted(nnx.to_flat_state(jax.jit(build)()), key=lambda item: item[0][1])
    rates = np.concatenate([np.atleast_1d(var.get_value()) for _, var in rates])
    np.testing.assert_allclose(rates, np.linspace(0, 0.5, 9), rtol=1e-6)


def coded_stack(rates, channels=8):
    """A `Stack` of post-activation basic blocks whose branches are constants: each conv zero,
    each block's last BatchNorm (in eval statistics, mean 0, variance 1) adding a bias that,
    divided by the block's survival, is 2^k. The stack's output on zeros then spells, bit k,
    whether block k kept its branch."""
    rngs = nnx.Rngs(0)
    built = resnet.Layers("batch", "symmetric", None, rngs)
    blocks = []
    for k, rate in enumerate(rates):
        block = resnet.BasicBlock(channels, channels, 1, preact=False, shortcut="B", dropout=0.0,
                                  layers=built, se_ratio=0.0, drop_rate=rate)  # fmt: skip
        for conv in (block.conv1, block.conv2):
            conv.kernel[...] = jnp.zeros_like(conv.kernel[...])
        block.norm2.bias[...] = jnp.full((channels,), (1 - rate) * 2.0**k)
        blocks.append(block)
    return Stack(blocks)


def test_stochastic_depth_drops_each_scanned_block_at_its_rate():
    rates = [0.0, 0.1, 0.25, 0.4, 0.5, 0.7]  # more than stack.SHORT_STACK: a loop on the CPU
    stack = coded_stack(rates)
    assert stack.blocks.drop_path.rate.shape == (len(rates),)  # a scan input, not an attribute
    forward = nnx.jit(lambda stack, x: stack(x))
    x = jnp.zeros((DRAWS, 1, 1, 8))
    graphdef, state = nnx.split(stack)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x).jaxpr
    scans = [e.params for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert [(p["length"], p["unroll"]) for p in scans] == [(6, 1)]  # one block, in a loop

    stack.eval()  # the identity: every branch kept, undivided
    expected = sum((1 - r) * 2.0**k for k, r in enumerate(rates))
    np.testing.assert_allclose(forward(stack, x), expected, rtol=1e-6)

    stack.train()
    stack.set_attributes(use_running_average=True)  # BatchNorm fixed; the drop paths train
    first = forward(stack, x)
    kept = bits(first[:, 0, 0, 0], len(rates))
    assert np.all(first == first[:, :, :, :1])  # per example: every channel alike
    for k, rate in enumerate(rates):
        assert_rate(~kept[:, k], rate)
    # Blocks draw independently of one another and from one call to the next.
    assert_rate(~kept[:, 4] & ~kept[:, 5], 0.5 * 0.7)
    again = bits(forward(stack, x)[:, 0, 0, 0], len(rates))
    assert_rate(again[:, 5] != kept[:, 5], 2 * 0.7 * 0.3)


def test_stochastic_depth_is_the_identity_at_evaluation():
    # resnet20's stages: a block and a Stack of two; the same weights with and without.
    plain = initialised(models.abstract("resnet20", width_multiplier=0.25))
    dropping = initialised(models.abstract("resnet20", width_multiplier=0.25, stochastic_depth=0.5))
    nnx.update(dropping, nnx.state(plain, nnx.Any(nnx.Param, nnx.BatchStat)))
    forward = nnx.jit(lambda m, x: m(x))
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
    plain.eval(), dropping.eval()
    np.testing.assert_array_equal(forward(plain, x), forward(dropping, x))


def test_vit_stochastic_depth_grows_linearly_over_the_scanned_encoder():
    depth, width = 5, 8
    settings = dict(width=width, mlp_dim=16, num_heads=2, dropout=0.0, dtype=None)
    make = lambda: vit.Encoder(  # noqa: E731
        depth, scan=True, remat=False, stochastic_depth=0.4, rngs=nnx.Rngs(0), **settings
    )
    # The rates as built (a jitted constructor that returns them alone: it compiles to nothing).
    ((_, rates),) = nnx.to_flat_state(jax.jit(lambda: nnx.state(make(), layers.DropRate))())
    rates = np.asarray(rates.get_value())
    np.testing.assert_allclose(rates, [0.0, 0.1, 0.2, 0.3, 0.4], rtol=1e-6)
    # The encoder with those rates and every branch a constant: attention's output 2^(2k), the
    # MLP's 2^(2k+1), times the survival (output kernels zero, biases the code).
    survival = (1 - rates)[:, None]
    codes = {("attn", "proj"): 0, ("mlp", "fc2"): 1}
    graphdef, state = nnx.split(nnx.eval_shape(make))
    flat = []
    for path, var in nnx.to_flat_state(state):
        if jnp.issubdtype(var.dtype, jax.dtypes.prng_key):
            value = jax.random.split(jax.random.key(0), var.shape)
        elif isinstance(var, layers.DropRate):
            value = rates
        elif path[-1] == "scale":
            value = np.ones(var.shape)
        elif path[-1] == "bias" and path[-3:-1] in codes:
            value = survival * 2.0 ** (2 * np.arange(depth) + codes[path[-3:-1]])[:, None]
            value = np.broadcast_to(value, var.shape)
        else:
            value = np.zeros(var.shape)
        if not jnp.issubdtype(var.dtype, jax.dtypes.prng_key):
            value = jax.device_put(np.asarray(value, var.dtype))
        flat.append((path, var.replace(value)))
    encoder = nnx.merge(graphdef, nnx.from_flat_state(flat))
    forward = nnx.jit(lambda e, x: e(x))
    x = jnp.zeros((DRAWS, 1, width))
    encoder.eval()
    expected = sum(survival[k, 0] * 2.0 ** (2 * k + o) for k in range(depth) for o in (0, 1))
    np.testing.assert_allclose(forward(encoder, x), expected, rtol=1e-6)
    encoder.train()
    kept = bits(forward(encoder, x)[:, 0, 0], 2 * depth)
    for k in range(depth):
        for branch in (0, 1):  # both branches of block k at its rate, drawn separately
            assert_rate(~kept[:, 2 * k + branch], rates[k])
    assert_rate(~kept[:, 8] & ~kept[:, 9], rates[4] ** 2)


def random_values(model, seed=0):
    """Every parameter and BatchNorm statistic of `model` random (numpy's: no compilation)."""
    rng = np.random.default_rng(seed)
    flat = nnx.to_flat_state(nnx.state(model, convert.VARIABLES))
    values = [(p, v.replace(jax.device_put(rng.standard_normal(v.shape).astype(v.dtype))))
              for p, v in flat]  # fmt: skip
    nnx.update(model, nnx.from_flat_state(values))
    return model


def test_weights_export_and_load_back_and_sources_are_told_apart():
    # An SE-ResNeXt of one to two blocks a stage (the third a block and a Stack of two): timm's
    # names with SE, its grouped kernels torch's (out, in / groups, 3, 3).
    small = dict(width_multiplier=0.125, depth_multiplier=0.5, num_classes=7)
    model = random_values(models.abstract("seresnext50_32x4d", **small))
    tensors = convert.export(model, "seresnext50_32x4d", "timm")
    assert convert.detect_source(tensors) == "timm"
    assert tensors["layer3.2.se.fc1.weight"].shape == (8, 128, 1, 1)
    assert tensors["layer1.0.conv2.weight"].shape == (32, 1, 3, 3)  # 32 groups of 1
    empty = models.abstract("seresnext50_32x4d", **small)
    convert.load(empty, "seresnext50_32x4d", tensors)
    theirs = dict(nnx.to_flat_state(nnx.state(empty, convert.VARIABLES)))
    for path, var in nnx.to_flat_state(nnx.state(model, convert.VARIABLES)):
        np.testing.assert_array_equal(theirs[path].get_value(), var.get_value(), str(path))
    # Without SE the same names are torchvision's (its ResNeXt table), which SE nets refuse.
    plain = random_values(models.abstract("resnext50_32x4d", **small))
    tensors = convert.export(plain, "resnext50_32x4d", "torchvision")
    assert convert.detect_source(tensors) == "torchvision"
    with pytest.raises(ScalingError, match="no mapping from torchvision weights to seresnet50"):
        convert.import_model("seresnet50", tensors)
