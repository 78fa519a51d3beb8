"""Weights from reference implementations, imported into this library's models (and exported back).

Sources (`SOURCES`) and the families each one fills:
- `torchvision`: `resnet{18,34,50,101,152}` from torchvision's `resnet18()` ... state dicts;
- `timm`: `preact_resnet*` from `resnetv2_*`, `efficientnet_b*` from `tf_efficientnet_b*`,
  `vit_*` from `vit_*_patch*_*`, `coatnet_*` from `coatnet_*_224`;
- `wrn`: `wrn{d}_{k}` from the official Wide ResNet PyTorch code's flat parameter dict;
- `big_vision`: `vit_*` from the `.npz` checkpoints of Google's ViT code (the original
  `vision_transformer` names, `Transformer/posembed_input/...`, as timm's `_load_weights` reads
  them) and of big_vision itself (`params/` prefix, `pos_embedding`, scanned `encoderblock`).

Each (family, source) pair is a table of rules "reference tensor(s) -> our variable, transform",
built from our model's own structure (`_Table`), so one generic core checks every load the same
way: every variable of ours (parameters and BatchNorm statistics) gets exactly one rule, every
reference tensor is used exactly once (BatchNorm step counters and timm's index buffers excepted),
and shapes are compared in the reference's own layout, all before anything is written: a load
either fills the whole model or changes nothing. Scanned stacks (a ResNet stage's `Stack`, a ViT's
vmapped encoder) are seen block by block, their per-block tensors stacked on the leading axis.

The same rules run backwards (`export`), giving a state dict in the reference's names and layouts,
which the tests use to round-trip every pair without torch.
"""

import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling import ScalingError, models
from scaling.models import coatnet, resnet, vit
from scaling.models.stack import Stack

SOURCES = ("torchvision", "timm", "wrn", "big_vision")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".pt7")
# Reference tensors that are not weights: BatchNorm's step counters, timm's relative-position
# index buffers (recomputed from the grid).
IGNORED = ("num_batches_tracked", "relative_position_index")
VARIABLES = (nnx.Param, nnx.BatchStat)


# --------------------------------------------------------------------------------------------
# Reading checkpoints


def read(path) -> dict[str, np.ndarray]:
    """The tensors of a checkpoint file by name: `.safetensors` and big_vision `.npz` without
    torch, PyTorch pickles (`.pth`, `.pt`, `.bin`, `.pt7`) with it."""
    path = Path(path)
    if not path.is_file():
        raise ScalingError(f"{path}: no such checkpoint file")
    suffix = path.suffix.lower()
    valid = ".safetensors, .npz, " + "/".join(TORCH_SUFFIXES) + " (PyTorch)"
    if suffix not in (".safetensors", ".npz", *TORCH_SUFFIXES):
        raise ScalingError(f"{path}: unknown checkpoint format {suffix!r}; valid: {valid}")
    if suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    try:
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return load_file(path)
        with np.load(path, allow_pickle=False) as npz:  # big_vision: flat names joined by '/'
            return {name: npz[name] for name in npz.files}
    except Exception as e:  # each reader has its own errors for a damaged file
        raise ScalingError(f"{path}: unreadable {suffix} checkpoint ({_first_line(e)})") from None


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict, or the one inside a training checkpoint's dict (under
    `state_dict`, `model` or, in the official WRN code's, `params`)."""
    try:
        import torch
    except ImportError:
        raise ScalingError(
            f"{path}: reading PyTorch checkpoints needs torch (pip install torch); or convert "
            "the file to .safetensors"
        ) from None
    try:  # weights_only: a checkpoint is data, never code to run
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ScalingError(f"{path}: unreadable PyTorch checkpoint ({_first_line(e)})") from None
    for key in ("state_dict", "model", "params"):  # torch/timm/WRN training checkpoints
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ScalingError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    tensors = {}
    for name, value in obj.items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
            tensors[name] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return tensors


def _first_line(error) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


