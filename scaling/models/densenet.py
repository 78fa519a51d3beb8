"""DenseNet-BC: Huang et al. 2017, "Densely Connected Convolutional Networks".

Each layer of a dense block adds k new channels (the growth rate) to the concatenation of all
the block's earlier outputs: BN-ReLU-1x1 conv to 4k (the bottleneck, "B"), BN-ReLU-3x3 conv to
k. Between blocks a transition (BN-ReLU-1x1 conv-2x2 average pool) halves the channels
(compression 0.5, "C"). Two size tables:

- ImageNet: `densenet{121,169,201,161}`, torchvision's `densenet121()` ... (its function,
  tests/test_reference.py): four blocks, a 7x7/2 conv of 2k channels, BN, ReLU, 3x3/2 max pool
  before them, BN-ReLU, global average pool and the classifier after.
- CIFAR: `densenet_bc{L}_{k}` (the paper's section 4.1 and the authors' Torch code,
  liuzhuang13/DenseNet): three blocks of (L - 4) / 6 layers at 32, 16 and 8 pixels, a 3x3 conv of
  2k channels (bare: each layer normalises its own input) before them. `densenet_bc100_12` has
  769,162 parameters (the paper's 0.8M; convs without biases, as the authors' code and
  torchvision), `densenet_bc250_24` 15.3M and `densenet_bc190_40` 25.6M (the paper's 15.3M and
  25.6M).

Scaling: `width_multiplier` scales the growth rate k by `round_filters` to a multiple of 4, not
8, so that every k of the paper (12, 24, 32, 40, 48) is its own width 1; the stem (2k), the
bottleneck (4k) and every concatenation follow k. `depth_multiplier` scales the layers of each
block by `round_repeats`. `bottleneck=0` drops the 1x1 convs and `compression=1` the channel
halving: the paper's plain DenseNet (L, k), 3x3 layers only, (L - 4) / 3 to a block and a
16-channel stem; (40, 12) is `DenseNet((12, 12, 12), 12, stem="cifar", stem_width=16,
bottleneck=0, compression=1)`, 1,019,722 parameters (the paper's 1.0M; (100, 12): 6,979,642,
its 7.0M).
"""

import re

import jax.numpy as jnp
from flax import nnx

from scaling import ScalingError
from scaling.models.layers import ConvNorm
from scaling.models.registry import Family, register
from scaling.scale import check_sizes, round_filters, round_repeats

# name -> (layers per dense block, growth rate k): torchvision's table (the paper's Table 1;
# DenseNet-161 has k=48).
IMAGENET_SIZES = {
    121: ((6, 12, 24, 16), 32),
    169: ((6, 12, 32, 32), 32),
    201: ((6, 12, 48, 32), 32),
    161: ((6, 12, 36, 24), 48),
}
# The growth rate scales to multiples of this (see the module docstring).
GROWTH_DIVISOR = 4


class DenseLayer(nnx.Module):
    """BN-ReLU-1x1 conv to the bottleneck width (none if 0), BN-ReLU-3x3 conv to k channels,
    dropout (torchvision's `drop_rate`), concatenated to its input."""

    def __init__(self, cin, growth, bottleneck, dropout, *, make):
        width = bottleneck or cin
        self.norm1 = make.norm(cin)
        self.conv1 = nnx.data(make.conv(cin, width, (1, 1)) if bottleneck else None)
        self.norm2 = nnx.data(make.norm(width) if bottleneck else None)
        self.conv2 = make.conv(width, growth, (3, 3))
        # only where it drops something: each Dropout holds a random stream to split
        self.dropout = nnx.data(nnx.Dropout(dropout, rngs=make.rngs) if dropout else None)

    def __call__(self, x):
        y = nnx.relu(self.norm1(x))
        if self.conv1 is not None:
            y = nnx.relu(self.norm2(self.conv1(y)))
        y = self.conv2(y)
        return jnp.concatenate([x, y if self.dropout is None else self.dropout(y)], axis=-1)


class Transition(nnx.Module):
    """BN-ReLU-1x1 conv (compressing the channels), 2x2/2 average pool."""

    def __init__(self, cin, cout, *, make):
        self.norm = make.norm(cin)
        self.conv = make.conv(cin, cout, (1, 1))

    def __call__(self, x):
        x = self.conv(nnx.relu(self.norm(x)))
        return nnx.avg_pool(x, (2, 2), strides=(2, 2))  # an odd side loses its last row


