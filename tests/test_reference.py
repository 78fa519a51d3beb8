"""Every model computes its reference network's function: torchvision's and timm's networks and
the official WRN code, at seeded random weights, imported through `scaling.convert`.

The fixtures (tests/reference/*.json, written by tests/make_reference.py where torch is
installed) hold the reference's tensor names, shapes and the laws they were drawn from, the seed,
and the reference's logits; the weights and images are drawn again here with numpy, so these
tests need no torch. Negative controls show that the comparison sees the faults it guards
against: TensorFlow's padding, a pre-activated identity shortcut, the other stride placement.
"""

import json
import re

import jax
import numpy as np
import pytest
import reference
from conftest import TRAIN_CONFIG, initialised, one_line_exit_2
from flax import nnx

from scaling import ScalingError, cli, convert, models, pretrained
from scaling.config import load_config
from scaling.models import resnet
from scaling.rundir import read_metrics
from scaling.train import train

TOLERANCE = 1e-5  # relative: max |ours - reference| / max |reference|
FIXTURES = sorted(path.stem for path in reference.FIXTURES.glob("*.json"))


def logits(fixture, **settings):
    """Our model's logits on the fixture's images, with the fixture's weights imported."""
    tensors = reference.draw(fixture["tensors"], fixture["seed"])
    model = convert.import_model(
        fixture["model"], tensors, source=fixture["source"], **{**fixture["settings"], **settings}
    )
    model.eval()
    graphdef, state = nnx.split(model)
    images = reference.images(fixture["seed"], fixture["batch"], fixture["image_size"])
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return np.asarray(forward(state, images.transpose(0, 2, 3, 1)))


def test_every_family_has_a_fixture():
    expected = {"resnet18", "resnet50", "preact_resnet50", "wrn16_2", "efficientnet_b0",
                "vit_ti16", "vit_ti16_big_vision", "coatnet_0",
                "resnext50_32x4d", "wide_resnet50_2", "seresnet50",
                "googlenet", "densenet121", "alexnet", "vgg11_bn"}  # fmt: skip
    assert expected <= set(FIXTURES)


@pytest.mark.parametrize("name", FIXTURES)
def test_same_function_as_the_reference(name):
    fixture = reference.load(name)
    ours = logits(fixture)
    expected = np.asarray(fixture["logits"], np.float32)
    assert ours.shape == expected.shape == (fixture["batch"], fixture["num_classes"])
    assert np.std(expected) > 1e-2  # the random weights give logits that tell inputs apart
    assert reference.relative_difference(ours, expected) <= TOLERANCE


@pytest.mark.parametrize(
    "name,settings",
    [("resnet18", dict(padding="same")), ("coatnet_0", dict(stride_on="expansion"))],
)
def test_the_comparison_sees_another_network(name, settings):
    # TensorFlow's padding on even-sized inputs, and CoAtNet's other stride placement, have the
    # very parameters of the reference but not its function.
    fixture = reference.load(name)
    expected = np.asarray(fixture["logits"], np.float32)
    assert reference.relative_difference(logits(fixture, **settings), expected) > 1e-3


@pytest.mark.parametrize("name", ["wrn16_2", "preact_resnet18"])
def test_the_comparison_sees_a_pre_activated_identity_shortcut(name, monkeypatch):
    # The fault this library once had: identity shortcuts adding relu(bn(x)) instead of x.
    fixture = reference.load(name)
    expected = np.asarray(fixture["logits"], np.float32)
    call = resnet.Shortcut.__call__
    monkeypatch.setattr(
        resnet.Shortcut, "__call__", lambda self, x, pre=None: call(self, x if pre is None else pre)
    )
    assert reference.relative_difference(logits(fixture), expected) > 1e-3


