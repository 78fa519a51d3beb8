"""LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998, "Gradient-based learning applied to document
recognition", section II.B), in the modern form most reimplementations use.

C1: 6 maps of 5x5 convolutions; S2: 2x2/2 pooling; C3: 16 maps of 5x5 convolutions; S4: 2x2/2
pooling; C5: 120 maps of 5x5 convolutions; F6: 84 units; the output layer: one unit per class.
No convolution pads, so a 32x32 image leaves C1 28x28, S2 14x14, C3 10x10, S4 5x5 and C5 1x1,
the paper's map sizes. Where the modern form departs from the paper:

- C3 connects every S2 map to every C3 map. The paper's Table I wires each C3 map to 3, 4 or 6
  of S2's maps only (60 of the 96 pairs), to break symmetry and save connections.
- S2 and S4 are plain average (or max) pools. The paper's subsampling units have a trainable
  coefficient and bias per map.
- The activation is tanh (or ReLU). The paper's is the scaled 1.7159 tanh(2a/3).
- The output layer is a dense layer trained with softmax cross-entropy. The paper's is one
  Euclidean RBF unit per class with fixed 7x12 bitmap prototypes.

With these choices, one channel and 10 classes, the network has 61,706 parameters:
156 (C1) + 2,416 (C3) + 48,120 (C5) + 10,164 (F6) + 850 (output). The default `in_channels`
is 3, as every dataset of this library is RGB, and three input channels add 300 parameters
(62,006).

Resolution: C5 is a convolution, as in the paper, and a global average pool follows it, so a
larger input gives the same parameters (C5's map is averaged). The smallest input is 32x32,
where C5's map is 1x1 and the pool does nothing.

Width: `width_multiplier` scales C1, C3, C5 and F6 through `scaling.scale.round_filters` with
divisor 2, the largest that keeps every width of the paper (6, 16, 120, 84) at multiplier 1.
The library's usual divisor, 8, would make C1 8 maps wide.
Depth is not a scaling axis of this family (the registry's `depth=None`). Each unpadded 5x5
convolution takes 4 pixels off the map, and a 32x32 input has room for exactly three of them
between the two pools. More layers would change the paper's geometry, not scale it.
"""

import jax.numpy as jnp
from flax import nnx

from scaling import ScalingError
from scaling.models.registry import Family, register
from scaling.ops.conv import conv_general_dilated
from scaling.scale import check_sizes, round_filters

# The paper's widths: C1, C3, C5 maps and F6 units.
WIDTHS = (6, 16, 120, 84)
# 2 = gcd(6, 16, 120, 84): the coarsest rounding that leaves the paper's network unchanged.
DIVISOR = 2
ACTIVATIONS = {"tanh": jnp.tanh, "relu": nnx.relu}
POOLS = {"avg": nnx.avg_pool, "max": nnx.max_pool}
KERNEL = 5


class LeNet(nnx.Module):
    """LeNet-5: three unpadded 5x5 convolutions with pools between them, then F6 and the output."""

    def __init__(
        self,
        *,
        num_classes=10,
        width_multiplier=1.0,
        activation="tanh",
        pool="avg",
        dropout=0.0,
        dtype=None,
        in_channels=3,
        rngs: nnx.Rngs,
    ):
        check_sizes(num_classes, [("dropout", dropout)], width_multiplier=width_multiplier)
        if activation not in ACTIVATIONS:
            raise ScalingError(f"unknown activation {activation!r}; valid: tanh, relu")
        if pool not in POOLS:
            raise ScalingError(f"unknown pool {pool!r}; valid: avg, max")
        c1, c3, c5, f6 = (round_filters(c, width_multiplier, DIVISOR) for c in WIDTHS)
        # LeCun's fan-in scaling (variance 1 / fan-in), made for tanh units: the paper draws
        # weights uniformly in +-2.4 / fan-in; "Efficient BackProp" (LeCun et al. 1998) gives
        # the variance rule.
        init = nnx.initializers.lecun_normal()
        conv = dict(
            padding="VALID",  # the paper pads nothing: 32 -> 28 -> 14 -> 10 -> 5 -> 1
            kernel_init=init,
            conv_general_dilated=conv_general_dilated,
            dtype=dtype,
            rngs=rngs,
        )
        self.c1 = nnx.Conv(in_channels, c1, (KERNEL, KERNEL), **conv)
        self.c3 = nnx.Conv(c1, c3, (KERNEL, KERNEL), **conv)
        self.c5 = nnx.Conv(c3, c5, (KERNEL, KERNEL), **conv)
        self.f6 = nnx.Linear(c5, f6, kernel_init=init, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(f6, num_classes, kernel_init=init, dtype=dtype, rngs=rngs)
        self.activation, self.pool = activation, pool

    @staticmethod
    def output_side(n: int) -> int:
        """C5's map side for an n-pixel input side (< 1: too small)."""
        for _ in range(2):
            n = (n - KERNEL + 1) // 2  # a convolution, then a 2x2/2 pool
        return n - KERNEL + 1

    def __call__(self, x):
        if min(self.output_side(x.shape[1]), self.output_side(x.shape[2])) < 1:
            raise ScalingError(f"lenet5 needs images of at least 32x32, got {x.shape[1:3]}")
        act, pool = ACTIVATIONS[self.activation], POOLS[self.pool]
        x = pool(act(self.c1(x)), (2, 2), strides=(2, 2))
        x = pool(act(self.c3(x)), (2, 2), strides=(2, 2))
        x = jnp.mean(act(self.c5(x)), axis=(1, 2))  # 1x1 at 32x32
        x = act(self.f6(x))
        return self.head(self.dropout(x)).astype(jnp.float32)


def create(name, **kw):
    """Build `lenet5` (the registry's only name for the family)."""
    return LeNet(**kw)


register(
    Family(
        name="lenet",
        pattern=r"lenet5",
        build=create,
        constructor=LeNet,
        examples=("lenet5",),
        image_size=lambda name: 32,
        names="lenet5",
        width="width_multiplier",
        depth=None,
    )
)
