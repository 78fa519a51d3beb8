"""AlexNet (Krizhevsky, Sutskever & Hinton 2012) and ZFNet (Zeiler & Fergus 2013): five
convolutions, three overlapping 3x3/2 max pools, and a classifier of two 4096-unit dense layers.

- `alexnet` is torchvision's `alexnet()`: convolutions of 64, 192, 384, 256 and 256 channels
  (11x11/4 padded 2, 5x5 padded 2, then 3x3 padded 1), no normalisation, an adaptive average
  pool to 6x6, and dropout before each hidden dense layer. With 1000 classes it has 61,100,840
  parameters, and it computes torchvision's function (tests/test_reference.py).
- `alexnet_original` is the network of the paper (section 3, Figure 2), on one device. It has
  96, 256, 384, 384 and 256 channels. Convolutions 2, 4 and 5 are split in two groups
  (`feature_group_count=2`), as the paper's two GPUs held them: each half of a layer sees only
  the half of the previous layer on its own GPU, while convolution 3 and the dense layers see
  both. Local response normalisation (section 3.3: k=2, n=5, alpha=1e-4, beta=0.75) follows
  the ReLUs of convolutions 1 and 2, before their pools. Dropout 0.5 acts on the outputs of the
  two hidden dense layers. With 1000 classes it has 60,965,224 parameters:
  34,944 + 307,456 + 885,120 + 663,936 + 442,624 (convolutions) + 37,752,832 + 16,781,312 +
  4,097,000 (dense). The paper's "224x224" input gives its 55x55 first map only with 2 pixels
  of padding (or a 227 crop, as Caffe's), so conv1 pads 2 here, as torchvision's does.
- `zfnet` is Zeiler & Fergus's network (their Figure 3). Its conv1 is 7x7/2 with 96 channels
  and its conv2 5x5/2 with 256, followed by 384, 384 and 256 channels of 3x3 convolutions.
  Nothing is grouped, as it was trained on one GPU, and the pooled maps of layers 1 and 2 are
  normalised across channels (AlexNet's LRN, moved after the pool). The figure's map sizes,
  224 -> 110 -> 55 -> 26 -> 13 -> 13 -> 13 -> 6, fix the padding and pooling: conv1 pads 1
  ((224 + 2 - 7) // 2 + 1 = 110), conv2 pads nothing ((55 - 5) // 2 + 1 = 26), and the pools
  round their output size up, as Caffe's do (110 -> 55 and 26 -> 13, where rounding down
  gives 54 and 12; 13 -> 6 either way). The last pool leaves 6x6x256 = 9216 inputs to the
  first dense layer, which gives 62,357,608 parameters with 1000 classes.

Every form ends in an adaptive average pool to 6x6 (torchvision's), which is the identity at
224, so any input from 63x63 upward (the smallest that leaves the last pool a map) gives the
same parameters; a smaller one is refused with that size named.

Scaling:
- `width_multiplier` scales every convolution and both hidden dense layers through
  `scaling.scale.round_filters` (multiples of 8, so the two groups stay equal).
- `depth_multiplier` scales the third stage, the three 3x3 convolutions at 13x13, through
  `round_repeats(3, depth_multiplier)`. This is the only place where these networks stack
  convolutions at one resolution: the first two stages are one convolution each. The stage's
  first convolution keeps conv3's width, the last keeps conv5's, and the added middle ones are
  copies of conv4 (width and grouping). With a single convolution, it has conv5's width and
  conv3's full connectivity.
- `hidden` (4096) is the width of fc6 and fc7 before the width multiplier (the reference test
  narrows them to 128, and torchvision's to match, to draw 4M weights instead of 61M).
"""

import dataclasses

import jax.numpy as jnp
from flax import nnx

from scaling import ScalingError
from scaling.models.layers import adaptive_avg_pool, conv_init, local_response_norm, max_pool
from scaling.models.registry import Family, register
from scaling.ops.conv import conv_general_dilated
from scaling.scale import check_sizes, round_filters, round_repeats


@dataclasses.dataclass(frozen=True)
class Variant:
    widths: tuple  # channels of conv1 ... conv5
    conv1: tuple  # (kernel, stride, padding)
    conv2: tuple
    groups: tuple  # feature groups of conv1 ... conv5
    lrn: bool  # local response normalisation after conv1 and conv2
    lrn_after_pool: bool  # ZFNet normalises the pooled maps, AlexNet the ones before pooling
    ceil_pool: bool  # pools round their output size up, as Caffe's (ZFNet's sizes need it)
    dropout_before: bool  # torchvision drops the inputs of fc6/fc7, the papers their outputs


VARIANTS = {
    "alexnet": Variant(
        widths=(64, 192, 384, 256, 256),
        conv1=(11, 4, 2),
        conv2=(5, 1, 2),
        groups=(1, 1, 1, 1, 1),
        lrn=False,
        lrn_after_pool=False,
        ceil_pool=False,
        dropout_before=True,
    ),
    "alexnet_original": Variant(
        widths=(96, 256, 384, 384, 256),
        conv1=(11, 4, 2),
        conv2=(5, 1, 2),
        groups=(1, 2, 1, 2, 2),  # conv3 and the dense layers cross between the two GPUs
        lrn=True,
        lrn_after_pool=False,
        ceil_pool=False,
        dropout_before=False,
    ),
    "zfnet": Variant(
        widths=(96, 256, 384, 384, 256),
        conv1=(7, 2, 1),
        conv2=(5, 2, 0),
        groups=(1, 1, 1, 1, 1),
        lrn=True,
        lrn_after_pool=True,
        ceil_pool=True,
        dropout_before=False,
    ),
}
HIDDEN = 4096  # units of each of the two hidden dense layers
POOLED = 6  # the side of the map the classifier reads (6x6 at 224 in all three papers)
# The paper's LRN constants (section 3.3), found on its validation set.
LRN = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)


