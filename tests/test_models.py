"""Model registry: exact parameter counts, shapes, FLOPs conventions, clear errors."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest
from conftest import scaling_cli
from flax import nnx

from scaling import ScalingError, flops, models, scale

# Trainable parameters from the papers' and torchvision's code (BatchNorm statistics excluded).
PARAMS = [
    ("resnet20", {}, 269_722),
    ("resnet32", {}, 464_154),
    ("resnet56", {}, 853_018),
    ("resnet110", {}, 1_727_962),
    ("resnet20", {"shortcut": "B"}, 272_474),
    ("resnet18", {}, 11_689_512),
    ("resnet34", {}, 21_797_672),
    ("resnet50", {}, 25_557_032),
    ("resnet101", {}, 44_549_160),
    ("wrn28_10", {}, 36_479_194),
    ("wrn28_10", {"num_classes": 100}, 36_536_884),
    ("wrn40_4", {}, 8_949_210),
    ("wrn16_4", {}, 2_748_890),
    ("wrn28_2", {}, 1_467_610),
]


@pytest.mark.parametrize("name,settings,expected", PARAMS)
def test_parameter_counts(name, settings, expected):
    assert models.count_params(models.abstract(name, **settings)) == expected


def test_batchnorm_statistics_are_not_parameters():
    model = models.abstract("resnet20")
    stats = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    assert sum(s.size for s in stats) == 2 * 16 * 7 + 2 * 32 * 6 + 2 * 64 * 6


@pytest.mark.parametrize("name", ["resnet20", "preact_resnet20", "wrn10_2", "resnet18"])
@pytest.mark.parametrize("size", [32, 48])
def test_output_shapes_at_two_resolutions(name, size):
    model = models.abstract(name, num_classes=7)
    model.eval()
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    out = nnx.eval_shape(lambda m, x: m(x), model, x)  # traced through, not computed
    assert (out.shape, out.dtype) == ((2, 7), jnp.float32)


def test_width_multiplier_scales_every_stage():
    base = models.abstract("wrn16_2")
    wide = models.abstract("wrn16_2", width_multiplier=2.0)
    assert wide.stem.kernel.shape == (3, 3, 3, 32)  # the stem too, unlike WRN's k
    assert wide.blocks[-1].conv2.kernel.shape == (3, 3, 256, 256)
    assert 3.5 < models.count_params(wide) / models.count_params(base) < 4.1  # ~ width squared


def test_preact_and_norm_variants_build():
    assert models.count_params(models.abstract("preact_resnet50")) == 25_549_352
    group = models.abstract("resnet20", norm="group")
    assert not jax.tree.leaves(nnx.state(group, nnx.BatchStat))


def test_dropout_only_in_training():
    model = models.create("wrn10_1", block_dropout=0.5, dropout=0.5)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    forward = nnx.jit(lambda m, x: m(x))  # the dropout key advances inside the module state
    model.eval()
    assert jnp.array_equal(forward(model, x), forward(model, x))
    model.train()
    assert not jnp.array_equal(forward(model, x), forward(model, x))


def test_flops_conventions():
    # ResNet-20 with projections: the papers' ~41M multiply-adds; XLA skips padded taps, so
    # its count is a little under 2 x MACs (shared/notes/flops-counting.md measured 75.8M).
    model = models.abstract("resnet20", shortcut="B")
    macs, activations = flops.macs_and_activations(model, 32)
    assert macs == 40_813_184
    xla = flops.xla_flops(model, 32)
    assert 0.9 * 2 * macs < xla < 2 * macs
    # ResNet-50 at 224: the familiar 4.1 GMACs.
    macs50, _ = flops.macs_and_activations(models.abstract("resnet50"), 224)
    assert abs(macs50 / 4.1e9 - 1) < 0.01
    # Activations: conv and dense outputs, e.g. the stem alone is 32*32*16.
    assert activations > 32 * 32 * 16


def test_flops_grow_with_resolution_squared():
    model = models.abstract("resnet20")
    m32, _ = flops.macs_and_activations(model, 32)
    m64, _ = flops.macs_and_activations(model, 64)
    assert abs(m64 / m32 - 4) < 0.01


@pytest.mark.parametrize(
    "name,settings,message",
    [
        ("resnet99", {}, "6n+2"),
        ("inception_v3", {}, "valid names"),
        ("wrn27_10", {}, "6n+4"),
        ("wrn28_0", {}, "k must be >= 1"),
        ("resnet21", {}, "6n+2"),
        ("resnet20", {"width_multiplier": 0}, "positive"),
        ("resnet20", {"norm": "instance"}, "valid: batch, group, layer"),
        ("resnet20", {"shortcut": "C"}, "valid: A"),
        (
            "resnet20",
            {"colour": "red"},
            "resnet20 has no setting 'colour'; its settings: base_width, block",
        ),
    ],
)
def test_bad_names_and_settings_are_clear_errors(name, settings, message):
    with pytest.raises(ScalingError, match=re.escape(message)):
        models.abstract(name, **settings)


def test_registry_lists_and_describes_every_family():
    assert models.list_models("wrn*") == ["wrn16_4", "wrn16_8", "wrn22_8", "wrn28_10", "wrn40_4"]
    assert {models.family_of(n).name for n in models.list_models()} == {
        "resnet", "wrn", "efficientnet", "vit", "coatnet", "lenet", "alexnet", "vgg",
        "googlenet", "resnext", "wide_resnet", "senet", "densenet",
    }  # fmt: skip
    assert [models.default_image_size(n) for n in ("resnet20", "resnet50", "vit_s4")] == [
        32,
        224,
        224,
    ]
    assert scale.axis_setting("efficientnet_b0", "width") == "width_coefficient"
    assert scale.axis_setting("wrn16_4", "depth") == "depth_multiplier"
    with pytest.raises(ScalingError, match="vit_b16 has no width multiplier setting"):
        scale.axis_setting("vit_b16", "width")


def test_models_command_prints_the_pinned_counts():
    out = scaling_cli("models", "resnet5*")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    assert rows == [
        ["resnet56", "resnet", "32", "853,018"],
        ["resnet50", "resnet", "224", "25,557,032"],
    ]


def test_a_constructor_bug_is_not_dressed_as_a_bad_setting(monkeypatch):
    family = models.family_of("resnet20")

    def broken(name, **settings):
        raise TypeError("a bug in the family's code")

    monkeypatch.setitem(models.FAMILIES, "resnet", dataclasses.replace(family, build=broken))
    with pytest.raises(TypeError, match="a bug in the family's code"):
        models.create("resnet20")
    with pytest.raises(ScalingError, match="resnet20: invalid settings"):
        models.create("resnet20", dropout=0.1)  # with settings, the cause may be the user's
