"""GoogLeNet (with its auxiliary classifiers in the trainer) and DenseNet-BC: exact parameter
counts, shapes at two resolutions, what the width and depth settings scale, the auxiliary losses
in training and not in evaluation, and a loss that falls on digits. That they compute
torchvision's functions is tests/test_reference.py's (fixtures googlenet, densenet121).

Building these networks is costly (XLA:CPU takes about a second for each small program, and
tracing a 120-conv DenseNet's initialisation several), so each model is built once (`abstract`,
`tiny_run`) and shared by the tests that read it.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling import ScalingError, convert, data, models, steps
from scaling.config import training_config
from scaling.models import googlenet
from scaling.optim import make_optimizer
from scaling.pipeline import pixel_statistics, train_batches


@functools.cache
def abstract(name, **settings):
    return models.abstract(name, **settings)


# torchvision's counts (torch 2.14, torchvision 0.29.1) and the DenseNet-BC paper's CIFAR
# network (Table 2: 0.8M).
PARAMS = [
    ("googlenet", {}, 6_624_904),
    ("googlenet", {"aux_logits": True}, 13_004_888),
    ("densenet121", {}, 7_978_856),
    ("densenet_bc100_12", {}, 769_162),
]
# The deeper DenseNets, each 8-25 s to trace here (the tracing cost grows with the square of
# the layer count): the same code paths as densenet121 and densenet_bc100_12 (k = 48 and a
# 96-channel stem in densenet161).
DEEP_PARAMS = [
    ("densenet169", 14_149_480),
    ("densenet201", 20_013_928),
    ("densenet161", 28_681_000),
    ("densenet_bc250_24", 15_324_406),  # the paper's 15.3M
    ("densenet_bc190_40", 25_624_430),  # the paper's 25.6M
]


@pytest.mark.parametrize("name,settings,expected", PARAMS)
def test_parameter_counts(name, settings, expected):
    assert models.count_params(abstract(name, **settings)) == expected


@pytest.mark.slow
@pytest.mark.parametrize("name,expected", DEEP_PARAMS)
def test_parameter_counts_of_the_deeper_densenets(name, expected):
    assert models.count_params(models.abstract(name)) == expected


def test_the_papers_5x5_branch_adds_16_weights_per_pair_of_channels():
    # torchvision's "5x5" branch convolves 3x3; a 5x5 kernel has 25 - 9 more weights per
    # (reduce channel, output channel) pair, in every module of the paper's Table 1.
    pairs = sum(c5r * c5 for stage in googlenet.STAGES for _, _, _, c5r, c5, _ in stage)
    five = models.count_params(models.abstract("googlenet", branch5_kernel=5))
    assert five - 6_624_904 == 16 * pairs == 380_928


def output_shape(model, size):
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    return nnx.eval_shape(lambda m, x: m(x), model, x)  # traced through, not computed


@pytest.mark.parametrize(
    "name,sizes",
    [("googlenet", (64, 99)), ("densenet121", (64, 100)), ("densenet_bc100_12", (32, 48))],
)
def test_output_shapes_at_two_resolutions(name, sizes):
    model = abstract(name)
    model.eval()
    for size in sizes:
        out = output_shape(model, size)
        assert (out.shape, out.dtype) == ((2, 10 if "_bc" in name else 1000), jnp.float32)


def test_auxiliary_logits_only_in_training_mode():
    model = abstract("googlenet", aux_logits=True)
    model.train()
    logits, aux = output_shape(model, 64)
    assert [(a.shape, a.dtype) for a in (logits, *aux)] == [((2, 1000), jnp.float32)] * 3
    model.eval()
    assert output_shape(model, 64).shape == (2, 1000)


def test_googlenet_width_and_depth():
    wide = models.abstract("googlenet", width_multiplier=2.0, depth_multiplier=0.5, aux_logits=True)
    assert wide.conv1.conv.kernel.shape == (7, 7, 3, 128)
    assert wide.stages[2][-1].out_features == 2 * 832  # 5a's, alone in stage 5 at depth 0.5
    assert wide.aux[0].fc1.kernel.shape == (16 * 256, 2048)  # the heads' 128 and 1024 too
    # Depth stretches each stage's module shapes over round_repeats(n * depth) modules; the
    # heads follow the last module shaped like 4a and like 4d.
    assert googlenet.layout(1.0) == ([[0, 1], [0, 1, 2, 3, 4], [0, 1]], ((1, 0), (1, 3)))
    assert googlenet.layout(2.0) == (
        [[0, 0, 1, 1], [0, 0, 1, 1, 2, 2, 3, 3, 4, 4], [0, 0, 1, 1]],
        ((1, 1), (1, 7)),
    )
    assert googlenet.layout(0.5) == ([[0], [0, 1, 3], [0]], ((1, 0), (1, 2)))  # 4d, not 4c
    assert [m.out_features for m in wide.stages[1]] == [1024, 1024, 1056]  # 2x 4a, 4b, 4d


def test_densenet_width_is_the_growth_rate_and_depth_the_layers_per_block():
    assert abstract("densenet121").blocks[0][0].conv2.kernel.shape == (3, 3, 128, 32)  # 4k -> k
    # k rounds to a multiple of 4, so the paper's k = 12 is its own width 1 (not 16).
    cifar = abstract("densenet_bc100_12")
    assert cifar.blocks[0][0].conv2.kernel.shape == (3, 3, 48, 12)
    assert [len(b) for b in cifar.blocks] == [16, 16, 16]
    wide = models.abstract("densenet_bc28_12", width_multiplier=1.5, depth_multiplier=0.5)
    assert wide.stem.kernel.shape == (3, 3, 3, 40)  # 2k, k = 18 rounded to 20
    assert wide.blocks[0][0].conv2.kernel.shape == (3, 3, 80, 20)
    assert [len(b) for b in wide.blocks] == [2, 2, 2]  # 4 layers a block, halved


@pytest.mark.parametrize(
    "name,settings,message",
    [
        ("densenet_bc99_12", {}, "6n+4"),
        ("densenet100", {}, "one of 121, 169, 201, 161"),
        ("densenet121", {"compression": 0}, "compression must be in (0, 1]"),
        ("googlenet", {"branch5_kernel": 7}, "branch5_kernel must be 3 or 5"),
        ("googlenet", {"aux_dropout": 1.0}, "aux_dropout must be in [0, 1)"),
    ],
)
def test_bad_settings_are_clear_errors(name, settings, message):
    with pytest.raises(ScalingError, match=re.escape(message)):
        models.abstract(name, **settings)


def variables(model):
    flat = nnx.to_flat_state(nnx.state(model, convert.VARIABLES))
    return {path: np.asarray(var[...]) for path, var in flat}


def test_torchvision_names_round_trip_with_the_auxiliary_heads(monkeypatch):
    # (The fixtures test loading googlenet and densenet121; this, the auxiliary heads' rules,
    # export, and import_model finding the heads.) Shape-only models filled with numpy draws:
    # no initializer is compiled.
    name, settings = "googlenet", dict(aux_logits=True, width_multiplier=0.25, depth_multiplier=0.2)
    model = models.abstract(name, num_classes=7, **settings)
    rng = np.random.default_rng(0)
    flat = nnx.to_flat_state(nnx.state(model, convert.VARIABLES))
    values = [(p, v.replace(jnp.asarray(rng.standard_normal(v.shape), v.dtype))) for p, v in flat]
    nnx.update(model, nnx.from_flat_state(values))
    tensors = convert.export(model, name, "torchvision")
    assert convert.detect_source(tensors) == "torchvision"
    create = models.create  # import_model builds shape-only too, then fills every variable
    monkeypatch.setattr(models, "create", lambda *a, **kw: nnx.eval_shape(lambda: create(*a, **kw)))
    # aux_logits is read from the tensors (torchvision's ImageNet checkpoint has the heads)
    again = convert.import_model(name, tensors, width_multiplier=0.25, depth_multiplier=0.2)
    assert again.head.out_features == 7 and len(again.aux) == 2
    assert tensors["aux1.fc1.weight"].shape == (256, 16 * 32)  # torch flattens (C, 4, 4)
    before, after = variables(model), variables(again)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_training_loss_adds_the_auxiliary_losses_with_weight_0_3():
    @jax.jit  # one program, not one per operation
    def losses(logits, aux1, aux2, labels):
        def ce(z):
            return steps.cross_entropy(z, labels).mean()

        outputs = (logits, (aux1, aux2))
        return (
            ce(logits),
            ce(aux1) + ce(aux2),
            steps.training_loss(outputs, labels),
            steps.training_loss(outputs, labels, aux_weight=0.0),
            steps.training_loss(logits, labels),  # no heads: the logits alone
        )

    logits, aux1, aux2 = np.random.default_rng(0).standard_normal((3, 4, 10), np.float32)
    main, heads, (total, loss, out), unweighted, plain = losses(logits, aux1, aux2, np.arange(4))
    assert loss == main and np.array_equal(out, logits)
    np.testing.assert_allclose(total, main + 0.3 * heads, rtol=1e-6)  # the paper's weight
    assert unweighted[0] == main and plain[0] == plain[1] == main


# Tiny forms for training on 16x16 digits, with their learning rates: GoogLeNet at 8-48
# channels, one Inception module a stage, with its auxiliary heads (no dropout); DenseNet-BC
# with k = 8 and two layers a block.
TINY = {
    "googlenet": (
        dict(
            aux_logits=True,
            width_multiplier=0.125,
            depth_multiplier=0.2,
            dropout=0.0,
            aux_dropout=0.0,
        ),
        0.1,
    ),
    "densenet_bc16_12": (dict(width_multiplier=0.5), 0.5),
}


@functools.cache
def tiny_run(name):
    """(the trainer's train step for the tiny form of `name`, as scaling.steps makes it; that
    step jitted; its eval-mode forward pass, jitted; the initial state; digits at 16x16).

    The weights are drawn with the "rbg" generator: XLA:CPU compiles its initialisation about
    three times faster than threefry's (7 s against 22 s of CPU for this GoogLeNet)."""
    settings, lr = TINY[name]
    rbg = jax.random.key(0, impl="unsafe_rbg")
    model = models.create(name, seed=rbg, num_classes=10, **settings)
    model.eval()
    eval_def = nnx.graphdef(model)
    model.train()
    train_def, params, model_state = nnx.split(model, nnx.Param, ...)
    config = training_config(f"model={name},image_size=16,steps=30,batch_size=64,lr={lr}")
    config.augment = "none"
    tx, _ = make_optimizer(config, 30)
    train_step, _ = steps.make_steps(config, train_def, eval_def, tx)
    ds = data.load("digits", 16)
    mean, std = (jnp.asarray(s, jnp.float32) for s in pixel_statistics(ds))
    state = dict(
        step=jnp.array(0, jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=tx.init(params),
        metric_sums=steps.ZERO_SUMS,
        run=dict(key=jax.random.key(0), pixel_mean=mean, pixel_std=std),
    )
    forward = jax.jit(lambda params, x: nnx.merge(eval_def, params, model_state)(x))
    return train_step, jax.jit(train_step), forward, state, ds


@pytest.mark.slow  # builds the tiny GoogLeNet's step: 20-30 s of XLA compiling here
def test_auxiliary_heads_change_the_training_and_not_the_evaluation(monkeypatch):
    train_step, step, forward, state, ds = tiny_run("googlenet")
    # The same network with other auxiliary heads: their weights negated.
    flip = lambda path, v: -v if "'aux'" in jax.tree_util.keystr(path) else v  # noqa: E731
    other = dict(state, params=jax.tree_util.tree_map_with_path(flip, state["params"]))
    x = jnp.asarray(ds.test_images[:32], jnp.float32) / 255
    assert np.array_equal(forward(state["params"], x), forward(other["params"], x))
    # A training step: the same main loss, but other gradients reach the shared layers.
    images, labels = ds.train_images[:64], ds.train_labels[:64]
    a, b = step(state, images, labels), step(other, images, labels)
    assert a["metric_sums"]["loss"] == b["metric_sums"]["loss"]  # the main classifier's
    kernel = lambda s: s["params"]["conv1"]["conv"]["kernel"][...]  # noqa: E731
    assert not np.allclose(kernel(a), kernel(b), rtol=1e-4, atol=0)
    # The step hands both heads' logits to the loss, with the paper's weight.
    seen, loss = [], steps.training_loss

    def recording(outputs, labels, smoothing=0.0, aux_weight=steps.AUX_LOSS_WEIGHT, lam=None):
        seen.append((len(steps.split_outputs(outputs)[1]), aux_weight))
        return loss(outputs, labels, smoothing, aux_weight, lam)

    monkeypatch.setattr(steps, "training_loss", recording)
    jax.eval_shape(lambda *args: train_step(*args), state, images, labels)  # a fresh trace
    assert seen == [(2, 0.3)]


@pytest.mark.parametrize(
    "name", [pytest.param("googlenet", marks=pytest.mark.slow), "densenet_bc16_12"]
)
def test_digits_learns(name):
    _, step, _, state, ds = tiny_run(name)
    batches = iter(train_batches(ds, 0, 30, 64, seed=0))
    sums = []
    for i in range(30):
        state = step(state, *next(batches))
        if i % 10 == 9:
            sums.append(float(state["metric_sums"]["loss"]))
    first, last = sums[0] / 10, (sums[2] - sums[1]) / 10  # mean losses of steps 1-10, 21-30
    assert last < 0.5 * first  # measured: googlenet 1.79 -> 0.51, densenet 2.10 -> 0.62
