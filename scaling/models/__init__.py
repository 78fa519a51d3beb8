"""Model registry: every model is built by name from its family module.

A family module exposes `create(name, **settings)` returning a Flax NNX module, or None when the
name is not one of its own. Settings (num_classes, width_multiplier, dropout, norm, ...) are the
family's constructor arguments, so any of them can be overridden from a config or the command line.
"""

import inspect

import jax
import numpy as np
from flax import nnx

from scaling import ScalingError
from scaling.models import coatnet, efficientnet, resnet, vit

FAMILIES = (resnet, efficientnet, vit, coatnet)


def create(name: str, *, seed: int = 0, image_size: int | None = None, **settings) -> nnx.Module:
    """Build model `name` with parameters initialised from `seed`.

    `image_size`, the input resolution, reaches only the families whose `create` takes it (those
    with resolution-dependent parameters: ViT's position embeddings, CoAtNet's relative-bias
    tables); the others are resolution-agnostic and ignore it.
    """
    for family in FAMILIES:
        if image_size is not None and "image_size" in inspect.signature(family.create).parameters:
            settings["image_size"] = image_size
        else:
            settings.pop("image_size", None)
        try:
            model = family.create(name, rngs=nnx.Rngs(seed), **settings)
        except ScalingError:
            raise
        except (TypeError, ValueError) as e:  # a setting of the wrong name, type or value
            reason = str(e).splitlines()[0].split("() ")[-1]
            raise ScalingError(f"{name}: invalid settings {sorted(settings)}: {reason}") from None
        if model is not None:
            return model
    valid = "; ".join(f.NAMES for f in FAMILIES)
    raise ScalingError(f"unknown model {name!r}; valid names: {valid}")


def default_image_size(name: str) -> int:
    """The input resolution a named model was designed for (224 for ImageNet nets, 32 for CIFAR)."""
    for family in FAMILIES:
        if (size := family.default_image_size(name)) is not None:
            return size
    return 32


def abstract(name: str, **settings) -> nnx.Module:
    """The model with shapes only (no weights allocated): for counting and FLOP analysis."""
    try:
        return nnx.eval_shape(lambda: create(name, **settings))
    except ScalingError as e:  # drop the note JAX appends to errors raised while tracing
        raise ScalingError(str(e).splitlines()[0]) from None


def resize(model: nnx.Module, image_size: int) -> nnx.Module:
    """`model` for `image_size` inputs: ViT's position embeddings and CoAtNet's bias tables
    resized (the families with resolution-dependent parameters); any other model unchanged."""
    if isinstance(model, vit.ViT) and model.image_size != image_size:
        return vit.resize(model, image_size)
    if isinstance(model, coatnet.CoAtNet) and model.image_size != image_size:
        return coatnet.resize(model, image_size)
    return model


def count_params(model: nnx.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are state, not parameters)."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return int(sum(np.prod(leaf.shape) for leaf in leaves))
