"""CoAtNet (Dai et al. 2021): convolution and relative attention in one five-stage network.

S0 is a conv stem at 1/2 resolution (`depths[0]` 3x3 convs, the first strided); S1-S4 run at
1/4 ... 1/32, each either `C` (MBConv) or `T` (transformer block with relative attention), set by
`layout` for S1-S4 (S1 is always C): `CCCC`, `CCCT`, `CCTT` (the paper's CoAtNet), `CTTT`. The
first block of every stage halves the resolution. `VIT_REL` is the paper's all-attention
baseline: a patch-16 convolution, then `depths[0]` transformer blocks with relative attention.

- MBConv (pre-norm): x <- Proj(Pool(x)) + Conv1x1(SE(DWConv3x3(Conv1x1(BN(x))))), BatchNorm +
  GELU after the first two convs, expansion 4; a stage's first block strides its depthwise conv.
- T block: x <- Proj(Pool(x)) + Attention(Pool(LN(x))); x <- x + FFN(LN(x)), FFN expansion 4.
  Attention over the stage's whole H x W map, head size 32, plus a learned bias per head and
  relative offset: a (2H-1) x (2W-1) table gathered by offset (`relative_bias`).
- After S4: global average pool, LayerNorm, a dense + tanh pre-logits layer, dropout, head.

Choices the paper leaves open, taken as in timm's paper configs (`coatnet_0_224` ...; timm says
they follow the authors' later MaxViT code release):
- MBConv expansion is on the block's output channels (hidden = 4 x out, also in the strided
  first block of a stage);
- SE squeezes to 0.25 x the block's output channels (1/16 of the expanded width), SiLU inside;
- the T block's first-of-stage attention widens the tokens in its qkv projection (cin -> cout);
- the pre-logits layer (`pre_logits=True`) of the last width: without it every size falls
  0.6-2.4M short of the paper's counts, with it they land within 1%;
- "Pool" is a 2x2 average pool (ceil mode), "Proj" a 1x1 conv with bias;
- a downsampling MBConv strides its depthwise 3x3 conv (`stride_on='depthwise'`), convolutions
  pad symmetrically (`padding='symmetric'`), LayerNorms use epsilon 1e-6 and BatchNorms 1e-5.
With these defaults `coatnet_0` computes timm's `coatnet_0_224` (tests/test_reference.py).
`stride_on='expansion'` strides the 1x1 expansion instead: the paper's literal Eq. 5, whose
multiply-adds it matches (counts and MACs of every size: docs/models.md).

The relative-bias tables are sized by each stage's feature map, so the network is built for one
resolution (`image_size`); `resize(model, image_size)` returns it at another, each table
resized bilinearly (the paper's fine-tuning at higher resolution). `small_images=True` drops the
stem's stride (and uses patch 8 for VIT_REL), so 32x32 inputs give T stages 8x8 / 4x4 / 2x2
tokens instead of 4x4 / 2x2 / 1x1. `coatnet_sizing.match_params` picks widths so that layouts
can be compared at a matched parameter count.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling import ScalingError
from scaling.models.layers import (
    PADDINGS,
    DepthwiseConv,
    Mlp,
    SelfAttention,
    SqueezeExcite,
    conv_init,
    conv_layer,
    dense_init,
    relative_bias,
    resize_bias_table,
)
from scaling.models.registry import Family, register
from scaling.ops.activations import gelu
from scaling.ops.conv import conv_general_dilated_pointwise
from scaling.scale import round_filters, round_repeats, round_resolution

# name -> (blocks per stage L, channels D) for S0..S4, Table 3 of the paper.
SIZES = {
    0: ((2, 2, 3, 5, 2), (64, 96, 192, 384, 768)),
    1: ((2, 2, 6, 14, 2), (64, 96, 192, 384, 768)),
    2: ((2, 2, 6, 14, 2), (128, 128, 256, 512, 1024)),
    3: ((2, 2, 6, 14, 2), (192, 192, 384, 768, 1536)),
    4: ((2, 2, 12, 28, 2), (192, 192, 384, 768, 1536)),
}
LAYOUTS = ("CCCC", "CCCT", "CCTT", "CTTT", "VIT_REL")
STRIDE_ON = ("depthwise", "expansion")  # which conv of a downsampling MBConv strides
VIT_REL_DEFAULTS = ((12,), (384,))  # ViT-S sized when no depths/dims are given

# The constructor's settings that reach the blocks (`make_block`'s `settings`).
BLOCK_SETTINGS = ("num_classes", "head_size", "expansion", "se_ratio", "stride_on", "padding",
                  "dropout", "attention_dropout", "stochastic_depth")  # fmt: skip
LN_EPSILON = 1e-6  # timm's coatnet_0_224 (the MaxViT code's); BatchNorm's is 1e-5


def _pool(x):
    """2x2 average pool, stride 2; odd sizes round up, like a stride-2 'SAME' convolution."""
    return nnx.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME", count_include_pad=False)


def _batch_norm(channels, dtype, rngs):
    return nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)


def _conv(cin, cout, kernel, *, rngs, dtype, stride=1, bias=False, padding="symmetric"):
    """A He-initialised kernel x kernel conv; 1x1 ones run as matrix products on CPU."""
    return conv_layer(
        cin,
        cout,
        (kernel, kernel),
        stride,
        bias=bias,
        padding=padding,
        convolution=conv_general_dilated_pointwise,
        dtype=dtype,
        rngs=rngs,
    )


class MBConv(nnx.Module):
    """Pre-norm inverted bottleneck with squeeze-excitation; the depthwise conv strides (or the
    first 1x1 conv, `stride_on='expansion'`)."""

    def __init__(self, cin, cout, stride, *, expansion, se_ratio, stride_on, padding,
                 stochastic_depth, dtype, rngs):  # fmt: skip
        hidden = expansion * cout  # expansion on the output channels (see the module docstring)
        self.stride = stride
        on_expansion = stride_on == "expansion"
        self.shortcut = nnx.data(
            _conv(cin, cout, 1, bias=True, dtype=dtype, rngs=rngs)
            if stride > 1 or cin != cout
            else None
        )
        self.norm0 = _batch_norm(cin, dtype, rngs)
        self.conv1 = _conv(
            cin, hidden, 1, stride=stride if on_expansion else 1, dtype=dtype, rngs=rngs
        )
        self.norm1 = _batch_norm(hidden, dtype, rngs)
        # The fastest form on this backend (oneDNN's or shifted slices on CPU: 5-10x XLA's).
        self.conv2 = DepthwiseConv(
            hidden,
            3,
            1 if on_expansion else stride,
            impl="shift",
            padding=padding,
            kernel_init=conv_init,
            dtype=dtype,
            rngs=rngs,
        )
        self.norm2 = _batch_norm(hidden, dtype, rngs)
        self.se = SqueezeExcite(hidden, max(1, int(se_ratio * cout)), dtype=dtype, rngs=rngs)
        self.conv3 = _conv(hidden, cout, 1, bias=True, dtype=dtype, rngs=rngs)
        self.drop_path = nnx.Dropout(stochastic_depth, broadcast_dims=(1, 2, 3), rngs=rngs)

    def __call__(self, x):
        shortcut = _pool(x) if self.stride > 1 else x
        if self.shortcut is not None:
            shortcut = self.shortcut(shortcut)
        y = gelu(self.norm1(self.conv1(self.norm0(x))))
        y = self.se(gelu(self.norm2(self.conv2(y))))
        return shortcut + self.drop_path(self.conv3(y))


class TransformerBlock(nnx.Module):
    """Pre-norm transformer block with relative attention over an H x W map (NHWC in and out)."""

    def __init__(
        self, cin, cout, stride, grid, *, head_size, stochastic_depth, dropout, dtype, rngs
    ):
        if cout % head_size:
            raise ScalingError(
                f"transformer stage width {cout} is not divisible by head_size {head_size}"
            )
        heads = cout // head_size
        self.stride, self.grid = stride, tuple(grid)
        self.shortcut = nnx.data(
            _conv(cin, cout, 1, bias=True, dtype=dtype, rngs=rngs)
            if stride > 1 or cin != cout
            else None
        )
        self.norm1 = nnx.LayerNorm(cin, epsilon=LN_EPSILON, dtype=dtype, rngs=rngs)
        self.attn = SelfAttention(cin, cout, heads, dropout=dropout, dtype=dtype, rngs=rngs)
        table_shape = (2 * grid[0] - 1, 2 * grid[1] - 1, heads)
        init = nnx.initializers.truncated_normal(0.02)
        self.rel_bias = nnx.Param(init(rngs.params(), table_shape))
        self.norm2 = nnx.LayerNorm(cout, epsilon=LN_EPSILON, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(cout, 4 * cout, dropout=dropout, dtype=dtype, rngs=rngs)
        self.drop_path = nnx.Dropout(stochastic_depth, broadcast_dims=(1, 2), rngs=rngs)

    def __call__(self, x):
        shortcut, y = x, self.norm1(x)
        if self.stride > 1:
            shortcut, y = _pool(shortcut), _pool(y)
        if self.shortcut is not None:
            shortcut = self.shortcut(shortcut)
        b, h, w, c = y.shape
        if (h, w) != self.grid:
            raise ScalingError(
                f"a CoAtNet transformer stage built for a {self.grid[0]}x{self.grid[1]} map got "
                f"{h}x{w}: build the model with the input's image_size or use "
                "scaling.models.coatnet.resize"
            )
        bias = relative_bias(self.rel_bias[...], self.grid)
        y = self.attn(y.reshape(b, h * w, c), bias=bias)
        x = shortcut.reshape(b, h * w, -1) + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.reshape(b, h, w, -1)


def _positive_ints(value, length, what):
    if (
        not isinstance(value, (tuple, list))
        or len(value) != length
        or not all(isinstance(v, int) and v >= 1 for v in value)
    ):
        raise ScalingError(
            f"CoAtNet {what} must be a tuple of {length} positive integers, got {value!r}"
        )
    return tuple(value)


def check_layout(layout):
    if layout == "VIT_REL":
        return layout
    if not isinstance(layout, str) or len(layout) != 4 or set(layout) - {"C", "T"}:
        raise ScalingError(
            f"CoAtNet layout must be 4 letters C/T for S1-S4 or VIT_REL, got {layout!r}; "
            f"e.g. {', '.join(LAYOUTS)}"
        )
    if layout[0] != "C":
        raise ScalingError(f"CoAtNet layout {layout!r}: S1 is always C (MBConv); e.g. CCTT")
    return layout


def feature_sizes(image_size, small_images=False):
    """Side of the feature map after S0, S1, S2, S3, S4 (ceil division at every stride)."""
    sizes = [image_size if small_images else -(-image_size // 2)]
    for _ in range(4):
        sizes.append(-(-sizes[-1] // 2))
    return sizes


def patch_size(small_images):
    """VIT_REL's patch: 16 (1/16 resolution, as S3), or 8 for small images."""
    return 8 if small_images else 16