# --------------------------------------------------------------------------------------------
# Sources and families

_TIMM_STEMS = (
    "stem.conv.weight",
    "stem.conv1.weight",
    "patch_embed.proj.weight",
    "conv_stem.weight",
)
_SIGNATURES = {  # source -> whether a set of tensor names has its telltale names
    "torchvision": lambda names: {"conv1.weight", "layer1.0.conv1.weight", "fc.weight"} <= names,
    "timm": lambda names: any(stem in names for stem in _TIMM_STEMS),
    "wrn": lambda names: {"conv0", "group0.block0.conv0"} <= names,
    "big_vision": lambda names: any(name.endswith("embedding/kernel") for name in names),
}
# Our families, by model name.
FAMILIES = {
    "wrn": r"wrn\d+_\d+",
    "preact_resnet": r"preact_resnet\d+",
    "resnet": r"resnet\d+",
    "efficientnet": r"efficientnet(_b\d+)?(_cifar)?",
    "vit": r"vit_[a-z]+\d+",
    "coatnet": r"coatnet(_\d+)?",
}
# The supported (family, source) pairs, with the reference's classifier (its name and the axis
# of its classes), which sets `num_classes` on import.
HEADS = {
    ("resnet", "torchvision"): ("fc.weight", 0),
    ("preact_resnet", "timm"): ("head.fc.weight", 0),
    ("wrn", "wrn"): ("fc.weight", 0),
    ("efficientnet", "timm"): ("classifier.weight", 0),
    ("vit", "timm"): ("head.weight", 0),
    ("vit", "big_vision"): ("head/kernel", -1),
    ("coatnet", "timm"): ("head.fc.weight", 0),
}


def detect_source(tensors) -> str:
    """Which of `SOURCES` a state dict comes from, told by its tensor names."""
    names = set(tensors)
    found = [source for source, looks_like in _SIGNATURES.items() if looks_like(names)]
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


def _qkv_per_head(heads: int, kernel: bool) -> Transform:
    """timm's Attention2d (head_first) lays its qkv conv's outputs out as (heads, 3, head_dim);
    ours (vit.SelfAttention) as (3, heads, head_dim)."""

    def to_ours(w):
        w = w[:, :, 0, 0] if kernel else w
        w = w.reshape(heads, 3, -1, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)
        return w.T if kernel else w

    def to_ref(a):
        a = a.T if kernel else a
        a = a.reshape(3, heads, -1, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)
        return (a[:, :, None, None] if kernel else a,)

    return Transform(to_ours, to_ref)


def _bias_table(grid) -> Transform:
    """timm's ((2H-1)(2W-1), heads) table, gathered at dy * (2W-1) + dx for the offset
    (dy, dx) of query from key shifted by (H-1, W-1): ours is the same table as
    (2H-1, 2W-1, heads), indexed [dy, dx] (coatnet.relative_position_index)."""
    h, w = grid
    return Transform(
        lambda t: t.reshape(2 * h - 1, 2 * w - 1, t.shape[-1]),
        lambda a: (a.reshape(-1, a.shape[-1]),),
    )


def _identity_projection(channels: int, kernel: bool) -> Transform:
    """timm's Downsample2d has no 1x1 conv when it keeps the width; ours has one, which computes
    the same function as the identity."""
    value = np.eye(channels, dtype=np.float32)[None, None] if kernel else np.zeros(channels)

    def to_ref(a):
        if not np.array_equal(np.asarray(a), value):
            raise ScalingError(
                "a width-keeping CoAtNet shortcut that is not the identity has no timm counterpart"
            )
        return ()

    return Transform(lambda: value, to_ref)


