"""The optimizer and learning-rate schedule a training config names (optax)."""

import jax
import optax

from scaling import ScalingError

OPTIMIZERS = {
    "sgd": optax.sgd,
    "adam": optax.adam,
    "adamw": optax.adamw,
    "rmsprop": optax.rmsprop,
    "adagrad": optax.adagrad,
    "adadelta": optax.adadelta,
    "lamb": optax.lamb,
}
DECOUPLED_DECAY = ("adamw", "lamb")  # these apply weight decay themselves


def make_schedule(config, total_steps):
    """Learning rate per step: constant, cosine to zero, or step decay; linear warmup first."""
    s, lr = config.schedule, config.lr
    warmup = min(s.warmup_steps, total_steps)
    rest = max(total_steps - warmup, 1)
    if s.name == "constant":
        main = optax.constant_schedule(lr)
    elif s.name == "cosine":
        main = optax.cosine_decay_schedule(lr, rest)
    elif s.name == "step":
        bounds = {int(b * total_steps) - warmup: s.decay_factor for b in s.boundaries}
        main = optax.piecewise_constant_schedule(lr, bounds)
    else:
        raise ScalingError(f"unknown schedule {s.name!r}; valid: constant, cosine, step")
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(config, total_steps):
    """The optax transformation named by the config, with decay and clipping around it."""
    settings = dict(config.optimizer)
    name = settings.pop("name")
    if name not in OPTIMIZERS:
        raise ScalingError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    schedule = make_schedule(config, total_steps)

    # Decay conv and dense kernels only, found by name (a scanned stack of norm scales is 2-D
    # too): biases, norm scales, position embeddings and relative-bias tables are not decayed.
    def kernels(params):
        is_kernel = lambda path, _: any(getattr(k, "key", None) == "kernel" for k in path)  # noqa: E731
        return jax.tree_util.tree_map_with_path(is_kernel, params)

    if name in DECOUPLED_DECAY:
        settings.update(weight_decay=config.weight_decay, mask=kernels)
    try:
        optimizer = OPTIMIZERS[name](schedule, **settings)
    except TypeError as e:
        raise ScalingError(f"optimizer {name}: {str(e).split('() ')[-1]}") from None
    chain = []
    if config.grad_clip_norm:
        chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.weight_decay and name not in DECOUPLED_DECAY:
        chain.append(optax.add_decayed_weights(config.weight_decay, mask=kernels))
    return optax.chain(*chain, optimizer), schedule
