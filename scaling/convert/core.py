"""The generic core: which source a state dict comes from, and one load, export and import for
every (family, source) pair, through the tables of the source's module."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling import ScalingError, models
from scaling.convert import big_vision, timm, torchvision, wrn
from scaling.convert.tables import VARIABLES, Table, model_slots

# The sources, each a module of its names: `looks_like(names)`, and `TABLES`, our families it
# fills with their tables and the reference's classifier.
SOURCE_MODULES = {"torchvision": torchvision, "timm": timm, "wrn": wrn, "big_vision": big_vision}
SOURCES = tuple(SOURCE_MODULES)
# Reference tensors that are not weights: BatchNorm's step counters, timm's relative-position
# index buffers (recomputed from the grid).
IGNORED = ("num_batches_tracked", "relative_position_index")

# Our families, by model name.
FAMILIES = {
    "wrn": r"wrn\d+_\d+",
    "preact_resnet": r"preact_resnet\d+",
    "resnet": r"resnet\d+",
    "efficientnet": r"efficientnet(_b\d+)?(_cifar)?",
    "vit": r"vit_[a-z]+\d+",
    "coatnet": r"coatnet(_\d+)?",
    "resnext": r"resnext\d+_\d+x\d+d",  # torchvision's ImageNet forms
    "wide_resnet": r"wide_resnet\d+_\d+",  # torchvision's
    "seresnet": r"se(resnet\d+|resnext\d+_\d+x\d+d)",  # timm's
    "alexnet": r"alexnet",  # torchvision's; alexnet_original and zfnet have no public source
    "vgg": r"vgg\d+(_bn)?",  # the _cifar forms have no public source
    "googlenet": r"googlenet",
    "densenet": r"densenet\d+",  # torchvision's; densenet_bc (CIFAR) has no public source
}
# The supported (family, source) pairs: their tables, and the reference's classifier (its name
# and the axis of its classes), which sets `num_classes` on import.
MAPPINGS = {
    (family, source): table
    for source, module in SOURCE_MODULES.items()
    for family, (table, _) in module.TABLES.items()
}
HEADS = {
    (family, source): head
    for source, module in SOURCE_MODULES.items()
    for family, (_, head) in module.TABLES.items()
}


def detect_source(tensors) -> str:
    """Which of `SOURCES` a state dict comes from, told by its tensor names."""
    names = set(tensors)
    found = [source for source, module in SOURCE_MODULES.items() if module.looks_like(names)]
    if len(found) == 1:
        return found[0]
    what = f"they fit {' and '.join(found)}" if found else "no known naming fits them"
    raise ScalingError(
        f"cannot tell where these {len(names)} tensors come from ({what}); pass source=, one "
        f"of {', '.join(SOURCES)}"
    )


def _family(name: str) -> str:
    for family, pattern in FAMILIES.items():
        if re.fullmatch(pattern, name):
            return family
    raise ScalingError(f"no weight import for model {name!r}; importable: {', '.join(FAMILIES)}")


def _pair(name: str, source) -> tuple[str, str]:
    family = _family(name)
    if source not in SOURCES:
        raise ScalingError(f"unknown source {source!r}; valid: {', '.join(SOURCES)}")
    if (family, source) not in HEADS:
        sources = [s for f, s in HEADS if f == family]
        raise ScalingError(
            f"no mapping from {source} weights to {name}; {family} imports from "
            f"{', '.join(sources)}"
        )
    return family, source


def _prepare(tensors, source) -> dict:
    """The reference's weights by the names the tables use: DataParallel's `module.` prefix off;
    big_vision's parameter tree out of its checkpoint and a scanned encoder split by block."""
    tensors = dict(tensors)
    if tensors and all(name.startswith("module.") for name in tensors):
        tensors = {name[len("module.") :]: value for name, value in tensors.items()}
    return big_vision.prepare(tensors) if source == "big_vision" else tensors


def _rules(model, name, source, names) -> tuple[dict, list]:
    family, source = _pair(name, source)
    slots = model_slots(model)
    table = Table(slots, set(names))
    MAPPINGS[family, source](model, table)
    return slots, table.rules


def _fmt(path) -> str:
    return "/".join(map(str, path))


