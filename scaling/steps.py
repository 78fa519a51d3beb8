"""The pure train and eval steps: on-device augmentation, normalisation, the loss.

The seed's key and the pixel statistics travel in the state, not in the program, so trials that
differ only in seed or data subset share one compiled step.

Auxiliary classifiers (GoogLeNet's, `aux_logits=True`): a model that has them returns
`(logits, (aux_1, ..., aux_n))` in training mode (`model.train()`) and plain logits in evaluation
mode (`model.eval()`); a model without them returns plain logits in both. `split_outputs` reads
either form. The training step minimises the main loss plus `aux_loss_weight` (config; 0.3, the
paper's, when unset) times each auxiliary head's loss; the logged loss and accuracy, evaluation,
`scaling.flops` and `scaling bench`'s evaluation see the main classifier alone.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from scaling import mixing

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


def soft_targets(labels, classes, smoothing=0.0):
    targets = jax.nn.one_hot(labels, classes)
    return optax.smooth_labels(targets, smoothing) if smoothing else targets


def cross_entropy(logits, labels, smoothing=0.0):
    return optax.softmax_cross_entropy(logits, soft_targets(labels, logits.shape[-1], smoothing))


MIXING_STREAM = 1  # folded into a step's key for mixup and CutMix

# Szegedy et al. 2015, section 5: "the losses of the auxiliary classifiers were weighted by 0.3".
AUX_LOSS_WEIGHT = 0.3


def split_outputs(outputs):
    """(logits, auxiliary logits) of a model's output: `(logits, (aux, ...))` in training mode
    from a model with auxiliary classifiers, plain logits otherwise (no auxiliary logits)."""
    if isinstance(outputs, tuple):
        logits, aux = outputs
        return logits, tuple(aux)
    return outputs, ()


def training_loss(outputs, labels, smoothing=0.0, aux_weight=AUX_LOSS_WEIGHT, lam=None):
    """(the loss minimised, the main classifier's loss, its logits) of a batch's outputs: the
    main loss plus `aux_weight` times each auxiliary classifier's (label smoothing on all).
    `lam`: the batch was mixed with its mirror by this weight (`scaling.mixing`), and so are
    the targets."""
    logits, aux = split_outputs(outputs)
    targets = soft_targets(labels, logits.shape[-1], smoothing)
    if lam is not None:
        targets = mixing.mix_targets(targets, lam)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    if not aux:
        return loss, loss, logits
    aux_losses = [optax.softmax_cross_entropy(a, targets).mean() for a in aux]
    return loss + aux_weight * sum(aux_losses), loss, logits


def normalize(images, state):
    run = state["run"]
    return (images.astype(jnp.float32) - run["pixel_mean"]) / run["pixel_std"]


def make_steps(config, train_def, eval_def, tx):
    """The pure train and eval step functions, closed over the static pieces. The seed's key
    and the pixel statistics travel in the state, not in the program, so trials that differ
    only in seed or data subset share one compiled step (JAX's compilation cache)."""

    # Runs recorded before the setting existed had no auxiliary heads to weigh.
    aux_weight = config.get("aux_loss_weight", AUX_LOSS_WEIGHT)

    def train_step(state, images, labels):
        key = jax.random.fold_in(state["run"]["key"], state["step"])
        images = normalize(augment(images, key, config.augment), state)
        lam = None
        if mixing.enabled(config):  # its own key: runs without mixing keep their augmentation
            images, lam = mixing.mix_images(
                images,
                jax.random.fold_in(key, MIXING_STREAM),
                mixup_alpha=config.mixup_alpha,
                cutmix_alpha=config.cutmix_alpha,
                prob=config.mix_prob,
            )

        def loss_fn(params):
            # copy: the statistics are updated inside this trace, so they must be born in it
            model = nnx.merge(train_def, params, state["model_state"], copy=True)
            total, loss, logits = training_loss(
                model(images), labels, config.label_smoothing, aux_weight, lam
            )
            return total, (loss, logits, nnx.state(model, nnx.Not(nnx.Param)))

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (loss, logits, model_state)), grads = grad_fn(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = dict(
            state,  # what the step does not change (the run's key, early stopping's tracker)
            step=state["step"] + 1,
            params=optax.apply_updates(state["params"], updates),
            model_state=model_state,
            opt_state=opt_state,
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
        logits, _ = split_outputs(model(normalize(images, state)))  # logits alone in eval mode
        loss = cross_entropy(logits, labels) * mask
        correct = (jnp.argmax(logits, -1) == labels) * mask
        return {"loss": loss.sum(), "correct": correct.sum(), "count": mask.sum()}

    return train_step, eval_step
