"""VGG (Simonyan & Zisserman 2015, "Very deep convolutional networks for large-scale image
recognition"): configurations A, B, D and E of their Table 1, as torchvision builds them.

Five stages of 3x3 convolutions (stride 1, padded 1) with 64, 128, 256, 512 and 512 channels,
each stage ending in a 2x2/2 max pool, then a classifier of two 4096-unit dense layers with
dropout 0.5 after each ReLU. `vgg11`, `vgg13`, `vgg16` and `vgg19` are configurations A, B, D
and E. The `_bn` forms (torchvision's, not the paper's) put BatchNorm between each convolution
and its ReLU. As in torchvision, the convolutions keep their biases there, although BatchNorm's
shift makes them redundant, so the parameter counts match torchvision's. As in torchvision too,
an adaptive average pool to 7x7 (the identity at 224) comes before the classifier, so any input
of 32x32 or more gives the same parameters: at 32x32 the last pool leaves 1x1, and the pool
repeats that pixel 49 times. With the defaults each name computes torchvision's function of
the same name (`vgg11_bn` against torchvision's in tests/test_reference.py).

The `_cifar` forms (`vgg16_bn_cifar`, ...; 10 classes and 32x32 inputs by default) keep the
convolutions and replace the classifier with one dense layer on the 512 channels. The last
pool's map is 1x1 at 32x32, and a global average pool reads larger maps. This is the form of
common CIFAR code (e.g. kuangliu/pytorch-cifar's VGG, with BatchNorm: `vgg*_bn_cifar`).

Parameters, with 1000 classes (10 for the `_cifar` forms):

| name | convolutions per stage | plain | `_bn` | `_cifar` | `_bn_cifar` |
|---|---|---|---|---|---|
| `vgg11` (A) | 1, 1, 2, 2, 2 | 132,863,336 | 132,868,840 | 9,225,610 | 9,231,114 |
| `vgg13` (B) | 2, 2, 2, 2, 2 | 133,047,848 | 133,053,736 | 9,410,122 | 9,416,010 |
| `vgg16` (D) | 2, 2, 3, 3, 3 | 138,357,544 | 138,365,992 | 14,719,818 | 14,728,266 |
| `vgg19` (E) | 2, 2, 4, 4, 4 | 143,667,240 | 143,678,248 | 20,029,514 | 20,040,522 |

Scaling:
- `width_multiplier` scales every convolution and both hidden dense layers through
  `scaling.scale.round_filters`;
- `depth_multiplier` scales the convolutions of every stage through `round_repeats`
  (rounded up: A at 2.0 has 2, 2, 4, 4, 4 convolutions, E's stage sizes);
- the resolution is any input side of 32 or more.

`hidden` (4096) is the width of the two hidden dense layers before the width multiplier. The
reference test narrows them to 128 (and torchvision's to match), so it draws 12M weights, not
133M; the convolutions, the adaptive pool and the flatten order are tested all the same.
"""

import re

import jax.numpy as jnp
from flax import nnx

from scaling import ScalingError
from scaling.models.layers import adaptive_avg_pool, conv_layer
from scaling.models.registry import Family, register
from scaling.ops.conv import conv_general_dilated
from scaling.scale import check_sizes, round_filters, round_repeats

# depth -> convolutions per stage (Table 1: A, B, D, E; the LRN form A-LRN and the 1x1 form C
# are left out, as torchvision leaves them).
CONFIGS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
WIDTHS = (64, 128, 256, 512, 512)
HIDDEN = 4096  # units of each of the two hidden dense layers
POOLED = 7  # the side of the map the ImageNet classifier reads (7x7 at 224)
CLASSIFIERS = ("imagenet", "cifar")


