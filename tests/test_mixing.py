"""mixup and CutMix: identity when off, targets weighted as the images, resumable runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling import mixing
from scaling.rundir import read_metrics
from scaling.train import train


def batch(n=8, size=8):
    """Images whose every pixel tells which image it came from (value = index + 1)."""
    values = jnp.arange(1, n + 1, dtype=jnp.float32)[:, None, None, None]
    return jnp.broadcast_to(values, (n, size, size, 3))


@pytest.mark.parametrize(
    "settings",
    [dict(mixup_alpha=0.4, cutmix_alpha=1.0, prob=0.0), dict(mixup_alpha=0.0, cutmix_alpha=0.0,
                                                              prob=1.0)],
)  # fmt: skip
def test_off_is_the_identity(settings):
    images = batch()
    if settings["mixup_alpha"] == settings["cutmix_alpha"] == 0:
        assert not mixing.enabled(dict(mixup_alpha=0.0, cutmix_alpha=0.0, mix_prob=1.0))
        return
    mixed, lam = mixing.mix_images(images, jax.random.key(0), **settings)
    assert float(lam) == 1.0 and np.array_equal(mixed, images)


@pytest.mark.parametrize("seed", range(4))
def test_mixup_weights_images_and_targets_alike(seed):
    images = batch()
    mixed, lam = mixing.mix_images(
        images, jax.random.key(seed), mixup_alpha=0.4, cutmix_alpha=0.0, prob=1.0
    )
    lam = float(lam)
    assert 0 < lam < 1
    # image i is lam * (i + 1) + (1 - lam) * (n - i): its own weight read back from the pixels
    own = (np.asarray(mixed[:, 0, 0, 0]) - np.arange(8, 0, -1)) / (
        np.arange(1, 9) - np.arange(8, 0, -1)
    )
    np.testing.assert_allclose(own, lam, atol=1e-6)
    targets = mixing.mix_targets(jax.nn.one_hot(jnp.arange(8), 8), lam)
    np.testing.assert_allclose(np.diag(targets), lam, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(targets).sum(1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_weight_is_the_share_of_own_pixels(seed):
    images = batch(size=16)
    mixed, lam = mixing.mix_images(
        images, jax.random.key(seed), mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0
    )
    own = np.asarray(mixed[..., 0] == images[..., 0]).mean(axis=(1, 2))
    np.testing.assert_allclose(own, float(lam), rtol=1e-6)  # every image keeps the same share
    assert set(np.unique(mixed[0])) <= {1.0, 8.0}  # only its own and its partner's pixels


def test_a_mixed_run_learns_and_resumes_bit_identically(tmp_path, tiny_config):
    def config():
        return tiny_config(mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1, lr=0.05)

    whole = train(config(), tmp_path / "whole")
    assert train(config(), tmp_path / "split", stop_after=12) is None
    resumed = train(config(), tmp_path / "split")
    for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
        assert resumed[key] == whole[key], key
    losses = [r["loss"] for r in read_metrics(tmp_path / "whole" / "metrics.jsonl") if "loss" in r]
    plain = train(tiny_config(lr=0.05), tmp_path / "plain")
    assert plain["train_loss"] != whole["train_loss"]  # the mixing reached the step
    assert losses[-1] < losses[0]
