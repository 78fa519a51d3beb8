"""FLOPs, multiply-adds and activations of a model's forward pass, per image.

Two conventions, because they differ :
- `flops`: XLA's own cost analysis of the lowered forward pass: 2 per multiply-add that is
  executed; taps that fall on 'SAME' padding are skipped. Use it for utilisation and timing.
- `macs`: multiply-adds as the papers count them, every kernel tap included, read off the
  jaxpr's convolutions and matrix products. Use it to compare with published tables.
`activations` is the number of output elements of those convolutions and matrix products
(the measure of Dollar et al., "Fast and Accurate Model Scaling", 2021).
"""

import math

import jax
import jax.extend
import jax.numpy as jnp
from flax import nnx

from scaling import ops
from scaling.ops import onednn


def _forward(model, image_size, in_channels=3):
    """A pure eval-mode forward function and its abstract arguments, for one image."""
    model.eval()
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32)
    return (lambda state, x: nnx.merge(graphdef, state)(x)), (state, x)


def xla_flops(model, image_size, in_channels=3):
    with ops.counting():
        return int(cost_flops(*_forward(model, image_size, in_channels)))


def cost_flops(fn, args) -> float:
    """XLA's cost analysis of `fn(*args)`, lowered (not compiled) for the CPU whatever the
    default backend: accelerators' runtime plugins analyse compiled programs only, and one
    backend's count keeps the figures comparable across machines. Convolutions are XLA's here,
    not oneDNN's custom calls, which the analysis would count as free."""
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    with jax.default_device(jax.devices("cpu")[0]), onednn.disabled():
        cost = jax.jit(fn).lower(*shapes).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"]


def _count(jaxpr, multiplier=1):
    """(multiply-adds, activations) over a jaxpr, recursing into nested jaxprs."""
    macs = acts = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out = eqn.outvars[0].aval.shape if eqn.outvars else ()
        if name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            macs += math.prod(out) * math.prod(rhs) // out_features
            acts += math.prod(out)
        elif name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            macs += math.prod(out) * math.prod(lhs[i] for i in contract)
            acts += math.prod(out)
        repeat = eqn.params.get("length", 1) if name == "scan" else 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            m, a = _count(sub, repeat)
            macs, acts = macs + m, acts + a
    return macs * multiplier, acts * multiplier


def macs_and_activations(model, image_size, in_channels=3):
    with ops.counting():
        fn, args = _forward(model, image_size, in_channels)
        return _count(jax.make_jaxpr(fn)(*args).jaxpr)
