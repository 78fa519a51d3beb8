"""The trainer: it learns, resumes exactly, parallelises exactly, and refuses bad settings."""

import json
from pathlib import Path

import numpy as np
import optax
import pytest
from conftest import TRAIN_CONFIG, run_python

from scaling import ScalingError
from scaling.config import load_config
from scaling.optim import make_schedule
from scaling.pipeline import batch_indices
from scaling.rundir import read_metrics
from scaling.steps import augment
from scaling.train import train


def losses(workdir):
    return [r["loss"] for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
def test_digits_learns(tmp_path):
    config = load_config(f"{TRAIN_CONFIG}:model=resnet20,image_size=16,epochs=3,batch_size=64")
    config.log_every = 10
    summary = train(config, tmp_path)
    curve = losses(tmp_path)
    assert curve[-1] < 0.5 * curve[0]
    assert summary["test_accuracy"] > 0.9
    assert summary["params"] == 269_722
    assert summary["steps"] == 3 * 1437 // 64 + 1  # epochs are rounded up to whole steps
    saved = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "model",
        "params",
        "flops",
        "train_accuracy",
        "test_accuracy",
        "train_loss",
        "test_loss",
        "generalization_gap",
        "examples_seen",
        "wall_seconds",
        "images_per_second",
        "seed",
        "config",
    ):
        assert key in saved
    record = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert set(record) >= {
        "step",
        "loss",
        "accuracy",
        "learning_rate",
        "images_per_second",
        "examples_seen",
        "wall_time",
    }


def test_resume_continues_the_same_run(tmp_path, tiny_config):
    whole = train(tiny_config(), tmp_path / "whole")
    assert train(tiny_config(), tmp_path / "split", stop_after=12) is None
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")[:2]
    resumed = train(tiny_config(), tmp_path / "split")
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    steps = [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if "loss" in r]
    assert steps == [5, 10, 15, 20]  # the steps after the step-12 checkpoint were not duplicated
    assert resumed["test_loss"] == whole["test_loss"]
    # A finished run is not trained again.
    assert train(tiny_config(), tmp_path / "split") == resumed


def test_streamed_run_equals_in_memory_run_and_resumes(tmp_path, tiny_config, digits_tree):
    """Decoding from disk as training goes changes nothing: same batches, statistics, losses."""
    dataset = f"folder:{digits_tree}"
    memory = train(tiny_config(dataset=dataset), tmp_path / "memory")
    assert (
        train(tiny_config(dataset=dataset, stream=True), tmp_path / "stream", stop_after=12) is None
    )
    streamed = train(tiny_config(dataset=dataset, stream=True), tmp_path / "stream")
    assert losses(tmp_path / "stream") == losses(tmp_path / "memory")
    for key in ("train_loss", "test_loss", "test_accuracy", "train_examples"):
        assert streamed[key] == memory[key]


def test_batches_gathered_on_the_device_are_the_host_batches(tmp_path, tiny_config):
    host = train(tiny_config(data_on_device=False), tmp_path / "host")
    device = train(tiny_config(data_on_device=True), tmp_path / "device")
    assert losses(tmp_path / "device") == losses(tmp_path / "host")
    assert device["test_loss"] == host["test_loss"]
    with pytest.raises(ScalingError, match="data_on_device needs the data in memory"):
        train(tiny_config(data_on_device=True, stream=True), tmp_path / "both")


def test_a_field_added_since_a_run_began_is_no_conflict(tmp_path, tiny_config):
    train(tiny_config(), tmp_path, stop_after=5)
    record = json.loads((tmp_path / "config.json").read_text())
    del record["stream"], record["data_on_device"]  # as written before the fields existed
    (tmp_path / "config.json").write_text(json.dumps(record))
    assert train(tiny_config(), tmp_path)["steps"] == 20


def test_workdir_with_another_config_is_refused(tmp_path, tiny_config):
    train(tiny_config(), tmp_path, stop_after=5)
    with pytest.raises(ScalingError, match="different config.*lr"):
        train(tiny_config(lr=0.5), tmp_path)
    assert train(tiny_config(lr=0.5), tmp_path, overwrite=True)["config"]["lr"] == 0.5


def devices_crops_and_losses():
    """A short run's device count and losses, and a batch's random crops and flips, on every
    device this process has (the batches gathered on them where there are eight)."""
    import tempfile

    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    config = load_config(f"{TRAIN_CONFIG}:model=resnet8,image_size=16,steps=12,batch_size=64")
    config.lr, config.log_every = 0.01, 1
    config.data_on_device = jax.device_count() == 8
    with tempfile.TemporaryDirectory() as d:
        summary = train(config, d)
        run_losses = losses(Path(d))
    axis = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(axis,))
    images = np.random.default_rng(0).integers(0, 255, (64, 16, 16, 3)).astype(np.uint8)
    images = jax.device_put(images, NamedSharding(mesh, P("data")))
    crops = jax.jit(augment, static_argnums=2)(images, jax.random.key(1), "crop_flip")
    return [summary["devices"], np.asarray(crops).tolist(), run_losses]


