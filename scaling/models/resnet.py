"""ResNet and Wide ResNet: one residual network, three size tables; ResNeXt, SE, stochastic depth.

- CIFAR ResNets (He et al. 2015, section 4.2): `resnet{6n+2}`, three stages of 16/32/64 channels,
  basic blocks, parameter-free zero-padding shortcuts (option A) unless `shortcut='B'`.
- ImageNet ResNets: `resnet{18,34,50,101,152,200}`, the torchvision "v1.5" form (stride on the
  3x3 conv of a bottleneck), 1x1 projection shortcuts.
- Pre-activation forms (He et al. 2016): the `preact_` prefix on either of the above.
- Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016): `wrn{d}_{k}`, d = 6n+4, pre-activation basic
  blocks, 16k/32k/64k channels, optional dropout between the two convs (`block_dropout`).

Three settings of every block, each a family of names of its own (`resnext.py`, `senet.py`):

- `groups` and `base_width` (ResNeXt, Xie et al. 2017): a bottleneck's inner width is
  groups * floor(planes * base_width / 64), its 3x3 conv split into `groups` groups (the
  cardinality), as in torchvision and the authors' Torch code; groups=1, base_width=64 is ResNet.
  base_width=128 alone is torchvision's `wide_resnet50_2` (the inner width doubled).
- `se_ratio` (SENet, Hu et al. 2018): squeeze-and-excitation on the residual branch before the
  sum, reduced to channels * se_ratio rounded as timm does; 0 is none.
- `stochastic_depth` (Huang et al. 2016): the last block's drop rate, falling linearly to 0 at
  the first block (`layers.DropPath`, `layers.linear_drop_rates`).

All are one `ResNet` module, so every option (width multiplier, norm, dropout, shortcut kind,
stage sizes, padding, cardinality, SE, stochastic depth) applies to every name; the tables below
only pick the defaults. Convolutions pad symmetrically (`padding='symmetric'`), as torchvision,
timm and the authors' code do; `padding='same'` is TensorFlow's. With the defaults, `resnet18/50`
compute torchvision's functions, `preact_resnet*` timm's `resnetv2_*` and `wrn*` the official WRN
code's (tests/test_reference.py); `resnext50_32x4d` and `wide_resnet50_2` torchvision's,
`seresnet50` timm's.

Within a stage every block after the first has the same shapes: with `scan=True` (the default) those
blocks are a `Stack`, their parameters stacked on a leading axis and applied by `nnx.scan`, so XLA
compiles one block per stage on CPU (resnet110's training step: 13 s -> 3 s to compile; accelerators
unroll the loop: `stack.scan_blocks`). The weights are those of the unrolled network (`scan=False`;
`unrolled(model)` converts). Stages with dropout in their blocks stay unrolled. Stochastic depth
gives each block its own rate, but as state (`layers.DropRate`), stacked like the weights: a
scan input, so a stage of different rates still compiles one block.
"""

import functools
import math
import re

import jax.numpy as jnp
from flax import nnx

from scaling import ScalingError
from scaling.models.layers import (
    DropPath,
    SqueezeExcite,
    bias_free_conv,
    conv_padding,
    linear_drop_rates,
)
from scaling.models.registry import Family, register
from scaling.models.stack import Stack, unstack
from scaling.ops.conv import conv_general_dilated
from scaling.scale import check_sizes, round_filters, round_repeats

# name -> (block, blocks per stage); channels (64, 128, 256, 512), expanded x4 by bottlenecks.
IMAGENET_SIZES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)


def make_norm(kind, dtype, rngs):
    """A constructor `norm(channels)` for the named normalisation."""
    if kind == "batch":
        # momentum/epsilon as torch and the papers' Torch code (0.1 update rate, 1e-5).
        return functools.partial(nnx.BatchNorm, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)
    if kind == "group":
        return lambda c: nnx.GroupNorm(c, num_groups=math.gcd(32, c), dtype=dtype, rngs=rngs)
    if kind == "layer":
        return functools.partial(nnx.LayerNorm, dtype=dtype, rngs=rngs)
    raise ScalingError(f"unknown norm {kind!r}; valid: batch, group, layer")


class Layers:
    """The conv/norm constructors shared by one network's blocks."""

    def __init__(self, norm, padding, dtype, rngs):
        self.norm = make_norm(norm, dtype, rngs)
        conv_padding((3, 3), padding)  # validate before any layer is built
        self.conv = functools.partial(
            bias_free_conv,
            padding=padding,
            convolution=conv_general_dilated,
            dtype=dtype,
            rngs=rngs,
        )
        self.dtype, self.rngs = dtype, rngs