def _expected_shapes(rule, slot) -> tuple:
    """The reference shapes that convert to our variable's shape, from its inverse transform."""
    zeros = np.broadcast_to(np.zeros((), slot.dtype), slot.shape)
    return tuple(np.shape(a) for a in rule.transform.to_ref(zeros))


def _convert(rules, slots, tensors, source, name) -> dict:
    """Our variables' new values, by logical path, after every check; raises on the first
    problem, naming the tensor."""
    by_var = {}
    for rule in rules:
        assert rule.ours not in by_var and rule.ours in slots, f"bad table row {rule}"
        by_var[rule.ours] = rule
    if unassigned := [path for path in slots if path not in by_var]:
        raise ScalingError(
            f"our {name}'s {_fmt(unassigned[0])} has no counterpart among {source}'s names"
            f"{_more(unassigned, 'such')}"
        )
    missing = [(ref, rule) for rule in rules for ref in rule.refs if ref not in tensors]
    if missing:
        ref, rule = missing[0]
        raise ScalingError(
            f"{source} tensor {ref!r} is missing (for our {_fmt(rule.ours)}){_more(missing)}"
        )
    used = [ref for rule in rules for ref in rule.refs]
    assert len(used) == len(set(used)), "a reference tensor in two table rows"
    for rule in rules:
        if not rule.refs:  # a value of our own (`_identity_projection`)
            continue
        slot = slots[rule.ours]
        for ref, shape in zip(rule.refs, _expected_shapes(rule, slot), strict=True):
            if np.shape(tensors[ref]) != shape:
                raise ScalingError(
                    f"{source} tensor {ref!r} has shape {np.shape(tensors[ref])}, expected "
                    f"{shape} for our {_fmt(rule.ours)} {slot.shape}"
                )
    ignored = {n for n in tensors if n.rsplit(".", 1)[-1] in IGNORED}
    if extra := sorted(set(tensors) - set(used) - ignored):
        raise ScalingError(
            f"{source} tensor {extra[0]!r} {np.shape(tensors[extra[0]])} has no place in "
            f"{name}{_more(extra, 'unused')}"
        )
    values = {}
    for rule in rules:
        arrays = [np.asarray(tensors[ref]) for ref in rule.refs]
        values[rule.ours] = np.asarray(rule.transform.to_ours(*arrays), slots[rule.ours].dtype)
    return values


def _more(items, what="missing") -> str:
    return f"; {len(items) - 1} more {what}" if len(items) > 1 else ""


def load(model, name: str, tensors, source: str | None = None) -> None:
    """Fill `model` (built by `models.create(name, ...)`) in place from a reference state dict
    of `source` (detected from the names when None): every parameter and BatchNorm statistic,
    or, when anything is missing, extra or of the wrong shape, nothing at all."""
    source = source or detect_source(tensors)
    tensors = _prepare(tensors, source)
    slots, rules = _rules(model, name, source, tensors)
    values = _convert(rules, slots, tensors, source, name)
    by_variable = {}
    for logical, slot in slots.items():  # stacked blocks go back on their leading axis
        by_variable.setdefault(slot.path, []).append((slot.index, values[logical]))
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(model, VARIABLES)):
        parts = sorted(by_variable[path], key=lambda p: -1 if p[0] is None else p[0])
        value = parts[0][1] if parts[0][0] is None else np.stack([v for _, v in parts])
        flat.append((path, var.replace(jnp.asarray(np.asarray(value, var.dtype)))))
    nnx.update(model, nnx.from_flat_state(flat))


def export(model, name: str, source: str) -> dict[str, np.ndarray]:
    """`model`'s weights as a `source` state dict, in its names and layouts (for big_vision, the
    original ViT code's names): the inverse of `load`. It holds no BatchNorm step counters, so
    torch loads it with `strict=False`."""
    slots, rules = _rules(model, name, source, ())
    flat = nnx.to_flat_state(nnx.state(model, VARIABLES))
    state = {path: np.asarray(var[...]) for path, var in flat}
    out = {}
    for rule in rules:
        slot = slots[rule.ours]
        value = state[slot.path] if slot.index is None else state[slot.path][slot.index]
        # Row-major copies: safetensors writes an array's buffer as if it were (a transposed
        # view's is not, and its file would hold the wrong values).
        values = map(np.ascontiguousarray, rule.transform.to_ref(value))
        out.update(zip(rule.refs, values, strict=True))
    return out


