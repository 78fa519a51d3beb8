"""The machinery every (family, source) table is written with: transforms between the
reference's layouts and ours, our model's variables block by block (`model_slots`), and `Table`,
whose rules map reference tensors to our variables."""

import dataclasses
from collections.abc import Callable

import numpy as np
from flax import nnx

from scaling import ScalingError
from scaling.models import resnet, vit
from scaling.models.stack import Stack

VARIABLES = (nnx.Param, nnx.BatchStat)


# --------------------------------------------------------------------------------------------
# Transforms: reference layout -> ours, and back


@dataclasses.dataclass(frozen=True)
class Transform:
    """`to_ours(*reference arrays) -> our array` and its inverse `to_ref(our array) -> tuple`."""

    to_ours: Callable
    to_ref: Callable


SAME = Transform(lambda a: a, lambda a: (a,))
# torch conv weight (out, in, h, w) -> Flax HWIO; depthwise (c, 1, k, k) -> (k, k, 1, c) alike.
OIHW = Transform(lambda w: w.transpose(2, 3, 1, 0), lambda k: (k.transpose(3, 2, 0, 1),))
# torch linear weight (out, in) -> Flax (in, out).
OI = Transform(lambda w: w.T, lambda k: (k.T,))
# A torch 1x1 conv (out, in, 1, 1) -> a Flax Linear (in, out): timm's SE and CoAtNet layers.
OI11 = Transform(lambda w: w[:, :, 0, 0].T, lambda k: (k.T[:, :, None, None],))

# Layer kinds: (suffix of the reference name, our variable (None: the path is one), transform).
# A layer's entries apply where our model has that variable (a conv's bias, say).
LAYERS = {
    "conv": ((".weight", "kernel", OIHW), (".bias", "bias", SAME)),
    "bare_conv": (("", "kernel", OIHW),),  # the official WRN code names convs without .weight
    "linear": ((".weight", "kernel", OI), (".bias", "bias", SAME)),
    "conv1x1_linear": ((".weight", "kernel", OI11), (".bias", "bias", SAME)),
    "bn": (
        (".weight", "scale", SAME),
        (".bias", "bias", SAME),
        (".running_mean", "mean", SAME),
        (".running_var", "var", SAME),
    ),
    "ln": ((".weight", "scale", SAME), (".bias", "bias", SAME)),
    "flax": (("/kernel", "kernel", SAME), ("/bias", "bias", SAME), ("/scale", "scale", SAME)),
    "param": (("", None, SAME),),
}


# --------------------------------------------------------------------------------------------
# Our variables, block by block


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one logical variable lives: a variable of the model, or one block's slice of a
    scanned stack's variable (`index` along its leading axis)."""

    path: tuple
    index: int | None
    shape: tuple
    dtype: np.dtype


def _stacks(model) -> dict[tuple, list]:
    """Physical path prefixes -> the logical prefixes they hold: (prefix, index or None). Our
    ResNets number blocks across `Stack`s; a scanned ViT's encoder holds every block."""
    if isinstance(model, resnet.ResNet):
        table, k = {}, 0
        for p, item in enumerate(model.blocks):
            if isinstance(item, Stack):
                table[("blocks", p, "blocks")] = [(("blocks", k + i), i) for i in range(item.depth)]
                k += item.depth
            else:
                table[("blocks", p)] = [(("blocks", k), None)]
                k += 1
        return table
    if isinstance(model, vit.ViT) and model.encoder.scan:
        depth = vit_depth(model)
        return {("encoder", "blocks"): [(("encoder", "blocks", i), i) for i in range(depth)]}
    return {}


def model_slots(model) -> dict[tuple, Slot]:
    """Every parameter and BatchNorm statistic of `model` by logical path (blocks unstacked)."""
    stacks, slots = _stacks(model), {}
    for path, var in nnx.to_flat_state(nnx.state(model, VARIABLES)):
        prefix = next((path[:n] for n in range(len(path), 0, -1) if path[:n] in stacks), None)
        places = stacks[prefix] if prefix else [(path, None)]
        rest = path[len(prefix) :] if prefix else ()
        for logical, index in places:
            shape = var.shape[1:] if index is not None else var.shape
            slots[(*logical, *rest)] = Slot(path, index, tuple(shape), np.dtype(var.dtype))
    return slots


def vit_depth(model) -> int:
    blocks = model.encoder.blocks
    return blocks.norm1.scale.shape[0] if model.encoder.scan else len(blocks)


def vit_heads(model) -> int:
    blocks = model.encoder.blocks
    return (blocks if model.encoder.scan else blocks[0]).attn.num_heads


def resnet_blocks(model) -> list:
    """(our prefix, block) of each residual block in order, a `Stack`'s blocks one by one."""
    blocks = []
    for item in model.blocks:
        blocks += [item.blocks] * item.depth if isinstance(item, Stack) else [item]
    return [(f"blocks/{k}", block) for k, block in enumerate(blocks)]


def stages(blocks, starts) -> list:
    """(stage, index in stage, our prefix, block): a stage begins at the first block and at
    each block for which `starts(block)` holds (the one that strides or changes the width)."""
    out, stage, j = [], -1, 0
    for k, (ours, block) in enumerate(blocks):
        if k == 0 or starts(block):
            stage, j = stage + 1, 0
        out.append((stage, j, ours, block))
        j += 1
    return out


# --------------------------------------------------------------------------------------------
# The tables


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of a table: our variable from these reference tensors (none: a value of our own),
    through `transform`."""

    refs: tuple  # reference tensor names
    ours: tuple  # our logical variable path
    transform: Transform


class Table:
    """The rules of one (model, source) pair, written layer by layer."""

    def __init__(self, slots, names):
        self.slots, self.names, self.rules = slots, names, []

    def has(self, name) -> bool:
        return name in self.names

    def rule(self, refs, ours, transform):
        self.rules.append(Rule(tuple(refs), _path(ours), transform))

    def layer(self, ref, ours, kind, optional=False):
        """The rules of one layer of `kind` (`LAYERS`); `optional`: ours may lack it."""
        found = False
        for suffix, var, transform in LAYERS[kind]:
            path = _path(ours) + ((var,) if var else ())
            if path in self.slots:
                self.rule([ref + suffix], path, transform)
                found = True
        if not found and not optional:
            raise ScalingError(f"our model has no {ours} for {ref!r}; was it built differently?")


def _path(ours) -> tuple:
    if isinstance(ours, tuple):
        return ours
    return tuple(int(part) if part.isdigit() else part for part in ours.split("/"))


def conv_numbers(block):
    """A residual block's convs (and norms) are numbered 1, 2, 3 here and in torchvision/timm."""
    return (1, 2, 3) if isinstance(block, resnet.BottleneckBlock) else (1, 2)