def _big_vision_attention(heads: int, part: str) -> Transform:
    """big_vision's separate query/key/value kernels (D, heads, head_dim) and biases
    (heads, head_dim), and out kernel (heads, head_dim, D), as our fused qkv and proj."""
    if part == "qkv_kernel":  # (D, 3, heads, head_dim): the (3, heads, head_dim) layout of ours
        return Transform(
            lambda q, k, v: np.stack([q, k, v], 1).reshape(q.shape[0], -1),
            lambda a: tuple(a.reshape(a.shape[0], 3, heads, -1).swapaxes(0, 1)),
        )
    if part == "qkv_bias":
        return Transform(
            lambda q, k, v: np.stack([q, k, v]).reshape(-1),
            lambda a: tuple(a.reshape(3, heads, -1)),
        )
    return Transform(  # out kernel
        lambda o: o.reshape(-1, o.shape[-1]), lambda a: (a.reshape(heads, -1, a.shape[-1]),)
    )


# big_vision adds its position embeddings before it prepends the class token; ours are added
# after, with a row for the token: that row is zero.
NO_CLASS_ROW = Transform(
    lambda p: np.concatenate([np.zeros_like(p[:, :1]), p], axis=1), lambda a: (a[:, 1:],)
)


# --------------------------------------------------------------------------------------------
# Our variables, block by block


@dataclasses.dataclass(frozen=True)
class _Slot:
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
        depth = _vit_depth(model)
        return {("encoder", "blocks"): [(("encoder", "blocks", i), i) for i in range(depth)]}
    return {}


def _slots(model) -> dict[tuple, _Slot]:
    """Every parameter and BatchNorm statistic of `model` by logical path (blocks unstacked)."""
    stacks, slots = _stacks(model), {}
    for path, var in nnx.to_flat_state(nnx.state(model, VARIABLES)):
        prefix = next((path[:n] for n in range(len(path), 0, -1) if path[:n] in stacks), None)
        places = stacks[prefix] if prefix else [(path, None)]
        rest = path[len(prefix) :] if prefix else ()
        for logical, index in places:
            shape = var.shape[1:] if index is not None else var.shape
            slots[(*logical, *rest)] = _Slot(path, index, tuple(shape), np.dtype(var.dtype))
    return slots


def _vit_depth(model) -> int:
    blocks = model.encoder.blocks
    return blocks.norm1.scale.shape[0] if model.encoder.scan else len(blocks)


def _vit_heads(model) -> int:
    blocks = model.encoder.blocks
    return (blocks if model.encoder.scan else blocks[0]).attn.num_heads


def _resnet_blocks(model) -> list:
    """(our prefix, block) of each residual block in order, a `Stack`'s blocks one by one."""
    blocks = []
    for item in model.blocks:
        blocks += [item.blocks] * item.depth if isinstance(item, Stack) else [item]
    return [(f"blocks/{k}", block) for k, block in enumerate(blocks)]


def _stages(blocks, starts) -> list:
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


class _Table:
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


def _conv_numbers(block):
    """A residual block's convs (and norms) are numbered 1, 2, 3 here and in torchvision/timm."""
    return (1, 2, 3) if isinstance(block, resnet.BottleneckBlock) else (1, 2)


def _torchvision_resnet(model, t):
    t.layer("conv1", "stem", "conv")
    t.layer("bn1", "stem_norm", "bn")
    blocks = _resnet_blocks(model)
    for stage, j, ours, block in _stages(blocks, lambda b: b.shortcut.stride > 1):
        ref = f"layer{stage + 1}.{j}"
        for i in _conv_numbers(block):
            t.layer(f"{ref}.conv{i}", f"{ours}/conv{i}", "conv")
            t.layer(f"{ref}.bn{i}", f"{ours}/norm{i}", "bn")
        t.layer(f"{ref}.downsample.0", f"{ours}/shortcut/proj", "conv", optional=True)
        t.layer(f"{ref}.downsample.1", f"{ours}/shortcut/proj_norm", "bn", optional=True)
    t.layer("fc", "head", "linear")


