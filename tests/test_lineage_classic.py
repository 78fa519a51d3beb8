"""The classic lineage: LeNet-5, AlexNet (torchvision's and the paper's), ZFNet and VGG.

Exact parameter counts (the papers' and torchvision's, and by hand where no code gives one),
output shapes at two resolutions, the papers' map sizes, the width and depth settings, the
settings that change the function, the torchvision tables, and a falling loss on digits for one
small member of each family. That the torchvision forms compute torchvision's functions is
tests/test_reference.py's (fixtures `alexnet` and `vgg11_bn`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from scaling import ScalingError, convert, data, models, scale
from scaling.models import layers


def conv(k, cin, cout, groups=1):
    return k * k * (cin // groups) * cout + cout


def dense(fan_in, fan_out):
    return fan_in * fan_out + fan_out


# LeNet-5 with one channel: C1 156, C3 2,416, C5 48,120, F6 10,164, output 850.
LENET5 = conv(5, 1, 6) + conv(5, 6, 16) + conv(5, 16, 120) + dense(120, 84) + dense(84, 10)
# Krizhevsky et al. 2012: convolutions 2, 4 and 5 in two groups (one per GPU); 6x6x256 -> fc6.
ALEXNET_ORIGINAL = (
    conv(11, 3, 96)  # 34,944
    + conv(5, 96, 256, groups=2)  # 307,456
    + conv(3, 256, 384)  # 885,120
    + conv(3, 384, 384, groups=2)  # 663,936
    + conv(3, 384, 256, groups=2)  # 442,624
    + dense(6 * 6 * 256, 4096)  # 37,752,832
    + dense(4096, 4096)  # 16,781,312
    + dense(4096, 1000)  # 4,097,000
)
# Zeiler & Fergus 2013, Figure 3: nothing grouped, 7x7 conv1 on 3 channels.
ZFNET = (
    conv(7, 3, 96)
    + conv(5, 96, 256)
    + conv(3, 256, 384)
    + conv(3, 384, 384)
    + conv(3, 384, 256)
    + dense(6 * 6 * 256, 4096)
    + dense(4096, 4096)
    + dense(4096, 1000)
)
# VGG's convolutions (configuration D) and the CIFAR form's single dense layer.
VGG16_CONVS = sum(
    conv(3, cin, cout)
    for cin, cout in zip(
        (3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512),
        (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512),
        strict=True,
    )
)
VGG16_BN = 2 * (2 * 64 + 2 * 128 + 3 * 256 + 6 * 512)  # BatchNorm's scale and shift

PARAMS = [
    ("lenet5", dict(in_channels=1), 61_706),
    ("lenet5", {}, 62_006),  # RGB input: 300 more weights in C1
    ("alexnet", {}, 61_100_840),
    ("alexnet_original", {}, 60_965_224),
    ("zfnet", {}, 62_357_608),
    # torchvision's counts (torchvision 0.29.1: sum of p.numel() over parameters()).
    ("vgg11", {}, 132_863_336),
    ("vgg11_bn", {}, 132_868_840),
    ("vgg13", {}, 133_047_848),
    ("vgg13_bn", {}, 133_053_736),
    ("vgg16", {}, 138_357_544),
    ("vgg16_bn", {}, 138_365_992),
    ("vgg19", {}, 143_667_240),
    ("vgg19_bn", {}, 143_678_248),
    ("vgg11_cifar", {}, 9_225_610),
    ("vgg11_bn_cifar", {}, 9_231_114),
    ("vgg13_cifar", {}, 9_410_122),
    ("vgg13_bn_cifar", {}, 9_416_010),
    ("vgg16_cifar", {}, 14_719_818),
    ("vgg16_bn_cifar", {}, 14_728_266),
    ("vgg19_cifar", {}, 20_029_514),
    ("vgg19_bn_cifar", {}, 20_040_522),
]


@pytest.mark.parametrize("name,settings,expected", PARAMS)
def test_parameter_counts(name, settings, expected):
    assert models.count_params(models.abstract(name, **settings)) == expected


def test_counts_by_hand():
    assert LENET5 == 61_706
    assert ALEXNET_ORIGINAL == 60_965_224
    assert ZFNET == 62_357_608
    assert VGG16_CONVS + dense(512, 10) == 14_719_818
    assert VGG16_CONVS + VGG16_BN + dense(512, 10) == 14_728_266
    assert VGG16_CONVS + dense(25088, 4096) + dense(4096, 4096) + dense(4096, 1000) == 138_357_544


@pytest.mark.parametrize(
    "name,sizes",
    [
        ("lenet5", (32, 48)),
        ("alexnet", (224, 96)),
        ("alexnet_original", (224, 96)),
        ("zfnet", (224, 96)),
        ("vgg16_bn", (224, 64)),
        ("vgg11_cifar", (32, 48)),
    ],
)
def test_output_shapes_at_two_resolutions(name, sizes):
    model = models.abstract(name, num_classes=7)
    model.eval()
    for size in sizes:
        x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
        out = nnx.eval_shape(lambda m, x: m(x), model, x)  # traced through, not computed
        assert (out.shape, out.dtype) == ((2, 7), jnp.float32)


def test_default_resolutions_and_examples():
    sizes = {name: models.default_image_size(name) for name in models.list_models()}
    assert sizes["lenet5"] == sizes["vgg16_bn_cifar"] == 32
    assert sizes["alexnet"] == sizes["alexnet_original"] == sizes["zfnet"] == sizes["vgg19"] == 224
    assert {"vgg11", "vgg13_bn", "vgg19_cifar", "vgg16_bn_cifar"} <= set(sizes)


@pytest.mark.parametrize(
    "name,size,message",
    [
        ("lenet5", 31, "lenet5 needs images of at least 32x32"),
        ("alexnet", 62, "alexnet needs images of at least 63x63"),
        ("zfnet", 62, "zfnet needs images of at least 63x63"),
        ("vgg11", 31, "VGG needs images of at least 32x32"),
    ],
)
def test_too_small_an_input_is_a_clear_error(name, size, message):
    model = models.abstract(name)
    model.eval()
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    with pytest.raises(ScalingError, match=message):
        nnx.eval_shape(lambda m, x: m(x), model, x)


def conv_shapes(name, size, **settings):
    """(input side, output side) of each convolution of `name` at `size`, traced."""
    model = models.abstract(name, **settings)
    model.eval()
    seen, call = [], nnx.Conv.__call__

    def record(self, x):
        y = call(self, x)
        seen.append((x.shape[1], y.shape[1]))
        return y

    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nnx.Conv, "__call__", record)
        nnx.eval_shape(lambda m, x: m(x), model, x)
    return seen


def test_the_papers_map_sizes():
    # ZFNet's Figure 3: 224 -> 110 (conv1) -> 55 (pool) -> 26 (conv2) -> 13 (pool) -> 13, 13, 13
    # -> 6 (pool: 6x6x256 into fc6). The pools must round up: 110 -> 55 and 26 -> 13.
    assert conv_shapes("zfnet", 224) == [(224, 110), (55, 26), (13, 13), (13, 13), (13, 13)]
    assert models.abstract("zfnet").fc6.in_features == 6 * 6 * 256
    # AlexNet's Figure 2: 55, 27, 13 (its "224" input needs conv1's 2-pixel padding).
    assert conv_shapes("alexnet_original", 224) == [(224, 55), (27, 27), *[(13, 13)] * 3]
    # LeNet-5: 32 -> 28, 14 -> 10, 5 -> 1.
    assert conv_shapes("lenet5", 32) == [(32, 28), (14, 10), (5, 1)]


def test_width_and_depth_settings():
    half = models.abstract("alexnet", width_multiplier=0.5)
    assert [c.out_features for c in half.convs] == [32, 96, 192, 128, 128]
    assert half.fc7.in_features == 2048
    # Depth multiplies the third stage (3x3 convs at 13x13); extra convs are copies of conv4.
    deep = models.abstract("alexnet", depth_multiplier=2.0)
    assert [c.out_features for c in deep.convs] == [64, 192, 384, 256, 256, 256, 256, 256]
    extra = 3 * conv(3, 256, 256)
    assert models.count_params(deep) == 61_100_840 + extra
    shallow = models.abstract("alexnet_original", depth_multiplier=0.3)  # one 3x3 conv
    assert [(c.out_features, c.feature_group_count) for c in shallow.convs] == [
        (96, 1),
        (256, 2),
        (256, 1),
    ]
    # VGG: A with twice the convolutions per stage is E.
    a2 = models.count_params(models.abstract("vgg11", depth_multiplier=2.0))
    assert a2 == models.count_params(models.abstract("vgg19"))
    narrow = models.abstract("vgg16_bn_cifar", width_multiplier=0.25)
    assert [c.out_features for c in narrow.convs][::3] == [16, 32, 64, 128, 128]
    # LeNet rounds to multiples of 2 (8 would widen C1), and has no depth setting.
    assert [models.abstract("lenet5", width_multiplier=0.5).c1.out_features] == [4]
    assert scale.axis_setting("vgg11", "depth") == "depth_multiplier"
    with pytest.raises(ScalingError, match="lenet5 has no depth multiplier setting"):
        scale.axis_setting("lenet5", "depth")
    with pytest.raises(ScalingError, match="lenet5 has no setting 'depth_multiplier'"):
        models.abstract("lenet5", depth_multiplier=2.0)


@pytest.mark.parametrize(
    "name,settings,message",
    [
        ("vgg12", {}, "VGG depth must be 11, 13, 16 or 19"),
        ("lenet5", dict(activation="sigmoid"), "unknown activation 'sigmoid'; valid: tanh, relu"),
        ("lenet5", dict(pool="l2"), "unknown pool 'l2'; valid: avg, max"),
        ("vgg11", dict(classifier="tiny"), "unknown classifier 'tiny'; valid: imagenet, cifar"),
        ("alexnet", dict(width_multiplier=0.0), "must be positive"),
        ("zfnet", dict(hidden=0), "hidden must be a positive number of units"),
    ],
)
def test_bad_names_and_settings_are_clear_errors(name, settings, message):
    with pytest.raises(ScalingError, match=message):
        models.abstract(name, **settings)


def forward(models, x):
    """Each model's eval-mode outputs on `x`, in one compiled program."""
    for model in models:
        model.eval()
    return [np.asarray(y) for y in nnx.jit(lambda ms, x: [m(x) for m in ms])(models, x)]