def plan(layout, depths, dims, image_size, small_images, settings):
    """Validate a CoAtNet's shape; return (depths, dims, blocks), each block as
    (kind, cin, cout, stride, grid side)."""
    layout = check_layout(layout)
    vit_rel = layout == "VIT_REL"
    n = 1 if vit_rel else 5
    default_depths, default_dims = VIT_REL_DEFAULTS if vit_rel else SIZES[0]
    what = "for VIT_REL (one stage)" if vit_rel else "for S0-S4"
    depths = _positive_ints(default_depths if depths is None else depths, n, f"depths {what}")
    dims = _positive_ints(default_dims if dims is None else dims, n, f"dims {what}")
    for key in ("image_size", "num_classes", "head_size", "expansion"):
        value = image_size if key == "image_size" else settings[key]
        if not isinstance(value, int) or value < 1:
            raise ScalingError(f"CoAtNet {key} must be a positive integer, got {value!r}")
    if not 0 < settings["se_ratio"] <= 1:
        raise ScalingError(f"se_ratio must be in (0, 1], got {settings['se_ratio']}")
    if settings["stride_on"] not in STRIDE_ON:
        raise ScalingError(
            f"unknown stride_on {settings['stride_on']!r}; valid: {', '.join(STRIDE_ON)}"
        )
    if settings["padding"] not in PADDINGS:
        raise ScalingError(f"unknown padding {settings['padding']!r}; valid: {', '.join(PADDINGS)}")
    for key in ("dropout", "attention_dropout", "stochastic_depth"):
        if not 0 <= settings[key] < 1:
            raise ScalingError(f"{key} must be in [0, 1), got {settings[key]}")
    if vit_rel:
        patch = patch_size(small_images)
        if image_size % patch:
            raise ScalingError(
                f"image_size {image_size} is not divisible by VIT_REL's patch size {patch}; "
                f"valid sizes are multiples of {patch}"
            )
        plan = [("T", dims[0], 1, image_size // patch)] * depths[0]
    else:
        sizes = feature_sizes(image_size, small_images)
        stages = zip(layout, dims[1:], depths[1:], sizes[1:], strict=True)
        plan = [
            (kind, dim, 2 if j == 0 else 1, size)
            for kind, dim, depth, size in stages
            for j in range(depth)
        ]
    cins = [dims[0]] + [cout for _, cout, _, _ in plan[:-1]]
    blocks = [(k, cin, cout, s, g) for cin, (k, cout, s, g) in zip(cins, plan, strict=True)]
    for kind, _, cout, _, _ in blocks:
        if kind == "T" and cout % settings["head_size"]:
            raise ScalingError(
                f"transformer stage width {cout} is not divisible by head_size "
                f"{settings['head_size']}"
            )
    return depths, dims, blocks


def make_block(kind, cin, cout, stride, grid, *, rate, settings, dtype, rngs):
    if kind == "C":
        return MBConv(cin, cout, stride, expansion=settings["expansion"],
                      se_ratio=settings["se_ratio"], stride_on=settings["stride_on"],
                      padding=settings["padding"], stochastic_depth=rate, dtype=dtype,
                      rngs=rngs)  # fmt: skip
    return TransformerBlock(cin, cout, stride, (grid, grid), head_size=settings["head_size"],
                            stochastic_depth=rate, dropout=settings["attention_dropout"],
                            dtype=dtype, rngs=rngs)  # fmt: skip


class Stem(nnx.Module):
    """S0: `layers` 3x3 convs (the first strided unless small_images), BN + GELU between them;
    the first block's pre-norm follows the last. VIT_REL: one patch x patch conv, stride patch."""

    def __init__(self, cin, width, layers, *, vit_rel, small_images, padding, dtype, rngs):
        if vit_rel:
            patch = patch_size(small_images)
            convs = [
                _conv(
                    cin, width, patch, stride=patch, bias=True, padding="valid", dtype=dtype,
                    rngs=rngs,
                )
            ]  # fmt: skip
        else:
            convs = [
                _conv(
                    c, width, 3, stride=1 if i or small_images else 2, padding=padding,
                    dtype=dtype, rngs=rngs,
                )
                for i, c in enumerate([cin] + [width] * (layers - 1))
            ]  # fmt: skip
        self.convs = nnx.List(convs)
        self.norms = nnx.List([_batch_norm(width, dtype, rngs) for _ in convs[1:]])

    def __call__(self, x):
        x = self.convs[0](x)
        for conv, norm in zip(self.convs[1:], self.norms, strict=True):
            x = conv(gelu(norm(x)))
        return x


class CoAtNet(nnx.Module):
    """CoAtNet with any layout, depths and widths, for `image_size` x `image_size` inputs."""

    def __init__(
        self,
        *,
        layout="CCTT",
        depths=None,
        dims=None,
        image_size=224,
        small_images=False,
        num_classes=1000,
        head_size=32,
        expansion=4,
        se_ratio=0.25,
        stride_on="depthwise",
        padding="symmetric",
        dropout=0.0,
        attention_dropout=0.0,
        stochastic_depth=0.0,
        pre_logits=True,
        dtype=None,
        in_channels=3,
        rngs: nnx.Rngs,
    ):
        # The settings every block reads, by name (coatnet_sizing.count_params reads the same).
        settings = {name: value for name, value in locals().items() if name in BLOCK_SETTINGS}
        depths, dims, blocks = plan(layout, depths, dims, image_size, small_images, settings)
        self.layout, self.image_size, self.small_images = layout, image_size, small_images
        self.stem = Stem(
            in_channels,
            dims[0],
            depths[0],
            vit_rel=layout == "VIT_REL",
            small_images=small_images,
            padding=padding,
            dtype=dtype,
            rngs=rngs,
        )
        # Stochastic depth grows linearly from 0 to `stochastic_depth` over the blocks.
        rates = np.linspace(0, stochastic_depth, len(blocks)) if len(blocks) > 1 else [0.0]
        self.blocks = nnx.List(
            [
                make_block(*b, rate=float(r), settings=settings, dtype=dtype, rngs=rngs)
                for b, r in zip(blocks, rates, strict=True)
            ]
        )
        width = blocks[-1][2]
        self.norm = nnx.LayerNorm(width, epsilon=LN_EPSILON, dtype=dtype, rngs=rngs)
        # A dense + tanh "pre-logits" layer of the final width, as in timm's paper configs; the
        # paper's parameter counts match with it (within 1%), not without (0.6-2.4M short).
        self.pre_logits = nnx.data(
            nnx.Linear(width, width, kernel_init=dense_init, dtype=dtype, rngs=rngs)
            if pre_logits
            else None
        )
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        if x.shape[1] != self.image_size or x.shape[2] != self.image_size:
            raise ScalingError(
                f"this CoAtNet was built for {self.image_size}x{self.image_size} images, got "
                f"{x.shape[1]}x{x.shape[2]}; build it with image_size={x.shape[1]} or use "
                "scaling.models.coatnet.resize"
            )
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm(jnp.mean(x, axis=(1, 2)))
        if self.pre_logits is not None:
            x = jnp.tanh(self.pre_logits(x))
        return self.head(self.dropout(x)).astype(jnp.float32)


def stage_grids(model: CoAtNet, image_size):
    """The attention grid of every transformer block of `model` at `image_size`."""
    if model.layout == "VIT_REL":
        patch = patch_size(model.small_images)
        if image_size % patch:
            raise ScalingError(
                f"image_size {image_size} is not divisible by VIT_REL's patch size {patch}"
            )
        return [image_size // patch] * len(model.blocks)
    sizes = feature_sizes(image_size, model.small_images)
    grids, stage = [], 0
    for block in model.blocks:
        stage += block.stride > 1  # every stage starts with its one strided block
        grids.append(sizes[stage])
    return grids


def resize(model: CoAtNet, image_size: int) -> CoAtNet:
    """A copy of a (trained) CoAtNet for `image_size` inputs, relative-bias tables resized.

    Every other parameter is copied unchanged. To resize a saved parameter state, merge it into
    a model first (`nnx.update(models.create(name, image_size=old), params)`).
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise ScalingError(f"image_size must be a positive integer, got {image_size!r}")
    new = nnx.clone(model)
    for block, size in zip(new.blocks, stage_grids(model, image_size), strict=True):
        if isinstance(block, TransformerBlock):
            block.rel_bias = nnx.Param(resize_bias_table(block.rel_bias[...], (size, size)))
            block.grid = (size, size)
    new.image_size = image_size
    return new


def create(name, *, image_size=None, **settings):
    """Build `coatnet_{0..4}`, or `coatnet` with any layout, depths and dims."""
    if name != "coatnet":
        if (size := int(name.removeprefix("coatnet_"))) not in SIZES:
            raise ScalingError(f"unknown CoAtNet size {name}; valid: coatnet_0 ... coatnet_4")
        settings = {"depths": SIZES[size][0], "dims": SIZES[size][1], **settings}
    return CoAtNet(image_size=224 if image_size is None else image_size, **settings)


def scale(name, settings, image_size, c):
    """CoAtNet grown by the multipliers `c` (scaling.scale.apply): every stage's width times
    c.width (a multiple of 8, of head_size in transformer stages), the blocks of S1-S4 times
    c.depth rounded up (the two-layer stem S0 stays), the image side rounded (to a multiple of
    the patch for VIT_REL, whose one stage is all of it)."""
    layout = settings.get("layout", "CCTT")
    if name != "coatnet":
        depths, dims = SIZES.get(int(name.removeprefix("coatnet_")), SIZES[0])
    else:
        depths, dims = VIT_REL_DEFAULTS if layout == "VIT_REL" else SIZES[0]
    depths, dims = settings.get("depths", depths), settings.get("dims", dims)
    head_size, small = settings.get("head_size", 32), settings.get("small_images", False)
    if layout == "VIT_REL":
        depths = [round_repeats(depths[0], c.depth)]
        dims = [round_filters(dims[0], c.width, divisor=head_size)]
        return settings | dict(depths=depths, dims=dims), round_resolution(
            image_size, c.resolution, divisor=patch_size(small)
        )
    kinds = "C" + layout  # the stem is convolutional
    dims = [
        round_filters(d, c.width, head_size if k == "T" else 8)
        for k, d in zip(kinds, dims, strict=True)
    ]
    depths = [depths[0], *(round_repeats(d, c.depth) for d in depths[1:])]
    return settings | dict(depths=depths, dims=dims), round_resolution(image_size, c.resolution)


register(
    Family(
        name="coatnet",
        pattern=r"coatnet(_\d+)?",
        build=create,
        constructor=CoAtNet,
        examples=("coatnet_0", "coatnet_1", "coatnet_2", "coatnet_3", "coatnet_4"),
        image_size=lambda name: 224,
        names="coatnet_{0,1,2,3,4}, coatnet (settings layout, depths, dims)",
        resolution_dependent=True,  # relative-bias tables sized by each stage's map
        scale=scale,
    )
)
