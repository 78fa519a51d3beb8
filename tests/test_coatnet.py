"""CoAtNet: sizes against the paper, relative attention, table resizing, layouts, errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TRAIN_CONFIG, initialised
from flax import nnx

from scaling import ScalingError, data, flops, models
from scaling.config import load_config
from scaling.models import coatnet, coatnet_sizing, layers
from scaling.rundir import read_metrics
from scaling.train import train

# name: (paper parameters, paper multiply-adds at 224, ours exactly, ours exactly with timm's
# stride placement (the default), and with the strided expansion (`stride_on='expansion'`)).
# Ours: expansion on output channels, SE to 1/4 of the output channels, pre-logits layer.
SIZES = {
    "coatnet_0": (25e6, 4.2e9, 25_036_820, 4_546_507_776, 4_141_888_512),
    "coatnet_1": (42e6, 8.4e9, 42_225_776, 8_643_499_008, 8_238_879_744),
    "coatnet_2": (75e6, 15.7e9, 74_701_256, 16_478_515_200, 15_553_671_168),
    "coatnet_3": (168e6, 34.7e9, 167_003_320, 36_568_762_368, 34_487_863_296),
    "coatnet_4": (275e6, None, 275_462_344, None, None),
}
# Two blocks of 16/32 channels, one block per stage, heads of 16: compiles in seconds.
TINY = dict(depths=(1, 1, 1, 1, 1), dims=(16, 16, 32, 32, 32), head_size=16)


@pytest.mark.parametrize("name", SIZES)
def test_sizes_match_the_paper(name):
    paper_params, paper_macs, params, macs, expansion_macs = SIZES[name]
    depths, dims = coatnet.SIZES[int(name[-1])]
    assert coatnet_sizing.count_params("CCTT", depths, dims) == params  # the fast count
    assert abs(params / paper_params - 1) < 0.05
    if paper_macs is not None:  # the paper gives no 224 figure for CoAtNet-4 (and it builds slowly)
        model = models.abstract(name)
        assert models.count_params(model) == params
        assert flops.macs_and_activations(model, 224)[0] == macs
        # The paper's multiply-adds are those of the strided expansion (its Eq. 5 read literally),
        # within 2%; timm's placement runs a stage's first expansion at 4x the pixels (+3-8%).
        strided = models.abstract(name, stride_on="expansion")
        assert flops.macs_and_activations(strided, 224)[0] == expansion_macs
        assert abs(expansion_macs / paper_macs - 1) < 0.02 < macs / paper_macs - 1 < 0.09


def output_shape(model, size, batch=2):
    """The model's output shape for a batch of size x size images, traced only."""
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x).shape


def test_relative_bias_gathers_by_offset_2x2():
    # table[a, b] = 10a + b, so a bias of 10a + b means offset (dy, dx) = (a - 1, b - 1).
    table = (10 * jnp.arange(3)[:, None] + jnp.arange(3)[None, :])[..., None].astype(jnp.float32)
    bias = layers.relative_bias(table, (2, 2))
    # Tokens (0,0) (0,1) (1,0) (1,1); entry [i, j] holds the offset of token i from token j.
    expected = [
        [11, 10, 1, 0],
        [12, 11, 2, 1],
        [21, 20, 11, 10],
        [22, 21, 12, 11],
    ]
    assert bias.shape == (1, 4, 4)
    assert np.array_equal(bias[0], expected)


def test_relative_bias_gathers_by_offset_3x3():
    # table[a, b, h] = 100h + 10a + b for a 3x3 grid: offsets -2..2 at rows/columns 0..4.
    a, b, h = np.meshgrid(np.arange(5), np.arange(5), np.arange(2), indexing="ij")
    table = jnp.asarray(100 * h + 10 * a + b, jnp.float32)
    bias = layers.relative_bias(table, (3, 3))
    assert bias.shape == (2, 9, 9)
    # token 0 = (0,0), 4 = (1,1), 8 = (2,2), 2 = (0,2), 6 = (2,0)
    assert bias[0, 0, 0] == 22 and bias[0, 4, 4] == 22  # zero offset: the table's centre
    assert bias[0, 8, 0] == 44 and bias[0, 0, 8] == 0  # (+2, +2) and (-2, -2): the corners
    assert bias[0, 2, 6] == 4 and bias[0, 6, 2] == 40  # (-2, +2) and (+2, -2)
    assert bias[0, 4, 3] == 23 and bias[0, 3, 4] == 21  # token 3 = (1,0): dx = +1 / -1
    assert bias[1, 5, 1] == 100 + 33  # token 5 = (1,2), token 1 = (0,1): (+1, +1), head 1
    # Every entry: the table at the offset of token i from token j.
    for i in range(9):
        for j in range(9):
            dy, dx = i // 3 - j // 3, i % 3 - j % 3
            assert bias[1, i, j] == table[dy + 2, dx + 2, 1]