def test_the_settings_change_the_function():
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    variants = [dict(), dict(activation="relu"), dict(pool="max")]  # tanh and avg by default
    outputs = forward([build("lenet5", **v) for v in variants], x)  # the same weights in each
    for i in range(len(outputs)):
        for j in range(i):
            assert np.abs(outputs[i] - outputs[j]).max() > 1e-3
    # LRN on and off: the same weights, another function (the paper's ablation).
    x = np.random.default_rng(1).normal(size=(1, 64, 64, 3)).astype(np.float32)
    settings = dict(width_multiplier=0.125, hidden=16)
    with_lrn, without = forward(
        [build("alexnet_original", **settings), build("alexnet_original", lrn=False, **settings)], x
    )
    assert np.abs(with_lrn - without).max() > 1e-4


def test_local_response_norm_is_the_papers_formula():
    x = np.random.default_rng(0).normal(0, 30, (2, 3, 3, 9)).astype(np.float32)
    expected = np.empty_like(x)
    for i in range(9):  # the paper's sum over max(0, i - n/2) ... min(N - 1, i + n/2)
        total = np.square(x[..., max(0, i - 2) : min(8, i + 2) + 1]).sum(-1)
        expected[..., i] = x[..., i] / (2 + 1e-4 * total) ** 0.75
    ours = jax.jit(layers.local_response_norm)(x)
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    assert np.abs(expected - x / 2**0.75).max() > 1e-2  # the squares matter at this scale


