"""ViT: exact parameter counts, scan == unrolled, position-embedding resizing, training, errors."""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TRAIN_CONFIG
from flax import nnx

from scaling import ScalingError, flops, models, ops
from scaling.cli import main as cli_main
from scaling.config import load_config
from scaling.models import vit
from scaling.ops import attention
from scaling.ops.activations import gelu
from scaling.ops.dense import MATRIX_PRODUCTS, dense_product
from scaling.rundir import read_metrics
from scaling.train import train

# Trainable parameters at 224x224, 1000 classes, class token (timm / the paper's code agree).
PARAMS = [
    ("vit_ti16", {}, 5_717_416),
    ("vit_s16", {}, 22_050_664),
    ("vit_b16", {}, 86_567_656),
    ("vit_l16", {}, 304_326_632),
    ("vit_h14", {}, 632_045_800),
    ("vit_b16", {"pool": "gap"}, 86_567_656 - 768 - 768),  # no class token or its position
    ("vit_b16", {"scan": False}, 86_567_656),
    ("vit_b32", {}, 88_224_232),
]
TINY = dict(width=32, depth=3, num_heads=2, mlp_dim=64, num_classes=10)


@pytest.mark.parametrize("name,settings,expected", PARAMS)
def test_parameter_counts(name, settings, expected):
    assert models.count_params(models.abstract(name, **settings)) == expected


def test_named_sizes_default_to_224_and_macs():
    assert models.default_image_size("vit_b16") == 224
    model = models.abstract("vit_b16")
    assert model.pos_embed.shape == (1, 197, 768)
    assert model.encoder.blocks.attn.qkv.kernel.shape == (12, 768, 3 * 768)  # stacked by scan
    macs, _ = flops.macs_and_activations(model, 224)
    assert macs == 17_563_828_224  # the familiar 17.6 GMACs; the scan body counted 12 times


def test_scanned_flops_count_every_layer():
    # XLA's cost analysis counts a loop body once; xla_flops lowers the scan unrolled.
    scanned = models.abstract("vit_ti16", depth=4)
    unrolled = models.abstract("vit_ti16", depth=4, scan=False)
    assert flops.macs_and_activations(scanned, 224) == flops.macs_and_activations(unrolled, 224)
    assert flops.xla_flops(scanned, 224) == pytest.approx(flops.xla_flops(unrolled, 224), rel=1e-3)
    assert not ops.unroll_loops()  # on CPU, after the count, scans are loops again


def with_values(model, seed=0):
    """An abstract model given arbitrary values: much cheaper than initialising it here."""
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)

    def fill(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(seed), x.shape)
        return jnp.asarray(rng.normal(0, 0.5, x.shape), x.dtype)

    return nnx.merge(graphdef, jax.tree.map(fill, state))


forward = nnx.jit(lambda model, x: model(x))


@pytest.fixture(scope="module")
def tiny():
    """A 3-block ViT on 4x4 patches of 16x16 images, with dropout and stochastic depth."""
    settings = dict(image_size=16, dropout=0.1, stochastic_depth=0.3, **TINY)
    return with_values(models.abstract("vit_ti4", **settings))


def output_shape(model, size):
    """The model's output shape for a batch of two size x size images, traced only."""
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x).shape