def se_channels(channels, ratio):
    """SENet's reduced width, channels * ratio rounded as timm's SEModule does
    (`make_divisible(..., 8, round_limit=0)`): to the nearest multiple of 8, at least 8, never
    bumped up as `scale.round_filters` bumps a channel count more than 10% short. A rounding of
    the SE layer's width, not a width multiplier."""
    return max(8, int(channels * ratio + 4) // 8 * 8)


class ResidualBlock(nnx.Module):
    """What every block's residual branch ends with: squeeze-and-excitation (`se_ratio` > 0),
    then stochastic depth (`drop_rate` not None), as timm's ResNet blocks, before the sum."""

    def finish_branch_layers(self, cout, se_ratio, drop_rate, layers):
        se = None
        if se_ratio > 0:  # SENet's: ReLU between the two 1x1 (dense) layers, a sigmoid gate
            se = SqueezeExcite(
                cout,
                se_channels(cout, se_ratio),
                activation=nnx.relu,
                dtype=layers.dtype,
                rngs=layers.rngs,
            )
        self.se = nnx.data(se)
        self.drop_path = nnx.data(
            None if drop_rate is None else DropPath(drop_rate, rngs=layers.rngs)
        )

    def finish_branch(self, y):
        if self.se is not None:
            y = self.se(y)
        return y if self.drop_path is None else self.drop_path(y)


class BasicBlock(ResidualBlock):
    """Two 3x3 convs; post-activation (ResNet) or pre-activation (preact ResNet, WRN)."""

    expansion = 1

    def __init__(self, cin, width, stride, *, preact, shortcut, dropout, layers, **branch):
        cout = width
        self.preact = preact
        self.conv1 = layers.conv(cin, cout, (3, 3), strides=stride)
        self.conv2 = layers.conv(cout, cout, (3, 3))
        self.norm1 = layers.norm(cin if preact else cout)
        self.norm2 = layers.norm(cout)
        self.dropout = nnx.Dropout(dropout, rngs=layers.rngs)
        self.shortcut = Shortcut(cin, cout, stride, shortcut, preact, layers)
        self.finish_branch_layers(cout, branch["se_ratio"], branch["drop_rate"], layers)

    def __call__(self, x):
        if self.preact:
            pre = nnx.relu(self.norm1(x))
            y = self.conv1(pre)
            y = self.conv2(self.dropout(nnx.relu(self.norm2(y))))
            return self.finish_branch(y) + self.shortcut(x, pre)
        y = nnx.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(self.dropout(y)))
        return nnx.relu(self.finish_branch(y) + self.shortcut(x))


class BottleneckBlock(ResidualBlock):
    """1x1 reduce, 3x3 (strided, as in ResNet v1.5; grouped in ResNeXt), 1x1 expand to 4 x
    `width` (the stage's planes)."""

    expansion = 4

    def __init__(
        self, cin, width, stride, *, preact, shortcut, dropout, layers, groups, base_width, **branch
    ):
        cout = width * self.expansion
        # torchvision's and the ResNeXt code's inner width: `groups` paths of
        # floor(planes * base_width / 64) channels each (at least one, for narrow multipliers).
        inner = groups * max(1, width * base_width // 64)
        self.preact = preact
        self.conv1 = layers.conv(cin, inner, (1, 1))
        self.conv2 = layers.conv(inner, inner, (3, 3), strides=stride, groups=groups)
        self.conv3 = layers.conv(inner, cout, (1, 1))
        self.norm1 = layers.norm(cin if preact else inner)
        self.norm2 = layers.norm(inner)
        self.norm3 = layers.norm(inner if preact else cout)
        self.dropout = nnx.Dropout(dropout, rngs=layers.rngs)
        self.shortcut = Shortcut(cin, cout, stride, shortcut, preact, layers)
        self.finish_branch_layers(cout, branch["se_ratio"], branch["drop_rate"], layers)

    def __call__(self, x):
        if self.preact:
            pre = nnx.relu(self.norm1(x))
            y = self.conv1(pre)
            y = self.conv2(nnx.relu(self.norm2(y)))
            y = self.conv3(self.dropout(nnx.relu(self.norm3(y))))
            return self.finish_branch(y) + self.shortcut(x, pre)
        y = nnx.relu(self.norm1(self.conv1(x)))
        y = nnx.relu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(self.dropout(y)))
        return nnx.relu(self.finish_branch(y) + self.shortcut(x))