@pytest.mark.slow
def test_import_command_and_fine_tuning_from_it(tmp_path, capsys):
    # A torchvision ResNet-18 checkpoint (1000 classes) as a .safetensors file, imported by the
    # command, then fine-tuned on digits (10 classes): the classifier is re-initialised, every
    # other variable starts from the file, and the run learns.
    from safetensors.numpy import save_file

    fixture = reference.load("resnet18")
    tensors = reference.draw(fixture["tensors"], fixture["seed"])
    save_file(tensors, tmp_path / "resnet18.safetensors")
    out = tmp_path / "imported"
    weights = str(tmp_path / "resnet18.safetensors")
    cli.main(["import", weights, "--model", "resnet18", "--out", str(out)])  # a failure exits
    assert json.loads((out / "pretrained.json").read_text())["settings"]["num_classes"] == 1000

    config = load_config(f"{TRAIN_CONFIG}:model=resnet18,image_size=16,steps=48,batch_size=32")
    config.lr, config.log_every, config.init_from = 0.02, 8, str(out)
    summary = train(config, tmp_path / "run")
    assert "classifier is re-initialised for 10 classes" in capsys.readouterr().out
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    # Random weights, not trained ones: 3.35 -> 1.75 and 42% test accuracy (chance is 10%).
    assert losses[-1] < 0.6 * losses[0] and summary["test_accuracy"] > 0.3

    model = initialised(models.abstract("resnet18", num_classes=10))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest, fresh_head = pretrained.initial_state(out, params, rest, 16)
    assert fresh_head and params["head"]["kernel"].shape == (512, 10)
    np.testing.assert_array_equal(
        params["stem"]["kernel"], tensors["conv1.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(rest["stem_norm"]["var"], tensors["bn1.running_var"])


def test_import_and_init_from_refuse_bad_input_before_any_work(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not a checkpoint")
    cases = [
        (("import", str(weights), "--model", "resnet7", "--out", str(tmp_path / "a")), "6n+2"),
        (("import", str(weights), "--model", "resnet18", "--out", str(tmp_path / "full")),
         "not an empty directory"),
        (("import", str(weights), "--model", "resnet18", "--out", str(tmp_path / "b")),
         "unreadable"),
        (("train", "--config", f"{TRAIN_CONFIG}:model=resnet8,steps=3", "--config.init_from",
          str(tmp_path / "none"), "--workdir", str(tmp_path / "run")), "pretrained.json"),
    ]  # fmt: skip
    for args, message in cases:
        assert message in one_line_exit_2(list(args), capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "w.safetensors"]
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep"


def test_import_records_what_it_read_off_the_checkpoint(tmp_path):
    # A pooled (no class token) ViT at 32x32: `init_from` must rebuild that model, not the
    # name's default (a class token at 224), from what `scaling import` wrote.
    from safetensors.numpy import save_file

    from scaling import cli

    model = models.create("vit_ti16", image_size=32, pool="gap", depth=2, num_classes=7)
    save_file(convert.export(model, "vit_ti16", "timm"), tmp_path / "vit.safetensors")
    out = tmp_path / "imported"
    cli.main(["import", str(tmp_path / "vit.safetensors"), "--model", "vit_ti16", "--out",
              str(out), "--set", "depth=2"])  # fmt: skip
    restored = pretrained.restore(out)
    assert (restored.pool, restored.image_size, restored.head.out_features) == ("gap", 32, 7)
    weights = nnx.Any(nnx.Param, nnx.BatchStat)
    ours = dict(nnx.to_flat_state(nnx.state(model, weights)))
    theirs = dict(nnx.to_flat_state(nnx.state(restored, weights)))
    assert ours.keys() == theirs.keys()
    for path, variable in ours.items():
        np.testing.assert_array_equal(variable.get_value(), theirs[path].get_value(), str(path))


def test_init_from_refuses_weights_of_another_shape(tmp_path):
    # Weights saved unscanned, or narrower, do not fit the run's model: refused by name, before
    # the run writes anything; the classes and the resolution are what a run may change.
    model = models.create("resnet20", num_classes=10, scan=False)
    pretrained.save(model, "resnet20", dict(num_classes=10, scan=False), tmp_path / "w", "timm")
    pretrained.check(tmp_path / "w", "resnet20", dict(scan=False, num_classes=3, image_size=8))
    cases = [
        ({}, "blocks/1/blocks/conv1/kernel is absent there"),
        ({"scan": False, "width_multiplier": 2}, "(3, 3, 32, 32)"),
    ]
    for settings, message in cases:
        with pytest.raises(ScalingError, match=re.escape(message)):
            pretrained.check(tmp_path / "w", "resnet20", settings)
    with pytest.raises(ScalingError, match="holds resnet20 weights, not resnet32 ones"):
        pretrained.check(tmp_path / "w", "resnet32", {})