@pytest.mark.parametrize("pool", ["token", "gap"])
@pytest.mark.parametrize("size", [16, 32])
def test_output_shapes_at_two_resolutions(pool, size):
    model = models.abstract("vit_ti4", image_size=size, pool=pool, **TINY)
    assert output_shape(model, size) == (2, 10)
    assert model.pos_embed.shape == (1, (size // 4) ** 2 + (pool == "token"), 32)


def test_gelu_is_the_exact_gelu():
    # erf's form (PyTorch's) against jax.nn.gelu's erfc form: the same function and derivative
    # to float32 rounding; only relative precision in the far negative tail differs.
    x = jnp.linspace(-12, 12, 100_001)
    exact = functools.partial(jax.nn.gelu, approximate=False)
    np.testing.assert_allclose(gelu(x), exact(x), atol=2e-6, rtol=1e-5)
    grad = jax.vmap(jax.grad(gelu))(x)
    np.testing.assert_allclose(grad, jax.vmap(jax.grad(exact))(x), atol=1e-6)
    assert gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


def test_scan_and_unrolled_give_the_same_outputs(tiny):
    same = vit.unrolled(tiny)
    assert isinstance(same.encoder.blocks, nnx.List) and len(same.encoder.blocks) == 3
    assert models.count_params(same) == models.count_params(tiny)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    tiny.eval(), same.eval()
    np.testing.assert_allclose(forward(tiny, x), forward(same, x), rtol=1e-5, atol=1e-5)


def test_remat_rematerialises_the_scanned_blocks(tiny):
    rematted = nnx.clone(tiny)
    rematted.encoder.remat = True
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    tiny.eval(), rematted.eval()
    np.testing.assert_allclose(forward(tiny, x), forward(rematted, x), rtol=1e-6, atol=1e-6)
    graphdef, params, rest = nnx.split(rematted, nnx.Param, ...)
    loss = lambda p, r: nnx.merge(graphdef, p, r, copy=True)(x).sum()  # noqa: E731
    grad = str(jax.make_jaxpr(jax.grad(loss))(params, rest))
    assert "policy=None" in grad  # everything recomputed, not only what a policy names
    # (test_trains_on_digits trains with remat=True; `jax.checkpoint` keeps gradients exact.)


def test_on_cpu_only_matrix_products_are_kept_for_the_backward_pass(tiny, monkeypatch):
    tiny.eval()  # no dropout: the two gradients must agree
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    graphdef, params, rest = nnx.split(tiny, nnx.Param, ...)
    loss = lambda p, r: nnx.merge(graphdef, p, r, copy=True)(x).sum()  # noqa: E731
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params, rest))
    assert MATRIX_PRODUCTS.__qualname__ == "save_from_both_policies.<locals>.policy"
    assert "policy=<function save_from_both_policies.<locals>.policy" in jaxpr
    # qkv, attention logits, projection and two MLP layers: products written out for the CPU,
    # kept by name.
    assert jaxpr.count("name=cpu_products") == 5
    kept = jax.grad(loss)(params, rest)
    monkeypatch.setattr(vit, "block_apply", lambda remat: vit.apply_block)  # keep everything
    assert "remat" not in str(jax.make_jaxpr(jax.grad(loss))(params, rest))
    everything = jax.grad(loss)(params, rest)
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(everything), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def sin_sum_and_grads(f, a, b):
    return jax.value_and_grad(lambda a, b: jnp.sum(jnp.sin(f(a, b))), (0, 1))(a, b)


def test_cpu_products_are_the_plain_ones():
    # The attention logits and nnx.Linear's product, with the backward passes written out for
    # XLA:CPU's fast layouts: the same functions, values and gradients, as the plain einsums.
    q, k, dense = (jax.random.normal(jax.random.key(i), (3, 5, 2, 4)) for i in range(3))
    w = jax.random.normal(jax.random.key(3), (4, 7))
    numbers = (((3,), (0,)), ((), ()))
    pairs = [(attention._cpu_logits, attention._logits, q, k),
             (lambda x, w: dense_product(x, w, numbers),
              lambda x, w: jax.lax.dot_general(x, w, numbers), dense, w)]  # fmt: skip
    for ours, plain, a, b in pairs:
        (y1, g1), (y2, g2) = (sin_sum_and_grads(f, a, b) for f in (ours, plain))
        assert float(y1) == pytest.approx(float(y2), rel=1e-5)
        for x, y in zip(g1, g2, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-5)
    # Other contractions are lax.dot_general's own.
    other = (((0,), (0,)), ((), ()))
    x = jax.random.normal(jax.random.key(4), (4, 3))
    np.testing.assert_array_equal(dense_product(x, w, other), jax.lax.dot_general(x, w, other))


def test_dropout_and_stochastic_depth_only_in_training(tiny):
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    tiny.eval()
    assert jnp.array_equal(forward(tiny, x), forward(tiny, x))
    tiny.train()
    assert not jnp.array_equal(forward(tiny, x), forward(tiny, x))