class Shortcut(nnx.Module):
    """Identity when shapes match; otherwise option A (subsample + zero channels) or B (1x1 conv).

    In pre-activation blocks (`pre`, the block's input after norm and ReLU, is given) an identity
    shortcut adds the raw input, and only a shortcut that changes shape sees the pre-activated
    one, with no norm of its own: He et al. 2016's full pre-activation, the official WRN code
    (`z + x`, or `z + convdim(o1)`) and timm's ResNetV2. In post-activation blocks a projection
    is conv + norm.
    """

    def __init__(self, cin, cout, stride, kind, preact, layers):
        if kind not in ("A", "B"):
            raise ScalingError(f"unknown shortcut {kind!r}; valid: A (zero-pad), B (projection)")
        self.stride = stride
        self.pad = (cout - cin) if (kind == "A" and (stride != 1 or cin != cout)) else 0
        self.identity = stride == 1 and cin == cout
        project = not self.identity and kind == "B"
        self.proj = nnx.data(layers.conv(cin, cout, (1, 1), strides=stride) if project else None)
        self.proj_norm = nnx.data(layers.norm(cout) if project and not preact else None)

    def __call__(self, x, pre=None):
        if self.identity:
            return x
        x = x if pre is None else pre
        if self.proj is not None:
            y = self.proj(x)
            return y if self.proj_norm is None else self.proj_norm(y)
        x = x[:, :: self.stride, :: self.stride, :]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (self.pad // 2, self.pad - self.pad // 2)))


class ResNet(nnx.Module):
    """A residual network: stem, stages of blocks, global average pool, linear classifier."""

    def __init__(
        self,
        stage_sizes,
        widths,
        *,
        block="basic",
        stem="cifar",
        stem_width=None,
        shortcut="B",
        preact=False,
        num_classes=10,
        width_multiplier=1.0,
        depth_multiplier=1.0,
        dropout=0.0,
        block_dropout=0.0,
        groups=1,
        base_width=64,
        se_ratio=0.0,
        stochastic_depth=0.0,
        norm="batch",
        padding="symmetric",
        scan=True,
        dtype=None,
        in_channels=3,
        rngs: nnx.Rngs,
    ):
        if len(stage_sizes) != len(widths) or min(stage_sizes, default=0) < 1:
            raise ScalingError(f"need >= 1 block per stage and one width each, got {stage_sizes}")
        check_sizes(
            num_classes,
            [
                ("dropout", dropout),
                ("block_dropout", block_dropout),
                ("stochastic_depth", stochastic_depth),
            ],
            width_multiplier=width_multiplier,
            depth_multiplier=depth_multiplier,
        )
        if not 0 <= se_ratio <= 1:
            raise ScalingError(f"se_ratio must be in [0, 1] (0: no SE), got {se_ratio}")
        blocks = {"basic": BasicBlock, "bottleneck": BottleneckBlock}
        if block not in blocks:
            raise ScalingError(f"unknown block {block!r}; valid: {', '.join(blocks)}")
        for key, value in (("groups", groups), ("base_width", base_width)):
            if not isinstance(value, int) or value < 1:
                raise ScalingError(f"{key} must be a positive integer, got {value!r}")
        grouped = dict(groups=groups, base_width=base_width)
        if block == "basic" and (groups, base_width) != (1, 64):
            raise ScalingError(
                "groups and base_width widen bottleneck blocks only; basic blocks take "
                f"groups=1, base_width=64 (got {groups}, {base_width})"
            )
        if stem not in ("cifar", "imagenet"):
            raise ScalingError(f"unknown stem {stem!r}; valid: cifar, imagenet")
        layers = Layers(norm, padding, dtype, rngs)
        # Channels and blocks scale by the rules of scaling.scale (EfficientNet's): channels to
        # multiples of 8 (at least 8, never 10% under), blocks per stage rounded up.
        scale = lambda c: round_filters(c, width_multiplier)  # noqa: E731
        stage_sizes = [round_repeats(n, depth_multiplier) for n in stage_sizes]
        stem_width = scale(stem_width or widths[0])

        self.preact, self.imagenet_stem = preact, stem == "imagenet"
        kernel, stride = ((7, 7), 2) if self.imagenet_stem else ((3, 3), 1)
        self.stem = layers.conv(in_channels, stem_width, kernel, strides=stride)
        # Pre-activation nets normalise at the start of each block, so the stem is a bare conv.
        self.stem_norm = nnx.data(None if preact else layers.norm(stem_width))

        block_cls, cin, stage_list = blocks[block], stem_width, []
        # Without stochastic depth the blocks have no drop layer at all (nor its random stream).
        rates = linear_drop_rates(stochastic_depth, sum(stage_sizes))
        rates = iter(rates if stochastic_depth > 0 else [None] * len(rates))
        for i, (n, width) in enumerate(zip(stage_sizes, widths, strict=True)):
            stage = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                b = block_cls(
                    cin,
                    scale(width),
                    stride,
                    preact=preact,
                    shortcut=shortcut,
                    dropout=block_dropout,
                    layers=layers,
                    se_ratio=se_ratio,
                    drop_rate=next(rates),
                    **(grouped if block == "bottleneck" else {}),
                )
                stage.append(b)
                cin = scale(width) * block_cls.expansion
            # All but a stage's first block have the same shapes: scan them. Not with dropout
            # in the blocks, whose random streams the stacked copies would share. (Drop paths
            # scan: each forks a stream of its own when built, and its rate is state.)
            if scan and block_dropout == 0 and n > 2:
                stage = [stage[0], Stack(stage[1:])]
            stage_list.extend(stage)
        self.blocks = nnx.List(stage_list)
        self.final_norm = nnx.data(layers.norm(cin) if preact else None)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(cin, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = self.stem(x)
        if self.stem_norm is not None:
            x = nnx.relu(self.stem_norm(x))
        if self.imagenet_stem:
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for b in self.blocks:
            x = b(x)
        if self.final_norm is not None:
            x = nnx.relu(self.final_norm(x))
        x = jnp.mean(x, axis=(1, 2))
        return self.head(self.dropout(x)).astype(jnp.float32)


def cifar_resnet(depth, **kw):
    if depth < 8 or (depth - 2) % 6:
        raise ScalingError(
            f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 56, 110...), got {depth}"
        )
    n = (depth - 2) // 6
    kw = {"shortcut": "A", **kw}
    return ResNet((n, n, n), CIFAR_WIDTHS, block="basic", stem="cifar", **kw)


def imagenet_resnet(depth, **kw):
    block, sizes = IMAGENET_SIZES[depth]
    kw = {"num_classes": 1000, **kw}
    return ResNet(sizes, IMAGENET_WIDTHS, block=block, stem="imagenet", **kw)


def wide_resnet(depth, k, **kw):
    """WRN-depth-k: three groups of (depth-4)/6 pre-activation basic blocks, 16k/32k/64k wide."""
    if depth < 10 or (depth - 4) % 6:
        raise ScalingError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40...), got {depth}")
    if k < 1:
        raise ScalingError(f"WRN widening factor k must be >= 1, got {k}")
    n = (depth - 4) // 6
    widths = tuple(c * k for c in CIFAR_WIDTHS)
    kw = {"preact": True, "shortcut": "B", **kw}
    return ResNet((n, n, n), widths, block="basic", stem="cifar", stem_width=16, **kw)