def import_model(name, tensors, *, source=None, image_size=None, **settings) -> nnx.Module:
    """Model `name` built to hold a reference state dict and filled from it: `num_classes` from
    the reference's classifier and, for ViT and CoAtNet, the reference's own resolution; then
    resized to `image_size` if that is given and differs. `settings` go to `models.create`."""
    source = source or detect_source(tensors)
    family, source = _pair(name, source)
    tensors = _prepare(tensors, source)
    head, axis = HEADS[family, source]
    if head not in tensors:
        raise ScalingError(f"{source} tensor {head!r} (the classifier) is missing")
    settings.setdefault("num_classes", int(np.shape(tensors[head])[axis]))
    own_size = None
    if family == "vit":
        own_size = _vit_settings(name, source, tensors, settings)
    elif family == "coatnet":
        own_size = _coatnet_settings(tensors, settings)
    elif family == "googlenet":  # torchvision's ImageNet checkpoint holds the auxiliary heads
        settings.setdefault("aux_logits", "aux1.fc2.weight" in tensors)
    # Without a resolution of its own (a CoAtNet without attention) it is built at `image_size`.
    # Built shape-only, since every weight is replaced: initialising eagerly compiles a program
    # for each distinct shape (googlenet: most of a minute on 2 cores).
    model = models.abstract(name, image_size=own_size or image_size, **settings)
    load(model, name, tensors, source)
    start_random_streams(model)
    return model if image_size is None else models.resize(model, image_size)


def start_random_streams(model, seed: int = 0) -> None:
    """The random streams (dropout's) of a model built shape-only: keys split from `seed`'s (a
    scanned stack holds one a block), counts at zero. Every other variable must hold a value."""
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(model)):
        shape = var.get_value().shape
        if isinstance(var, nnx.RngKey):
            keys = jax.random.split(jax.random.key(seed), math.prod(shape))
            var = var.replace(keys.reshape(shape))
        elif isinstance(var, nnx.RngCount):
            var = var.replace(jnp.zeros(shape, jnp.uint32))
        elif isinstance(var.get_value(), jax.ShapeDtypeStruct):
            raise ValueError(f"{'/'.join(map(str, path))} holds no value")
        flat.append((path, var))
    nnx.update(model, nnx.from_flat_state(flat))


def _vit_settings(name, source, tensors, settings) -> int:
    """The pool (a class token or none) and the resolution of a ViT state dict."""
    cls = "cls_token" if source == "timm" else "cls"
    settings.setdefault("pool", "token" if cls in tensors else "gap")
    if source == "timm":
        pos, prefix = "pos_embed", int(cls in tensors)
    elif "pos_embedding" in tensors:  # big_vision's, without a class-token row
        pos, prefix = "pos_embedding", 0
    else:
        pos, prefix = "Transformer/posembed_input/pos_embedding", int(cls in tensors)
    if pos not in tensors:
        raise ScalingError(f"{source} tensor {pos!r} (the position embeddings) is missing")
    patches = np.shape(tensors[pos])[1] - prefix
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise ScalingError(f"{source} tensor {pos!r}: {patches} positions are not a square grid")
    return grid * int(re.fullmatch(r"vit_[a-z]+(\d+)", name)[1])


def _coatnet_settings(tensors, settings) -> int | None:
    """The layout (which of timm's stages attend) and the resolution, from the first
    relative-bias table: a (2g-1)^2-row table is a g x g map at 1/2^(stage+2) of the input."""
    attends = [f"stages.{s}.blocks.0.attn.qkv.weight" in tensors for s in range(4)]
    settings.setdefault("layout", "".join("T" if a else "C" for a in attends))
    for stage, attend in enumerate(attends):
        if attend:
            table = f"stages.{stage}.blocks.0.attn.rel_pos.relative_position_bias_table"
            if table not in tensors:
                raise ScalingError(f"timm tensor {table!r} is missing")
            rows = np.shape(tensors[table])[0]
            side = (math.isqrt(rows) + 1) // 2
            if (2 * side - 1) ** 2 != rows:
                raise ScalingError(f"timm tensor {table!r}: {rows} rows are not a square grid's")
            return side * 2 ** (stage + (1 if settings.get("small_images") else 2))
    return None