class VGG(nnx.Module):
    """Stages of 3x3 convolutions (BatchNorm optional) and 2x2 pools, then the classifier."""

    def __init__(
        self,
        stage_sizes,
        *,
        batch_norm=False,
        classifier="imagenet",
        num_classes=1000,
        width_multiplier=1.0,
        depth_multiplier=1.0,
        dropout=0.5,
        hidden=HIDDEN,
        dtype=None,
        in_channels=3,
        rngs: nnx.Rngs,
    ):
        if len(stage_sizes) != len(WIDTHS) or min(stage_sizes) < 1:
            raise ScalingError(f"need >= 1 convolution in each of 5 stages, got {stage_sizes}")
        check_sizes(
            num_classes,
            [("dropout", dropout)],
            width_multiplier=width_multiplier,
            depth_multiplier=depth_multiplier,
        )
        if not (isinstance(hidden, int) and hidden >= 1):
            raise ScalingError(f"hidden must be a positive number of units, got {hidden!r}")
        if classifier not in CLASSIFIERS:
            raise ScalingError(f"unknown classifier {classifier!r}; valid: imagenet, cifar")
        convs, norms, ends, cin = [], [], [], in_channels
        for n, width in zip(stage_sizes, WIDTHS, strict=True):
            width = round_filters(width, width_multiplier)
            for _ in range(round_repeats(n, depth_multiplier)):
                # He-normal on fan-out, as torchvision initialises VGG; biases start at zero.
                convs.append(
                    conv_layer(
                        cin,
                        width,
                        (3, 3),
                        bias=True,
                        padding="symmetric",  # 1 pixel: the paper keeps the size
                        convolution=conv_general_dilated,
                        dtype=dtype,
                        rngs=rngs,
                    )
                )
                if batch_norm:  # torch's update rate 0.1 and epsilon 1e-5
                    norms.append(
                        nnx.BatchNorm(width, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)
                    )
                cin = width
            ends.append(len(convs) - 1)
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.batch_norm, self.stage_ends = batch_norm, tuple(ends)
        self.imagenet = classifier == "imagenet"
        features = cin
        if self.imagenet:
            hidden = round_filters(hidden, width_multiplier)
            # He-normal on fan-in for the dense layers that feed ReLUs (torchvision draws
            # N(0, 0.01), which does not follow the width).
            relu_init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
            linear = dict(kernel_init=relu_init, dtype=dtype, rngs=rngs)
            self.fc1 = nnx.data(nnx.Linear(cin * POOLED * POOLED, hidden, **linear))
            self.fc2 = nnx.data(nnx.Linear(hidden, hidden, **linear))
            features = hidden
        else:
            self.fc1 = self.fc2 = nnx.data(None)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(features, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        if min(x.shape[1:3]) < 32:  # five 2x2 pools
            raise ScalingError(f"VGG needs images of at least 32x32, got {x.shape[1:3]}")
        for i, conv in enumerate(self.convs):
            x = conv(x)
            x = nnx.relu(self.norms[i](x) if self.batch_norm else x)
            if i in self.stage_ends:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        if self.imagenet:
            x = adaptive_avg_pool(x, POOLED).reshape(x.shape[0], -1)
            x = self.dropout(nnx.relu(self.fc1(x)))
            x = self.dropout(nnx.relu(self.fc2(x)))
        else:
            x = self.dropout(jnp.mean(x, axis=(1, 2)))  # 1x1 at 32x32
        return self.head(x).astype(jnp.float32)


def parse(name):
    """(depth, batch norm, CIFAR form) of `vgg{11,13,16,19}[_bn][_cifar]`."""
    m = re.fullmatch(r"vgg(\d+)(_bn)?(_cifar)?", name)
    depth = int(m[1])
    if depth not in CONFIGS:
        raise ScalingError(
            f"VGG depth must be 11, 13, 16 or 19 (configurations A, B, D, E), got {depth}"
        )
    return depth, bool(m[2]), bool(m[3])


def create(name, **kw):
    """Build `vgg{11,13,16,19}[_bn][_cifar]` (the registry's pattern)."""
    depth, bn, cifar = parse(name)
    defaults = dict(batch_norm=bn)
    if cifar:  # one dense layer, no dropout before it, CIFAR-10's classes
        defaults.update(classifier="cifar", num_classes=10, dropout=0.0)
    return VGG(CONFIGS[depth], **{**defaults, **kw})


def default_image_size(name):
    return 32 if parse(name)[2] else 224


register(
    Family(
        name="vgg",
        pattern=r"vgg\d+(_bn)?(_cifar)?",
        build=create,
        constructor=VGG,
        examples=tuple(
            f"vgg{d}{bn}{cifar}" for cifar in ("", "_cifar") for d in CONFIGS for bn in ("", "_bn")
        ),
        image_size=default_image_size,
        names="vgg{11,13,16,19}[_bn][_cifar]",
        width="width_multiplier",
        depth="depth_multiplier",
    )
)