def test_adaptive_pool_has_torchs_windows():
    # VGG at 64 pixels (2 -> 7), AlexNet at 160 (4 -> 6), VGG at 32 (1 -> 7), 13 -> 6.
    for n, size in [(2, 7), (4, 6), (1, 7), (13, 6)]:
        x = np.random.default_rng(n).normal(size=(1, n, n, 2)).astype(np.float32)
        expected = np.empty((1, size, size, 2), np.float32)
        for i in range(size):
            for j in range(size):
                rows = slice(i * n // size, -(-(i + 1) * n // size))
                cols = slice(j * n // size, -(-(j + 1) * n // size))
                expected[0, i, j] = x[0, rows, cols].mean((0, 1))
        ours = jax.jit(layers.adaptive_avg_pool, static_argnums=1)(x, size)
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-7)
    assert layers.adaptive_avg_pool(x, 13) is x  # a map of the size already: untouched


def random_fill(model, seed=0):
    """Every variable of a shape-only model, drawn by numpy: kernels normal with variance
    2 / fan-in (He's, for ReLUs), vectors around zero, BatchNorm variances in [0.5, 1.5], the
    dropout streams' keys and counters. Building a model for real compiles its initializers, a
    program that takes XLA seconds of CPU per model (6.5 s for LeNet-5's). Returns the
    parameters and statistics by path."""
    rng = np.random.default_rng(seed)
    weights = []
    for path, var in nnx.to_flat_state(nnx.state(model, convert.VARIABLES)):
        if path[-1] == "var":
            value = rng.uniform(0.5, 1.5, var.shape)
        elif len(var.shape) >= 2:
            value = rng.normal(0, (2 / np.prod(var.shape[:-1])) ** 0.5, var.shape)
        else:
            value = rng.normal(0, 0.1, var.shape)
        weights.append((path, var.replace(jnp.asarray(value.astype(np.float32)))))
    streams = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.RngState)):
        if jax.dtypes.issubdtype(var.dtype, jax.dtypes.prng_key):
            value = jax.random.wrap_key_data(np.full((*var.shape, 2), seed, np.uint32))
        else:
            value = jnp.zeros(var.shape, var.dtype)
        streams.append((path, var.replace(value)))
    nnx.update(model, nnx.from_flat_state(weights + streams))
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in weights}


