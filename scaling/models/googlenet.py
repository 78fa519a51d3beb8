"""GoogLeNet (Inception v1): Szegedy et al. 2015, "Going Deeper with Convolutions".

`googlenet` is torchvision's `googlenet()` (its function, tests/test_reference.py): each conv is
followed by BatchNorm (eps 1e-3) and ReLU, which the paper's network, trained before BatchNorm,
did not have; the "5x5" branch of each Inception module convolves 3x3 (pytorch/vision#906, kept
so that torchvision's weights load; `branch5_kernel=5` gives the paper's); max pools round their
output size up (Caffe's, and torchvision's `ceil_mode=True`). Input normalisation is the data
pipeline's, so torchvision's `transform_input` has no counterpart.

The auxiliary classifiers (`aux_logits=True`) are the paper's, as torchvision builds them: after
Inception 4a and 4d, an average pool to 4x4 (the paper's 5x5/3 pool at 224; torchvision's
adaptive pool, windows of 4 there, at any resolution), a 1x1 conv to 128 channels, a 1024-unit
dense layer, dropout 0.7 and a classifier. In training mode the model then returns
`(logits, (aux1, aux2))`, and the trainer adds their losses with weight 0.3 (`scaling.steps`);
in evaluation mode it returns the logits alone and the heads are not run.

Scaling: `width_multiplier` scales every conv's channels (each branch of each module, the stem,
the auxiliary heads' 128 and 1024) by `round_filters`; `depth_multiplier` scales the number of
Inception modules in each of the three stages between the pools (2, 5 and 2) by
`round_repeats`, the stage's module shapes stretched in order over the new count (depth 2: 3a,
3a, 3b, 3b; depth 0.5 keeps 4a, 4b and 4d of stage 4). The auxiliary heads stay after the last
module shaped like 4a and the last shaped like 4d (or an earlier one). No CIFAR form: the paper
defines none (the ImageNet network runs at 32x32 too, its last stage at 1x1).
"""

import jax.numpy as jnp
from flax import nnx

from scaling import ScalingError
from scaling.models.layers import ConvNorm, adaptive_avg_pool, max_pool
from scaling.models.registry import Family, register
from scaling.scale import check_sizes, round_filters, round_repeats

# The paper's Table 1, by stage (3, 4, 5: the feature maps are 28, 14 and 7 pixels at 224): each
# Inception module's (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection) output channels.
STAGES = (
    ((64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64)),  # 3a, 3b
    (
        (192, 96, 208, 16, 48, 64),  # 4a
        (160, 112, 224, 24, 64, 64),  # 4b
        (128, 128, 256, 24, 64, 64),  # 4c
        (112, 144, 288, 32, 64, 64),  # 4d
        (256, 160, 320, 32, 128, 128),  # 4e
    ),
    ((256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128)),  # 5a, 5b
)
STEM = (64, 64, 192)  # 7x7/2 conv, 1x1 conv, 3x3 conv
# The auxiliary classifiers follow these modules: (stage, index in the paper's stage) = 4a, 4d.
AUX_AFTER = ((1, 0), (1, 3))
AUX_WIDTHS = (128, 1024)  # the head's 1x1 conv and hidden dense layer
AUX_GRID = 4  # the head pools its input to 4x4


class ConvBN(nnx.Module):
    """Conv (no bias), BatchNorm, ReLU: torchvision's BasicConv2d."""

    def __init__(self, cin, cout, kernel, stride=1, *, make):
        self.conv = make.conv(cin, cout, (kernel, kernel), strides=stride)
        self.norm = make.norm(cout)

    def __call__(self, x):
        return nnx.relu(self.norm(self.conv(x)))


class Inception(nnx.Module):
    """Four branches concatenated: 1x1; 1x1 then 3x3; 1x1 then the "5x5"; 3x3/1 max pool then
    1x1."""

    def __init__(self, cin, widths, *, branch5_kernel, make):
        c1, c3r, c3, c5r, c5, cp = widths
        self.branch1 = ConvBN(cin, c1, 1, make=make)
        self.branch3_reduce = ConvBN(cin, c3r, 1, make=make)
        self.branch3 = ConvBN(c3r, c3, 3, make=make)
        self.branch5_reduce = ConvBN(cin, c5r, 1, make=make)
        self.branch5 = ConvBN(c5r, c5, branch5_kernel, make=make)
        self.pool_proj = ConvBN(cin, cp, 1, make=make)
        self.out_features = c1 + c3 + c5 + cp

    def __call__(self, x):
        return jnp.concatenate(
            [
                self.branch1(x),
                self.branch3(self.branch3_reduce(x)),
                self.branch5(self.branch5_reduce(x)),
                self.pool_proj(max_pool(x, 3, 1, 1)),
            ],
            axis=-1,
        )