def _timm_resnetv2(model, t):
    t.layer("stem.conv", "stem", "conv")
    blocks = _resnet_blocks(model)
    for stage, j, ours, block in _stages(blocks, lambda b: b.shortcut.stride > 1):
        ref = f"stages.{stage}.blocks.{j}"
        for i in _conv_numbers(block):
            t.layer(f"{ref}.norm{i}", f"{ours}/norm{i}", "bn")  # pre-activation: of the input
            t.layer(f"{ref}.conv{i}", f"{ours}/conv{i}", "conv")
        t.layer(f"{ref}.downsample.conv", f"{ours}/shortcut/proj", "conv", optional=True)
    t.layer("norm", "final_norm", "bn")
    t.layer("head.fc", "head", "conv1x1_linear")


# The official WRN block: o1 = relu(bn0(x)); z = conv1(relu(bn1(conv0(o1)))); z + convdim(o1).
WRN_BLOCK = (
    ("bn0", "norm1", "bn"),
    ("conv0", "conv1", "bare_conv"),
    ("bn1", "norm2", "bn"),
    ("conv1", "conv2", "bare_conv"),
)


def _wrn(model, t):
    t.layer("conv0", "stem", "bare_conv")
    blocks = _resnet_blocks(model)
    for group, j, ours, _ in _stages(blocks, lambda b: b.shortcut.stride > 1):
        ref = f"group{group}.block{j}"
        for theirs, mine, kind in WRN_BLOCK:
            t.layer(f"{ref}.{theirs}", f"{ours}/{mine}", kind)
        t.layer(f"{ref}.convdim", f"{ours}/shortcut/proj", "bare_conv", optional=True)
    t.layer("bn", "final_norm", "bn")
    t.layer("fc", "head", "linear")


# timm's EfficientNet blocks: DepthwiseSeparableConv where the expansion ratio is 1 (no
# expansion conv), InvertedResidual elsewhere. timm name -> ours.
EFFICIENTNET_SEPARABLE = {
    "conv_dw": "depthwise",
    "bn1": "depthwise_norm",
    "conv_pw": "project",
    "bn2": "project_norm",
}
EFFICIENTNET_INVERTED = {
    "conv_pw": "expand",
    "bn1": "expand_norm",
    "conv_dw": "depthwise",
    "bn2": "depthwise_norm",
    "conv_pwl": "project",
    "bn3": "project_norm",
}


def _timm_efficientnet(model, t):
    t.layer("conv_stem", "stem", "conv")
    t.layer("bn1", "stem_norm", "bn")
    blocks = [(f"blocks/{k}", block) for k, block in enumerate(model.blocks)]
    # A stage's first block is the one without the identity skip (it strides or widens).
    for stage, j, ours, block in _stages(blocks, lambda b: not b.skip):
        ref = f"blocks.{stage}.{j}"
        names = EFFICIENTNET_SEPARABLE if block.expand is None else EFFICIENTNET_INVERTED
        for theirs, mine in names.items():
            t.layer(f"{ref}.{theirs}", f"{ours}/{mine}", "bn" if theirs[:2] == "bn" else "conv")
        t.layer(f"{ref}.se.conv_reduce", f"{ours}/se_reduce", "conv1x1_linear")
        t.layer(f"{ref}.se.conv_expand", f"{ours}/se_expand", "conv1x1_linear")
    t.layer("conv_head", "top", "conv")
    t.layer("bn2", "top_norm", "bn")
    t.layer("classifier", "head", "linear")


VIT_BLOCK = (  # timm's qkv is laid out (3, heads, head_dim), as ours
    ("norm1", "norm1", "ln"),
    ("attn.qkv", "attn/qkv", "linear"),
    ("attn.proj", "attn/proj", "linear"),
    ("norm2", "norm2", "ln"),
    ("mlp.fc1", "mlp/fc1", "linear"),
    ("mlp.fc2", "mlp/fc2", "linear"),
)


