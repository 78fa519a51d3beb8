"""The pure train and eval steps: on-device augmentation, normalisation, the loss.

The seed's key and the pixel statistics travel in the state, not in the program, so trials that
differ only in seed or data subset share one compiled step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

AUGMENTATIONS = ("none", "crop", "flip", "crop_flip")


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ZERO_SUMS = dict(loss=np.float32(0), accuracy=np.float32(0), steps=np.int32(0))


def augment(images, key, kind, pad=4):
    """Pad-`pad` random crop and/or horizontal flip, per image, on the device."""
    n, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)
    if "crop" in kind:
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        corners = jax.random.randint(crop_key, (n, 2), 0, 2 * pad + 1)
        crop = lambda im, yx: jax.lax.dynamic_slice(im, (yx[0], yx[1], 0), (h, w, c))  # noqa: E731
        images = jax.vmap(crop)(padded, corners)
    if "flip" in kind:
        flip = jax.random.bernoulli(flip_key, 0.5, (n, 1, 1, 1))
        images = jnp.where(flip, images[:, :, ::-1], images)
    return images


def cross_entropy(logits, labels, smoothing=0.0):
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if smoothing:
        targets = optax.smooth_labels(targets, smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def normalize(images, state):
    run = state["run"]
    return (images.astype(jnp.float32) - run["pixel_mean"]) / run["pixel_std"]


def make_steps(config, train_def, eval_def, tx):
    """The pure train and eval step functions, closed over the static pieces. The seed's key
    and the pixel statistics travel in the state, not in the program, so trials that differ
    only in seed or data subset share one compiled step (JAX's compilation cache)."""

    def train_step(state, images, labels):
        key = jax.random.fold_in(state["run"]["key"], state["step"])
        images = normalize(augment(images, key, config.augment), state)

        def loss_fn(params):
            # copy: the statistics are updated inside this trace, so they must be born in it
            model = nnx.merge(train_def, params, state["model_state"], copy=True)
            logits = model(images)
            loss = cross_entropy(logits, labels, config.label_smoothing).mean()
            return loss, (logits, nnx.state(model, nnx.Not(nnx.Param)))

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, model_state)), grads = grad_fn(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = dict(
            step=state["step"] + 1,
            params=optax.apply_updates(state["params"], updates),
            model_state=model_state,
            opt_state=opt_state,
            run=state["run"],
        )
        # Running sums since the last log line; kept in the state, so a resumed run logs
        # exactly what an uninterrupted one would have.
        sums = state["metric_sums"]
        new_state["metric_sums"] = dict(
            loss=sums["loss"] + loss,
            accuracy=sums["accuracy"] + jnp.mean(jnp.argmax(logits, -1) == labels),
            steps=sums["steps"] + 1,
        )
        return new_state

    def eval_step(state, images, labels, mask):
        model = nnx.merge(eval_def, state["params"], state["model_state"])
        logits = model(normalize(images, state))
        loss = cross_entropy(logits, labels) * mask
        correct = (jnp.argmax(logits, -1) == labels) * mask
        return {"loss": loss.sum(), "correct": correct.sum(), "count": mask.sum()}

    return train_step, eval_step