def test_bias_table_resizing_keeps_values_at_the_original_size():
    table = jax.random.normal(jax.random.key(0), (7, 7, 3))
    assert jnp.array_equal(layers.resize_bias_table(table, (4, 4)), table)
    bigger = layers.resize_bias_table(table, (8, 8))
    assert bigger.shape == (15, 15, 3)
    constant = layers.resize_bias_table(jnp.full((7, 7, 2), 0.5), (8, 8))
    assert jnp.allclose(constant, 0.5)


def with_values(model, seed=0):
    """An abstract model given arbitrary values (parameters ~ N(0, 0.3), statistics positive):
    much cheaper than initialising it."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(seed)

    def fill(x, scale):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(seed), x.shape)
        values = rng.normal(0, 0.3, x.shape) if scale else rng.uniform(0.5, 1.5, x.shape)
        return jnp.asarray(values, x.dtype)

    params = jax.tree.map(lambda x: fill(x, True), params)
    return nnx.merge(graphdef, params, jax.tree.map(lambda x: fill(x, False), rest))


def test_model_resize_keeps_values_and_grows_tables():
    model = with_values(models.abstract("coatnet", layout="CCTT", image_size=32, **TINY))
    same = coatnet.resize(model, 32)
    equal = jax.tree.map(jnp.array_equal, nnx.state(model), nnx.state(same))
    assert all(jax.tree.leaves(equal))

    bigger = coatnet.resize(model, 64)
    t_blocks = [b for b in bigger.blocks if isinstance(b, coatnet.TransformerBlock)]
    assert [b.grid for b in t_blocks] == [(4, 4), (2, 2)]  # S3 at 1/16, S4 at 1/32 of 64
    assert [b.rel_bias.shape for b in t_blocks] == [(7, 7, 2), (3, 3, 2)]
    assert model.blocks[2].rel_bias.shape == (3, 3, 2)  # the original is untouched
    assert output_shape(bigger, 64) == (2, 1000)
    assert jnp.array_equal(bigger.head.kernel[...], model.head.kernel[...])
    with pytest.raises(ScalingError, match="built for 32x32 images, got 64x64"):
        output_shape(model, 64)


def test_stochastic_depth_only_in_training():
    settings = dict(image_size=16, small_images=True, stochastic_depth=0.5, **TINY)
    model = with_values(models.abstract("coatnet", layout="CCTT", **settings))
    forward = nnx.jit(lambda model, x: model(x))
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    model.train()
    assert not jnp.array_equal(forward(model, x), forward(model, x))
    model.eval()
    assert jnp.array_equal(forward(model, x), forward(model, x))


@pytest.mark.parametrize("layout", coatnet.LAYOUTS)
def test_fast_count_equals_the_model(layout):
    tiny = dict(depths=(3,), dims=(64,)) if layout == "VIT_REL" else TINY
    settings = dict(image_size=32, small_images=True, num_classes=10)
    model = models.abstract("coatnet", layout=layout, **tiny, **settings)
    assert coatnet_sizing.count_params(layout, **tiny, **settings) == models.count_params(model)


@pytest.mark.parametrize("layout", coatnet.LAYOUTS)
def test_output_shapes_at_two_resolutions(layout):
    tiny = dict(depths=(2,), dims=(32,)) if layout == "VIT_REL" else TINY
    model = models.abstract("coatnet", layout=layout, image_size=64, num_classes=7, **tiny)
    assert output_shape(model, 64) == (2, 7)
    small = models.abstract(
        "coatnet", layout=layout, image_size=32, small_images=True, num_classes=7, **tiny
    )
    assert output_shape(small, 32) == (2, 7)


def test_small_images_keep_larger_token_grids():
    assert coatnet.feature_sizes(32) == [16, 8, 4, 2, 1]  # S0..S4: T stages 16 / 4 / 1 tokens
    assert coatnet.feature_sizes(32, small_images=True) == [32, 16, 8, 4, 2]  # 64 / 16 / 4
    assert coatnet.feature_sizes(224) == [112, 56, 28, 14, 7]
    model = models.abstract("coatnet", layout="CTTT", image_size=32, small_images=True, **TINY)
    assert [b.grid for b in model.blocks[1:]] == [(8, 8), (4, 4), (2, 2)]
    assert model.blocks[1].rel_bias.shape == (15, 15, 2)
    vit_rel = models.abstract("coatnet", layout="VIT_REL", image_size=32, small_images=True)
    assert vit_rel.blocks[0].grid == (4, 4)  # patch 8


def test_vit_rel_trains_on_digits(tmp_path):
    """The all-attention layout through the trainer (the cheapest to compile); the other four
    below in one bare loop, without the trainer's extra compilations (state init, evaluation)."""
    layout = "VIT_REL"
    config = load_config(
        f"{TRAIN_CONFIG}:model=coatnet,image_size=16,steps=30,batch_size=64,optimizer=adam,lr=0.003"
    )
    config.log_every, config.augment = 10, "none"
    tiny = dict(depths=(2,), dims=(64,))
    config.model.update(dict(layout=layout, small_images=True, **tiny))
    summary = train(config, tmp_path)
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < 0.9 * losses[0]
    assert summary["params"] == coatnet_sizing.count_params(
        layout, image_size=16, small_images=True, num_classes=10, **tiny
    )


