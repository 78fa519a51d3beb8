"""Models by name: each family module registers its names (`registry`), and `create` builds one.

Settings (num_classes, width_multiplier, dropout, norm, ...) are the family's constructor
arguments, so any of them can be overridden from a config or the command line.
"""

import contextlib

import jax
import numpy as np
from flax import nnx
from jax._src.interpreters import partial_eval

from scaling import ScalingError

# isort: off
# Importing a family registers it; in this order its names are listed and described.
from scaling.models import resnet, efficientnet, vit, coatnet  # noqa: F401
from scaling.models import lenet, alexnet, vgg, googlenet, resnext, senet, densenet  # noqa: F401

# isort: on
from scaling.models.registry import FAMILIES, family_of, list_models  # noqa: F401


def create(name: str, *, seed: int = 0, image_size: int | None = None, **settings) -> nnx.Module:
    """Build model `name` with parameters initialised from `seed`.

    `image_size`, the input resolution, reaches only the families whose parameters depend on it
    (ViT's position embeddings, CoAtNet's relative-bias tables); the others ignore it. A setting
    the family does not have is refused by name; an error the settings' values cause in the
    constructor becomes one line, while one with no settings given (a bug) is left as it is.
    """
    family = family_of(name)
    if unknown := sorted(set(settings) - family.settings):
        valid = ", ".join(sorted(family.settings - {"image_size"}))
        raise ScalingError(f"{name} has no setting {unknown[0]!r}; its settings: {valid}")
    if family.resolution_dependent and image_size is not None:
        settings["image_size"] = image_size
    try:
        return family.build(name, rngs=nnx.Rngs(seed), **settings)
    except ScalingError:
        raise
    except (TypeError, ValueError) as e:
        if not settings:
            raise
        reason = str(e).splitlines()[0].split("() ")[-1]
        raise ScalingError(f"{name}: invalid settings {sorted(settings)}: {reason}") from None


def default_image_size(name: str) -> int:
    """The input resolution a named model was designed for (224 for ImageNet nets, 32 for CIFAR)."""
    return family_of(name).image_size(name)


def abstract(name: str, **settings) -> nnx.Module:
    """The model with shapes only (no weights allocated): for counting and FLOP analysis."""
    try:
        with unexplained_tracer_errors():
            return nnx.eval_shape(lambda: create(name, **settings))
    except ScalingError as e:  # drop the note JAX appends to errors raised while tracing
        raise ScalingError(str(e).splitlines()[0]) from None


@contextlib.contextmanager
def unexplained_tracer_errors():
    """Tracer errors without JAX's note on where the value came from, while a model is built
    shape-only. Flax reads `.sharding` off every value it stores in a variable (each RNG count
    update) and catches the AttributeError a tracer raises; JAX writes that error's note by
    walking the whole trace so far, so building a model shape-only took time quadratic in its
    layers: 73% of efficientnet_b0's 8.0 s, densenet121 3.8 -> 1.1 s without the notes (flax
    0.12.8, jax 0.10.2). Nothing else changes; where JAX has no such note, nothing is done."""
    tracer = getattr(partial_eval, "DynamicJaxprTracer", None)
    if tracer is None or not hasattr(tracer, "_origin_msg"):
        yield
        return
    note = tracer._origin_msg
    tracer._origin_msg = lambda self: ""
    try:
        yield
    finally:
        tracer._origin_msg = note


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