class DenseNet(nnx.Module):
    """Stem, dense blocks with a transition between each two, BN-ReLU, global average pool,
    classifier."""

    def __init__(
        self,
        block_sizes,
        growth_rate,
        *,
        stem="imagenet",
        stem_width=None,  # None: 2k (torchvision's 64 and 96, the authors' 2k on CIFAR)
        bottleneck=4,  # the 1x1 conv's width in units of k; 0: no bottleneck (plain DenseNet)
        compression=0.5,  # DenseNet-BC's; 1: none
        num_classes=1000,
        width_multiplier=1.0,
        depth_multiplier=1.0,
        dropout=0.0,  # before the classifier
        block_dropout=0.0,  # after each layer's 3x3 conv (the paper's 0.2 without augmentation)
        dtype=None,
        in_channels=3,
        rngs: nnx.Rngs,
    ):
        if not block_sizes or min(block_sizes) < 1 or growth_rate < 1:
            raise ScalingError(
                f"need >= 1 layer per block and k >= 1, got {block_sizes}, k={growth_rate}"
            )
        check_sizes(
            num_classes,
            [("dropout", dropout), ("block_dropout", block_dropout)],
            width_multiplier=width_multiplier,
            depth_multiplier=depth_multiplier,
        )
        if not 0 < compression <= 1:
            raise ScalingError(f"compression must be in (0, 1], got {compression}")
        if bottleneck < 0:
            raise ScalingError(f"bottleneck must be >= 0 (0: none), got {bottleneck}")
        if stem not in ("imagenet", "cifar"):
            raise ScalingError(f"unknown stem {stem!r}; valid: imagenet, cifar")
        make = ConvNorm(dtype, rngs)
        k = round_filters(growth_rate, width_multiplier, GROWTH_DIVISOR)
        block_sizes = [round_repeats(n, depth_multiplier) for n in block_sizes]
        cin = 2 * k if stem_width is None else round_filters(stem_width, width_multiplier)

        self.imagenet_stem = stem == "imagenet"
        kernel, stride = ((7, 7), 2) if self.imagenet_stem else ((3, 3), 1)
        self.stem = make.conv(in_channels, cin, kernel, strides=stride)
        # The CIFAR stem is a bare conv: each layer normalises its own input.
        self.stem_norm = nnx.data(make.norm(cin) if self.imagenet_stem else None)
        blocks, transitions = [], []
        for b, n in enumerate(block_sizes):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(cin, k, bottleneck * k, block_dropout, make=make))
                cin += k
            blocks.append(nnx.List(layers))
            if b < len(block_sizes) - 1:
                cout = int(cin * compression)  # rounded down, as torchvision and the Torch code
                transitions.append(Transition(cin, cout, make=make))
                cin = cout
        self.blocks = nnx.List(blocks)
        self.transitions = nnx.List(transitions)
        self.final_norm = make.norm(cin)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(cin, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = self.stem(x)
        if self.imagenet_stem:
            x = nnx.relu(self.stem_norm(x))
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for b, block in enumerate(self.blocks):
            for layer in block:
                x = layer(x)
            if b < len(self.transitions):
                x = self.transitions[b](x)
        x = jnp.mean(nnx.relu(self.final_norm(x)), axis=(1, 2))
        return self.head(self.dropout(x)).astype(jnp.float32)


def create(name, **kw):
    """Build `densenet{121,169,201,161}` or `densenet_bc{L}_{k}` (the registry's pattern)."""
    if m := re.fullmatch(r"densenet_bc(\d+)_(\d+)", name):
        depth, k = int(m[1]), int(m[2])
        if depth < 10 or (depth - 4) % 6:
            raise ScalingError(
                f"DenseNet-BC depth L must be 6n+4 (40, 100, 190, 250...), got {depth}"
            )
        n = (depth - 4) // 6
        return DenseNet((n, n, n), k, **{"stem": "cifar", "num_classes": 10, **kw})
    depth = int(re.fullmatch(r"densenet(\d+)", name)[1])
    if depth not in IMAGENET_SIZES:
        valid = ", ".join(map(str, IMAGENET_SIZES))
        raise ScalingError(f"ImageNet DenseNet depth must be one of {valid}, got {depth}")
    sizes, k = IMAGENET_SIZES[depth]
    return DenseNet(sizes, k, **kw)


register(
    Family(
        name="densenet",
        pattern=r"densenet(\d+|_bc\d+_\d+)",
        build=create,
        constructor=DenseNet,
        examples=(
            "densenet121",
            "densenet169",
            "densenet201",
            "densenet161",
            "densenet_bc100_12",
            "densenet_bc250_24",
            "densenet_bc190_40",
        ),  # fmt: skip
        image_size=lambda name: 32 if name.startswith("densenet_bc") else 224,
        names="densenet{121,169,201,161} (ImageNet), densenet_bc{6n+4}_{k} (CIFAR)",
        width="width_multiplier",
        depth="depth_multiplier",
    )
)