class AuxHead(nnx.Module):
    """An auxiliary classifier: pool to 4x4, 1x1 conv, dense + ReLU, dropout, dense."""

    def __init__(self, cin, conv_width, hidden, num_classes, dropout, *, make, dtype, rngs):
        self.conv = ConvBN(cin, conv_width, 1, make=make)
        self.fc1 = nnx.Linear(AUX_GRID * AUX_GRID * conv_width, hidden, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = self.conv(adaptive_avg_pool(x, AUX_GRID))
        x = nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))  # flattened (h, w, c)
        return self.fc2(self.dropout(x)).astype(jnp.float32)


def layout(depth_multiplier):
    """(per stage, the index in `STAGES` of the module shape each Inception module takes; and
    the (stage, module) each auxiliary head follows). A stage of n modules gets
    round_repeats(n * depth) of them, the n shapes stretched over them in order; a head follows
    the last module shaped like its paper module (4a, 4d) or, where depth < 1 dropped that
    shape, like an earlier one."""
    picks = []
    for shapes in STAGES:
        n = len(shapes)
        count = round_repeats(n, depth_multiplier)
        picks.append([j * n // count for j in range(count)])
    places = tuple(
        (s, max(j for j, pick in enumerate(picks[s]) if pick <= index)) for s, index in AUX_AFTER
    )
    return picks, places


class GoogLeNet(nnx.Module):
    """Stem (7x7/2 conv, pool, 1x1 and 3x3 convs, pool), three stages of Inception modules with
    a pool between them, global average pool, dropout, classifier; optionally two auxiliary
    classifiers, run in training mode only."""

    def __init__(
        self,
        *,
        num_classes=1000,
        aux_logits=False,
        width_multiplier=1.0,
        depth_multiplier=1.0,
        dropout=0.2,  # torchvision's (the paper's 0.4 was without BatchNorm)
        aux_dropout=0.7,  # the paper's
        branch5_kernel=3,  # torchvision's; the paper's is 5
        dtype=None,
        in_channels=3,
        rngs: nnx.Rngs,
    ):
        check_sizes(
            num_classes,
            [("dropout", dropout), ("aux_dropout", aux_dropout)],
            width_multiplier=width_multiplier,
            depth_multiplier=depth_multiplier,
        )
        if branch5_kernel not in (3, 5):
            raise ScalingError(f"branch5_kernel must be 3 or 5, got {branch5_kernel}")
        # BatchNorm eps 1e-3 as torchvision's BasicConv2d (the TensorFlow port's).
        make = ConvNorm(dtype, rngs, epsilon=1e-3)
        scale = lambda c: round_filters(c, width_multiplier)  # noqa: E731
        stem = [scale(c) for c in STEM]
        self.conv1 = ConvBN(in_channels, stem[0], 7, 2, make=make)
        self.conv2 = ConvBN(stem[0], stem[1], 1, make=make)
        self.conv3 = ConvBN(stem[1], stem[2], 3, make=make)

        picks, places = layout(depth_multiplier)
        cin, stages, widths = stem[2], [], {}
        for s, shapes in enumerate(STAGES):
            modules = []
            for j, pick in enumerate(picks[s]):
                branches = tuple(scale(c) for c in shapes[pick])
                modules.append(Inception(cin, branches, branch5_kernel=branch5_kernel, make=make))
                cin = widths[s, j] = modules[-1].out_features
            stages.append(nnx.List(modules))
        self.stages = nnx.List(stages)
        self.aux_logits = aux_logits
        self.aux_places = places if aux_logits else ()
        conv_width, hidden = (scale(c) for c in AUX_WIDTHS)
        heads = [
            AuxHead(
                widths[place],
                conv_width,
                hidden,
                num_classes,
                aux_dropout,
                make=make,
                dtype=dtype,
                rngs=rngs,
            )
            for place in self.aux_places
        ]
        self.aux = nnx.List(heads)
        # Training mode or not, set with Dropout's by nnx's `train()` and `eval()`.
        self.deterministic = False
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(cin, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = max_pool(self.conv1(x), 3, 2, ceil_mode=True)
        x = max_pool(self.conv3(self.conv2(x)), 3, 2, ceil_mode=True)
        run_aux = self.aux_logits and not self.deterministic
        aux = [None] * len(self.aux_places)
        for s, stage in enumerate(self.stages):
            if s:  # 3x3/2 before stage 4, 2x2/2 before stage 5 (torchvision's; Caffe's is 3x3)
                x = max_pool(x, 3 if s == 1 else 2, 2, ceil_mode=True)
            for j, module in enumerate(stage):
                x = module(x)
                for k, place in enumerate(self.aux_places):
                    if run_aux and place == (s, j):
                        aux[k] = self.aux[k](x)
        x = jnp.mean(x, axis=(1, 2))
        logits = self.head(self.dropout(x)).astype(jnp.float32)
        return (logits, tuple(aux)) if run_aux else logits


def create(name, **kw):
    """Build `googlenet` (the registry's pattern)."""
    return GoogLeNet(**kw)


register(
    Family(
        name="googlenet",
        pattern=r"googlenet",
        build=create,
        constructor=GoogLeNet,
        examples=("googlenet",),
        image_size=lambda name: 224,
        names="googlenet",
        width="width_multiplier",
        depth="depth_multiplier",
    )
)