@pytest.mark.slow
def test_one_device_equals_eight_devices():
    one = devices_crops_and_losses()  # this process has one device
    code = (
        "import json, sys; sys.path.insert(0, 'tests'); import test_train; "
        "print(json.dumps(test_train.devices_crops_and_losses()))"
    )
    eight = json.loads(run_python(code, devices=8).splitlines()[-1])
    assert one[0] == 1 and eight[0] == 8
    assert one[1] == eight[1]  # the random crops and flips do not depend on the sharding
    # Sharded reductions (BatchNorm moments, the gradient all-reduce, oneDNN's kernel gradients
    # over 8 examples a device instead of 64) sum in another order, so the first losses agree to
    # float rounding; training then compounds those last bits (early ResNet training is chaotic:
    # on one device a 1e-6 change of a 0.1 learning rate moves step 11's loss by 2e-3), so later
    # steps get a looser bound, at a small learning rate. With symmetric padding, on an EPYC,
    # the first four agreed to 8e-6 and the fifth to 1.1e-4.
    np.testing.assert_allclose(one[2][:4], eight[2][:4], rtol=1e-4)
    np.testing.assert_allclose(one[2], eight[2], rtol=2e-3)


def test_batch_order_is_a_pure_function_of_seed_and_step():
    first_epoch = np.concatenate([batch_indices(s, 100, 25, seed=3) for s in range(4)])
    assert sorted(first_epoch) == list(range(100))  # each example once per epoch
    second_epoch = np.concatenate([batch_indices(s, 100, 25, seed=3) for s in range(4, 8)])
    assert not np.array_equal(first_epoch, second_epoch)


def test_augment_crops_and_flips_per_image():
    import jax

    images = np.arange(2 * 8 * 8 * 1, dtype=np.float32).reshape(2, 8, 8, 1) + 1
    flipped = augment(images, jax.random.key(0), "flip")
    for i in range(2):
        assert np.array_equal(flipped[i], images[i]) or np.array_equal(
            flipped[i], images[i, :, ::-1]
        )
    cropped = np.asarray(augment(images, jax.random.key(1), "crop"))
    assert cropped.shape == images.shape
    # Each crop is a window of the zero-padded image: its non-zero pixels are contiguous originals.
    for i in range(2):
        rows = np.where(cropped[i].any(axis=(1, 2)))[0]
        assert np.all(np.diff(rows) == 1)
    assert np.array_equal(augment(images, jax.random.key(0), "none"), images)


@pytest.mark.parametrize(
    "name,check",
    [
        ("constant", lambda s: s(10) == pytest.approx(0.1) == s(99)),
        ("cosine", lambda s: s(10) == pytest.approx(0.1) and s(100) < 1e-6),
        ("step", lambda s: s(35) == pytest.approx(0.1) and s(45) == pytest.approx(0.02)),
    ],
)
def test_schedules_with_warmup(tiny_config, name, check):
    config = tiny_config()
    config.schedule.name, config.schedule.warmup_steps, config.lr = name, 10, 0.1
    config.schedule.boundaries = (0.4, 0.8)
    schedule = make_schedule(config, 100)
    assert schedule(0) == 0.0 and schedule(5) == pytest.approx(0.05)
    assert check(schedule)


@pytest.mark.parametrize(
    "optimizer", ["sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta", "lamb"]
)
def test_every_optimizer_builds_and_steps(optimizer):
    import jax.numpy as jnp

    from scaling.optim import make_optimizer

    config = load_config(f"{TRAIN_CONFIG}:optimizer={optimizer},lr=0.01")
    config.grad_clip_norm, config.label_smoothing = 1.0, 0.1
    tx, _ = make_optimizer(config, 10)
    params = {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}
    updates, _ = tx.update(params, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert float(jnp.abs(new["w"] - params["w"]).sum()) > 0


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(batch_size=100_000), "exceeds the"),
        (dict(augment="mixup"), "valid: none, crop"),
        (dict(compute_dtype="float16"), "valid: float32, bfloat16"),
        (dict(num_epochs=2.0), "exactly one of config.num_steps and config.num_epochs"),
        (dict(dataset="mnist"), "digits"),
        (dict(model={"name": "resnet7"}), r"6n\+2"),
        (dict(mix_prob=1.5), r"mix_prob.*\[0, 1\]"),
        (dict(cutmix_alpha=-1.0), "cutmix_alpha"),
    ],
)
def test_bad_settings_fail_before_training(tmp_path, tiny_config, overrides, message):
    with pytest.raises(ScalingError, match=message):
        train(tiny_config(**overrides), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_bad_optimizer_names_and_settings(tiny_config):
    from scaling.optim import make_optimizer

    config = tiny_config()
    config.optimizer.name = "adam"  # still carries sgd's momentum
    with pytest.raises(ScalingError, match="optimizer adam.*momentum"):
        make_optimizer(config, 10)
    config.optimizer = {"name": "sgdd"}
    with pytest.raises(ScalingError, match="valid: sgd, adam"):
        make_optimizer(config, 10)


def test_weight_decay_reaches_kernels_only():
    import jax
    import jax.numpy as jnp

    from scaling.optim import make_optimizer

    for name in ("sgd", "adamw"):
        config = load_config(f"{TRAIN_CONFIG}:optimizer={name},lr=0.1,schedule=constant")
        config.weight_decay = 0.5
        tx, _ = make_optimizer(config, 10)
        params = {"conv": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)},
                  "norm": {"scale": jnp.ones((2, 3))}}  # fmt: skip
        zero = jax.tree.map(jnp.zeros_like, params)
        new = optax.apply_updates(params, tx.update(zero, tx.init(params), params)[0])
        assert float(new["conv"]["kernel"][0, 0]) < 1, name
        assert float(new["conv"]["bias"][0]) == 1 and float(new["norm"]["scale"][0, 0]) == 1