def build(name, **settings):
    """Model `name` with `random_fill`'s weights (the same for the same shapes)."""
    model = models.abstract(name, **settings)
    random_fill(model)
    return model


@pytest.mark.parametrize(
    "name,settings",
    [("alexnet", dict(depth_multiplier=1.4)), ("vgg11_bn", {}), ("vgg13", {})],
)
def test_torchvision_tables_round_trip(name, settings):
    settings = dict(width_multiplier=0.125, hidden=128, **settings)  # 16 hidden units
    model = models.abstract(name, num_classes=5, **settings)
    before = random_fill(model)
    tensors = convert.export(model, name, "torchvision")
    assert convert.detect_source(tensors) == "torchvision"
    # torchvision's names and layouts: features.N for every conv (and BatchNorm), a flattened
    # (C, H, W) input to the first dense layer.
    first, side = ("classifier.1", 6) if name == "alexnet" else ("classifier.0", 7)
    assert tensors[f"{first}.weight"].shape == (16, model.convs[-1].out_features * side * side)
    back = models.abstract(name, num_classes=5, **settings)
    random_fill(back, seed=1)
    convert.load(back, name, tensors)
    flat = nnx.to_flat_state(nnx.state(back, convert.VARIABLES))
    after = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in flat}
    assert after.keys() == before.keys()
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)


@functools.cache
def digits(size):
    """scikit-learn's 8x8 digits (through `data`, in RGB), scaled to [-1, 1] and each pixel
    repeated to `size` x `size`: resizing 1,797 images to 64 pixels takes a second."""
    loaded = data.load("digits", 8)
    images = loaded.train_images.astype(np.float32) / 127.5 - 1
    r = size // 8
    return np.repeat(np.repeat(images, r, axis=1), r, axis=2), loaded.train_labels


# (name, settings, image size): one small member of each family, narrow enough that a training
# step takes milliseconds (alexnet_original's grouped convolutions and LRN would double it).
LEARNERS = [
    ("lenet5", {}, 32),
    ("alexnet", dict(width_multiplier=0.125, hidden=256, dropout=0.0), 64),
    ("vgg11_cifar", dict(width_multiplier=0.125), 32),
]


@pytest.mark.parametrize("name,settings,size", LEARNERS)
def test_loss_falls_on_digits(name, settings, size):
    # In-process, 60 steps of Adam on batches of 32, from `random_fill`'s weights: the model's
    # own initializers would take longer to compile than the training. Most of the time is the
    # training step's compilation.
    images, labels = digits(size)
    model = build(name, num_classes=10, **settings)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-3)
    opt_state = jax.jit(tx.init)(params)

    @jax.jit
    def step(params, rest, opt_state, x, y):
        def loss_fn(params):
            model = nnx.merge(graphdef, params, rest)
            loss = optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
            return loss, nnx.split(model, nnx.Param, ...)[2]

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    rng = np.random.default_rng(0)
    losses = []
    for _ in range(60):
        batch = rng.choice(len(labels), 32, replace=False)
        params, rest, opt_state, loss = step(params, rest, opt_state, images[batch], labels[batch])
        losses.append(float(loss))
    print(name, [round(x, 2) for x in losses[:5]], [round(x, 2) for x in losses[-5:]])
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