def _timm_vit(model, t):
    t.layer("patch_embed.proj", "patch_embed", "conv")
    t.layer("cls_token", "cls_token", "param", optional=True)
    t.layer("pos_embed", "pos_embed", "param")
    for i in range(_vit_depth(model)):
        for theirs, mine, kind in VIT_BLOCK:
            t.layer(f"blocks.{i}.{theirs}", f"encoder/blocks/{i}/{mine}", kind)
    t.layer("norm", "norm", "ln")
    t.layer("head", "head", "linear")


def _big_vision_vit(model, t):
    """The original ViT code's names (as timm's `_load_weights` reads them), or big_vision's:
    `pos_embedding` (no class-token row) and other module numbers."""
    big_vision = t.has("pos_embedding")
    heads = _vit_heads(model)
    t.layer("embedding", "patch_embed", "flax")
    t.layer("cls", "cls_token", "param", optional=True)
    if big_vision:
        cls = model.cls_token is not None
        t.rule(["pos_embedding"], "pos_embed", NO_CLASS_ROW if cls else SAME)
    else:
        t.layer("Transformer/posembed_input/pos_embedding", "pos_embed", "param")
    attention, norm2, mlp = (0, 1, 0) if big_vision else (1, 2, 3)
    for i in range(_vit_depth(model)):
        ref, ours = f"Transformer/encoderblock_{i}", f"encoder/blocks/{i}"
        mha = f"{ref}/MultiHeadDotProductAttention_{attention}"
        t.layer(f"{ref}/LayerNorm_0", f"{ours}/norm1", "flax")
        for part in ("kernel", "bias"):
            refs = [f"{mha}/{n}/{part}" for n in ("query", "key", "value")]
            t.rule(refs, f"{ours}/attn/qkv/{part}", _big_vision_attention(heads, f"qkv_{part}"))
        t.rule([f"{mha}/out/kernel"], f"{ours}/attn/proj/kernel", _big_vision_attention(heads, ""))
        t.rule([f"{mha}/out/bias"], f"{ours}/attn/proj/bias", SAME)
        t.layer(f"{ref}/LayerNorm_{norm2}", f"{ours}/norm2", "flax")
        t.layer(f"{ref}/MlpBlock_{mlp}/Dense_0", f"{ours}/mlp/fc1", "flax")
        t.layer(f"{ref}/MlpBlock_{mlp}/Dense_1", f"{ours}/mlp/fc2", "flax")
    t.layer("Transformer/encoder_norm", "norm", "flax")
    t.layer("head", "head", "flax")


COATNET_MBCONV = (
    ("pre_norm", "norm0", "bn"),
    ("conv1_1x1", "conv1", "conv"),
    ("norm1", "norm1", "bn"),
    ("conv2_kxk", "conv2", "conv"),  # depthwise (c, 1, 3, 3) -> (3, 3, 1, c)
    ("norm2", "norm2", "bn"),
    ("se.fc1", "se/reduce", "conv1x1_linear"),
    ("se.fc2", "se/expand", "conv1x1_linear"),
    ("conv3_1x1", "conv3", "conv"),
)
COATNET_TRANSFORMER = (  # besides norm1, qkv and the bias table
    ("attn.proj", "attn/proj", "conv1x1_linear"),
    ("norm2", "norm2", "ln"),
    ("mlp.fc1", "mlp/fc1", "conv1x1_linear"),
    ("mlp.fc2", "mlp/fc2", "conv1x1_linear"),
)