def create(name, **kw):
    """Build `wrn{d}_{k}`, `resnet{d}` or `preact_resnet{d}` (the registry's patterns)."""
    if m := re.fullmatch(r"wrn(\d+)_(\d+)", name):
        return wide_resnet(int(m[1]), int(m[2]), **kw)
    m = re.fullmatch(r"(preact_)?resnet(\d+)", name)
    depth = int(m[2])
    if m[1]:
        kw = {"preact": True, **kw}
    # The ImageNet table wins where a depth is also 6n+2 (50, 152, 200).
    if depth in IMAGENET_SIZES:
        return imagenet_resnet(depth, **kw)
    return cifar_resnet(depth, **kw)


def default_image_size(name):
    m = re.fullmatch(r"(preact_)?resnet(\d+)", name)
    return 224 if m and int(m[2]) in IMAGENET_SIZES else 32


def unrolled(model: ResNet) -> ResNet:
    """A copy of `model` with each scanned `Stack` replaced by its blocks, same parameters."""
    new = nnx.clone(model)
    blocks = []
    for block in new.blocks:
        blocks.extend(unstack(block.blocks) if isinstance(block, Stack) else [block])
    new.blocks = nnx.List(blocks)
    return new


register(
    Family(
        name="resnet",
        pattern=r"(preact_)?resnet\d+",
        build=create,
        constructor=ResNet,
        examples=(
            "resnet20",
            "resnet32",
            "resnet44",
            "resnet56",
            "resnet110",
            "resnet18",
            "resnet34",
            "resnet50",
            "resnet101",
            "resnet152",
            "resnet200",
            "preact_resnet18",
            "preact_resnet50",
        ),  # fmt: skip
        image_size=default_image_size,
        names="resnet{6n+2} (CIFAR), resnet{18,34,50,101,152,200} (ImageNet), preact_resnet*",
        width="width_multiplier",
        depth="depth_multiplier",
    )
)
register(
    Family(
        name="wrn",
        pattern=r"wrn\d+_\d+",
        build=create,
        constructor=ResNet,
        examples=("wrn16_4", "wrn16_8", "wrn22_8", "wrn28_10", "wrn40_4"),
        image_size=default_image_size,
        names="wrn{6n+4}_{k}",
        width="width_multiplier",
        depth="depth_multiplier",
    )
)