def test_resize_keeps_values_at_the_original_size(tiny):
    same = vit.resize(tiny, 16)
    assert jnp.array_equal(same.pos_embed[...], tiny.pos_embed[...])
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    tiny.eval(), same.eval()
    assert jnp.array_equal(forward(tiny, x), forward(same, x))

    bigger = vit.resize(tiny, 32)
    assert bigger.pos_embed.shape == (1, 1 + 8 * 8, 32)
    assert tiny.pos_embed.shape == (1, 1 + 4 * 4, 32)  # the original is untouched
    # The class token's embedding is kept; a constant grid stays constant; a ramp stays a ramp.
    assert jnp.array_equal(bigger.pos_embed[:, 0], tiny.pos_embed[:, 0])
    ramp = jnp.broadcast_to(jnp.arange(4.0)[None, :, None], (4, 4, 3)).reshape(1, 16, 3)
    up = vit.resize_position_embedding(ramp, 8, num_prefix_tokens=0).reshape(8, 8, 3)
    assert jnp.allclose(up[:, 0], 0.0) and jnp.allclose(up[:, -1], 3.0)
    assert jnp.all(jnp.diff(up[0, :, 0]) > 0) and jnp.allclose(up, up[:1])  # along x only
    assert output_shape(bigger, 32) == (2, 10)
    # Parameters other than the position embeddings are shared in value.
    assert jnp.array_equal(bigger.head.kernel[...], tiny.head.kernel[...])


def test_trains_on_digits(tmp_path):
    config = load_config(
        f"{TRAIN_CONFIG}:model=vit_ti4,image_size=16,steps=30,batch_size=64,optimizer=adam,lr=0.003"
    )
    config.log_every, config.augment = 10, "none"  # pad-4 crops of 16x16 digits slow a tiny ViT
    config.model.update(dict(width=64, depth=2, num_heads=2, mlp_dim=128, remat=True))
    summary = train(config, tmp_path)
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < 0.9 * losses[0]
    assert (
        summary["params"]
        == models.count_params(
            models.abstract("vit_ti4", image_size=16, width=64, depth=2, num_heads=2, mlp_dim=128)
        )
        - 990 * 64
        - 990
    )  # built with the data's 10 classes, not 1000
    assert summary["macs"] > 0 and summary["flops"] > summary["macs"]


def test_info_passes_the_image_size(capsys):
    cli_main(["info", "vit_ti4", "--image-size", "32", "--set", "depth=2"])
    out = json.loads(capsys.readouterr().out)
    assert out["image_size"] == 32 and out["num_classes"] == 1000
    tokens = 1 + 8 * 8
    assert (
        out["params"]
        == 4 * 4 * 3 * 192
        + 192
        + 192
        + tokens * 192
        + 2 * (4 * 192 + 192 * 576 + 576 + 192 * 192 + 192 + 192 * 768 + 768 + 768 * 192 + 192)
        + 2 * 192
        + 192 * 1000
        + 1000
    )


@pytest.mark.parametrize(
    "name,settings,message",
    [
        ("vit_x16", {}, "valid: ti, s, b, l, h"),
        ("vit_b16", {"image_size": 100}, "not divisible by the patch size 16"),
        ("vit_b16", {"pool": "cls"}, "valid: token, gap"),
        ("vit_b16", {"num_heads": 5}, "not divisible by num_heads 5"),
        ("vit_b16", {"depth": 0}, "depth must be a positive integer"),
        ("vit_b0", {}, "patch_size must be a positive integer"),
        ("vit_b16", {"stochastic_depth": 1.0}, "[0, 1)"),
        ("vit_b16", {"colour": "red"}, "has no setting 'colour'"),
    ],
)
def test_bad_names_and_settings_are_clear_errors(name, settings, message):
    with pytest.raises(ScalingError, match=re.escape(message)):
        models.abstract(name, **settings)


def test_wrong_resolution_is_a_clear_error():
    model = models.abstract("vit_ti4", image_size=16, **TINY)
    with pytest.raises(ScalingError, match="built for 16x16 images, got 32x32"):
        output_shape(model, 32)
    with pytest.raises(ScalingError, match="not divisible by the patch size 4"):
        vit.resize(model, 30)