class AlexNet(nnx.Module):
    """conv1, pool, conv2, pool, a stage of 3x3 convs, pool, adaptive 6x6 pool, fc6, fc7, head."""

    def __init__(
        self,
        variant="alexnet",
        *,
        num_classes=1000,
        width_multiplier=1.0,
        depth_multiplier=1.0,
        dropout=0.5,
        hidden=HIDDEN,
        lrn=None,
        dtype=None,
        in_channels=3,
        rngs: nnx.Rngs,
    ):
        if variant not in VARIANTS:
            raise ScalingError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
        check_sizes(
            num_classes,
            [("dropout", dropout)],
            width_multiplier=width_multiplier,
            depth_multiplier=depth_multiplier,
        )
        if not (isinstance(hidden, int) and hidden >= 1):
            raise ScalingError(f"hidden must be a positive number of units, got {hidden!r}")
        v = self.variant = VARIANTS[variant]
        self.name = variant
        self.lrn = v.lrn if lrn is None else bool(lrn)
        w1, w2, w3, w4, w5 = (round_filters(c, width_multiplier) for c in v.widths)
        g1, g2, g3, g4, g5 = v.groups
        n = round_repeats(3, depth_multiplier)
        third = [(w5, g3)] if n == 1 else [(w3, g3), *[(w4, g4)] * (n - 2), (w5, g5)]
        specs = [(w1, g1, v.conv1), (w2, g2, v.conv2)] + [(w, g, (3, 1, 1)) for w, g in third]
        convs, cin = [], in_channels
        for width, groups, (kernel, stride, pad) in specs:
            convs.append(
                nnx.Conv(
                    cin,
                    width,
                    (kernel, kernel),
                    strides=stride,
                    padding=((pad, pad), (pad, pad)),
                    feature_group_count=groups,
                    # He-normal on fan-out, the library's rule for ReLU convolutions. The
                    # paper's N(0, 0.01) with unit biases does not scale with the width.
                    kernel_init=conv_init,
                    conv_general_dilated=conv_general_dilated,
                    dtype=dtype,
                    rngs=rngs,
                )
            )
            cin = width
        self.convs = nnx.List(convs)
        hidden = round_filters(hidden, width_multiplier)
        # He-normal on fan-in for the dense layers that feed ReLUs.
        relu_init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
        linear = dict(dtype=dtype, rngs=rngs)
        self.fc6 = nnx.Linear(cin * POOLED * POOLED, hidden, kernel_init=relu_init, **linear)
        self.fc7 = nnx.Linear(hidden, hidden, kernel_init=relu_init, **linear)
        self.head = nnx.Linear(hidden, num_classes, **linear)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def output_side(self, n: int) -> int:
        """The side of the last pool's map for an n-pixel input side (< 1: too small)."""
        v = self.variant
        for conv in (v.conv1, v.conv2, None):  # None: the 3x3 stage, which keeps the size
            if conv is not None:
                kernel, stride, pad = conv
                n = (n + 2 * pad - kernel) // stride + 1 if n + 2 * pad >= kernel else 0
            if n < 3:  # a 3x3 pool needs 3 pixels
                return 0
            n = -(-(n - 3) // 2) + 1 if v.ceil_pool else (n - 3) // 2 + 1
        return n

    def min_image_size(self) -> int:
        return next(n for n in range(1, 1024) if self.output_side(n) >= 1)

    def __call__(self, x):
        if min(self.output_side(x.shape[1]), self.output_side(x.shape[2])) < 1:
            m = self.min_image_size()
            raise ScalingError(f"{self.name} needs images of at least {m}x{m}, got {x.shape[1:3]}")
        v = self.variant
        for i, conv in enumerate(self.convs):
            x = nnx.relu(conv(x))
            norm = self.lrn and i < 2
            if norm and not v.lrn_after_pool:
                x = local_response_norm(x, **LRN)
            if i < 2 or i == len(self.convs) - 1:  # after conv1, conv2 and the third stage
                x = max_pool(x, 3, 2, ceil_mode=v.ceil_pool)
            if norm and v.lrn_after_pool:
                x = local_response_norm(x, **LRN)
        x = adaptive_avg_pool(x, POOLED).reshape(x.shape[0], -1)
        for fc in (self.fc6, self.fc7):
            if v.dropout_before:
                x = nnx.relu(fc(self.dropout(x)))
            else:
                x = self.dropout(nnx.relu(fc(x)))
        return self.head(x).astype(jnp.float32)


def create(name, **kw):
    """Build `alexnet`, `alexnet_original` or `zfnet` (the registry's names)."""
    return AlexNet(name, **kw)


# One family: ZFNet is Zeiler & Fergus's revision of AlexNet, built by the same module.
register(
    Family(
        name="alexnet",
        pattern=r"alexnet(_original)?|zfnet",
        build=create,
        constructor=AlexNet,
        examples=("alexnet", "alexnet_original", "zfnet"),
        image_size=lambda name: 224,
        names="alexnet (torchvision's), alexnet_original (Krizhevsky et al. 2012), zfnet",
        width="width_multiplier",
        depth="depth_multiplier",
    )
)