def _timm_coatnet(model, t):
    for i in range(len(model.stem.convs)):
        t.layer(f"stem.conv{i + 1}", f"stem/convs/{i}", "conv")
    for i in range(len(model.stem.norms)):
        t.layer(f"stem.norm{i + 1}", f"stem/norms/{i}", "bn")
    blocks = [(f"blocks/{k}", block) for k, block in enumerate(model.blocks)]
    for stage, j, ours, block in _stages(blocks, lambda b: b.stride > 1):
        ref = f"stages.{stage}.blocks.{j}"
        _coatnet_shortcut(t, ref, ours, block)
        if isinstance(block, coatnet.MBConv):
            for theirs, mine, kind in COATNET_MBCONV:
                t.layer(f"{ref}.{theirs}", f"{ours}/{mine}", kind)
            continue
        # A strided block's norm1 is timm's Sequential(norm, down).
        t.layer(f"{ref}.norm1.norm" if block.stride > 1 else f"{ref}.norm1", f"{ours}/norm1", "ln")
        heads = block.attn.num_heads
        t.rule([f"{ref}.attn.qkv.weight"], f"{ours}/attn/qkv/kernel", _qkv_per_head(heads, True))
        t.rule([f"{ref}.attn.qkv.bias"], f"{ours}/attn/qkv/bias", _qkv_per_head(heads, False))
        table = f"{ref}.attn.rel_pos.relative_position_bias_table"
        t.rule([table], f"{ours}/rel_bias", _bias_table(block.grid))
        for theirs, mine, kind in COATNET_TRANSFORMER:
            t.layer(f"{ref}.{theirs}", f"{ours}/{mine}", kind)
    t.layer("head.norm", "norm", "ln")
    t.layer("head.pre_logits.fc", "pre_logits", "linear", optional=True)
    t.layer("head.fc", "head", "linear")


def _coatnet_shortcut(t, ref, ours, block):
    """timm's strided blocks pool, then widen with `shortcut.expand` (no conv at equal widths)."""
    if block.shortcut is None:
        return
    cin, cout = block.shortcut.in_features, block.shortcut.out_features
    if block.stride > 1 and cin == cout:
        t.rule([], f"{ours}/shortcut/kernel", _identity_projection(cout, kernel=True))
        t.rule([], f"{ours}/shortcut/bias", _identity_projection(cout, kernel=False))
        return
    name = f"{ref}.shortcut.expand" if block.stride > 1 else f"{ref}.shortcut"
    t.layer(name, f"{ours}/shortcut", "conv")


MAPPINGS = {
    ("resnet", "torchvision"): _torchvision_resnet,
    ("preact_resnet", "timm"): _timm_resnetv2,
    ("wrn", "wrn"): _wrn,
    ("efficientnet", "timm"): _timm_efficientnet,
    ("vit", "timm"): _timm_vit,
    ("vit", "big_vision"): _big_vision_vit,
    ("coatnet", "timm"): _timm_coatnet,
}


# --------------------------------------------------------------------------------------------
# Loading, importing, exporting


def _prepare(tensors, source) -> dict:
    """The reference's weights by the names the tables use: DataParallel's `module.` prefix off;
    big_vision's parameter tree out of its checkpoint and a scanned encoder split by block."""
    tensors = dict(tensors)
    if tensors and all(name.startswith("module.") for name in tensors):
        tensors = {name[len("module.") :]: value for name, value in tensors.items()}
    if source != "big_vision":
        return tensors
    prefixes = ("", "params/", "opt/target/", "params/img/")
    prefix = next((p for p in prefixes if f"{p}embedding/kernel" in tensors), None)
    if prefix is None:
        raise ScalingError("big_vision checkpoint lacks 'embedding/kernel' (or params/...)")
    # Beside the parameters, a checkpoint may hold other trees (optimizer state): not weights.
    params = {n[len(prefix) :]: v for n, v in tensors.items() if n.startswith(prefix)}
    scanned = "Transformer/encoderblock/"
    for name in [n for n in params if n.startswith(scanned)]:
        stacked = params.pop(name)
        for i, value in enumerate(stacked):
            params[f"Transformer/encoderblock_{i}/{name[len(scanned) :]}"] = value
    return params


def _rules(model, name, source, names) -> tuple[dict, list]:
    family, source = _pair(name, source)
    slots = _slots(model)
    table = _Table(slots, set(names))
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
    # Without a resolution of its own (a CoAtNet without attention) it is built at `image_size`.
    model = models.create(name, image_size=own_size or image_size, **settings)
    load(model, name, tensors, source)
    return model if image_size is None else models.resize(model, image_size)


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