@pytest.fixture(scope="module")
def digits():
    ds = data.load("digits", 16)
    images = ds.train_images.astype(np.float32)
    return (images - images.mean()) / images.std(), ds.train_labels


@pytest.mark.slow
def test_each_layout_learns_digits(digits):
    """30 Adam steps of 32 images for each of the four layouts, like the trainer's step (which
    VIT_REL goes through above). The four models are trained side by side by one jitted step,
    on the sum of their losses: each gets only its own gradient, and one compilation costs less
    than four."""
    layouts = ("CCCC", "CCCT", "CCTT", "CTTT")
    graphdefs, params, rest = {}, {}, {}
    for layout in layouts:
        model = initialised(
            models.abstract(
                "coatnet", layout=layout, image_size=16, small_images=True, num_classes=10, **TINY
            ),
            drop_rate=0.0,
        )
        model.train()
        graphdefs[layout], params[layout], rest[layout] = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, rest, opt_state, x, y):
        def loss_fn(params):
            losses, new_rest = {}, {}
            for layout in layouts:
                model = nnx.merge(graphdefs[layout], params[layout], rest[layout], copy=True)
                logits = model(x)
                losses[layout] = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
                new_rest[layout] = nnx.state(model, nnx.Not(nnx.Param))
            return sum(losses.values()), (losses, new_rest)

        (_, (losses, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, losses

    images, labels = digits
    opt_state, history = tx.init(params), []
    for i in range(30):
        batch = np.arange(32 * i, 32 * (i + 1)) % len(labels)
        params, rest, opt_state, losses = step(
            params, rest, opt_state, images[batch], labels[batch]
        )
        history.append(losses)
    first = {k: np.mean([float(h[k]) for h in history[:5]]) for k in layouts}
    last = {k: np.mean([float(h[k]) for h in history[-5:]]) for k in layouts}
    # measured: CCCC 2.09 -> 0.32, CCCT 2.28 -> 0.72, CCTT 2.50 -> 1.19, CTTT 2.46 -> 1.49
    assert all(last[k] < 0.8 * first[k] for k in layouts), (first, last)


@pytest.mark.slow
def test_layouts_matched_at_a_parameter_count():
    target, settings = 2e6, dict(image_size=32, small_images=True, num_classes=10)
    for layout in coatnet.LAYOUTS:
        found = coatnet_sizing.match_params(layout, target, **settings)
        assert abs(found["params"] / target - 1) < 0.1, found
        assert list(found["dims"]) == sorted(found["dims"]), found  # stages never narrow
        assert found["params"] == coatnet_sizing.count_params(
            layout, found["depths"], found["dims"], **settings
        )
    assert found["layout"] == "VIT_REL" and len(found["depths"]) == 1
    cttt = coatnet_sizing.match_params("CTTT", target, **settings)
    model = models.abstract(
        "coatnet", layout="CTTT", depths=cttt["depths"], dims=cttt["dims"], **settings
    )
    assert models.count_params(model) == cttt["params"]


@pytest.mark.parametrize(
    "name,settings,message",
    [
        ("coatnet_7", {}, "valid: coatnet_0 ... coatnet_4"),
        ("coatnet", {"layout": "CCXT"}, "4 letters C/T for S1-S4 or VIT_REL"),
        ("coatnet", {"layout": "CCT"}, "4 letters C/T for S1-S4 or VIT_REL"),
        ("coatnet", {"layout": "TCCT"}, "S1 is always C"),
        (
            "coatnet",
            {"depths": (2, 2, 3, 5)},
            "depths for S0-S4 must be a tuple of 5 positive integers",
        ),
        (
            "coatnet",
            {"dims": (64, 96, 0, 384, 768)},
            "dims for S0-S4 must be a tuple of 5 positive",
        ),
        ("coatnet", {"layout": "VIT_REL", "depths": (2, 2, 3, 5, 2)}, "VIT_REL (one stage)"),
        ("coatnet", {"dims": (64, 96, 192, 400, 768)}, "400 is not divisible by head_size 32"),
        ("coatnet", {"layout": "VIT_REL", "image_size": 200}, "not divisible by VIT_REL's patch"),
        ("coatnet_0", {"image_size": 0}, "image_size must be a positive integer"),
        ("coatnet_0", {"stochastic_depth": -0.1}, "[0, 1)"),
        ("coatnet_0", {"colour": "red"}, "has no setting 'colour'"),
    ],
)
def test_bad_names_and_settings_are_clear_errors(name, settings, message):
    with pytest.raises(ScalingError, match=re.escape(message)):
        models.abstract(name, **settings)
