"""CoAtNet (Dai et al. 2021): convolution and relative attention in one five-stage network.

S0 is a conv stem at 1/2 resolution (`depths[0]` 3x3 convs, the first strided); S1-S4 run at
1/4 ... 1/32, each either `C` (MBConv) or `T` (transformer block with relative attention), set by
`layout` for S1-S4 (S1 is always C): `CCCC`, `CCCT`, `CCTT` (the paper's CoAtNet), `CTTT`. The
first block of every stage halves the resolution. `VIT_REL` is the paper's all-attention
baseline: a patch-16 convolution, then `depths[0]` transformer blocks with relative attention.

- MBConv (pre-norm): x <- Proj(Pool(x)) + Conv1x1(SE(DWConv3x3(Conv1x1(BN(x), stride 2)))),
  BatchNorm + GELU after the first two convs, expansion 4. The paper strides the first 1x1 conv.
- T block: x <- Proj(Pool(x)) + Attention(Pool(LN(x))); x <- x + FFN(LN(x)), FFN expansion 4.
  Attention over the stage's whole H x W map, head size 32, plus a learned bias per head and
  relative offset: a (2H-1) x (2W-1) table gathered by offset (`relative_bias`).
- After S4: global average pool, LayerNorm, dropout, linear head.

Choices the paper leaves open, taken as in the authors' MaxViT code and timm's paper configs:
- MBConv expansion is on the block's output channels (hidden = 4 x out, also in the strided
  first block of a stage);
- SE squeezes to 0.25 x the block's output channels (1/16 of the expanded width), SiLU inside;
- the T block's first-of-stage attention widens the tokens in its qkv projection (cin -> cout);
- "Pool" is a 2x2 average pool (ceil mode), "Proj" a 1x1 conv with bias.
These give CoAtNet-0..4 25.0M / 41.7M / 73.9M / 165.2M / 272.4M parameters and 4.38 / 8.36 /
16.1 / 35.9 GMACs at 224 (see README.md; the paper: 25 / 42 / 75 / 168 / 275M and 4.2 / 8.4 /
15.7 / 34.7 G).

The relative-bias tables are sized by each stage's feature map, so the network is built for one
resolution (`image_size`); `resize(model, image_size)` returns it at another, each table
resized bilinearly (the paper's fine-tuning at higher resolution). `small_images=True` drops the
stem's stride (and uses patch 8 for VIT_REL), so 32x32 inputs give T stages 8x8 / 4x4 / 2x2
tokens instead of 4x4 / 2x2 / 1x1. `match_params` picks widths so that layouts can be compared
at a matched parameter count.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling import ScalingError
from scaling.models.vit import Mlp, SelfAttention

# name -> (blocks per stage L, channels D) for S0..S4, Table 3 of the paper.
SIZES = {
    0: ((2, 2, 3, 5, 2), (64, 96, 192, 384, 768)),
    1: ((2, 2, 6, 14, 2), (64, 96, 192, 384, 768)),
    2: ((2, 2, 6, 14, 2), (128, 128, 256, 512, 1024)),
    3: ((2, 2, 6, 14, 2), (192, 192, 384, 768, 1536)),
    4: ((2, 2, 12, 28, 2), (192, 192, 384, 768, 1536)),
}
LAYOUTS = ("CCCC", "CCCT", "CCTT", "CTTT", "VIT_REL")
NAMES = "coatnet_{0,1,2,3,4}, coatnet (settings layout, depths, dims)"
VIT_REL_DEFAULTS = ((12,), (384,))  # ViT-S sized when no depths/dims are given

conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_init = nnx.initializers.xavier_uniform()
LN_EPSILON = 1e-5


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)


def _pool(x):
    """2x2 average pool, stride 2; odd sizes round up, like a stride-2 'SAME' convolution."""
    return nnx.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME", count_include_pad=False)


def _batch_norm(channels, dtype, rngs):
    return nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)


def _conv(cin, cout, kernel, *, rngs, dtype, stride=1, groups=1, bias=False):
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=stride,
        feature_group_count=groups,
        use_bias=bias,
        kernel_init=conv_init,
        dtype=dtype,
        rngs=rngs,
    )


def relative_position_index(height, width):
    """(dy, dx), each (HW, HW): the table row and column of the offset from token j to token i.

    Tokens are numbered row-major; the offset (yi - yj, xi - xj) is shifted by (H-1, W-1) so it
    indexes a (2H-1) x (2W-1) table.
    """
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    return ys[:, None] - ys[None, :] + height - 1, xs[:, None] - xs[None, :] + width - 1


def relative_bias(table, grid):
    """The attention bias (heads, HW, HW) gathered from a (2H-1, 2W-1, heads) table."""
    dy, dx = relative_position_index(*grid)
    return jnp.moveaxis(table[dy, dx], -1, 0)


def resize_bias_table(table, grid):
    """A (2H-1, 2W-1, heads) table bilinearly resized for an H' x W' grid; same size: unchanged."""
    shape = (2 * grid[0] - 1, 2 * grid[1] - 1, table.shape[-1])
    if tuple(table.shape) == shape:
        return table
    return jax.image.resize(table, shape, method="bilinear")


class SqueezeExcite(nnx.Module):
    def __init__(self, channels, reduced, *, dtype, rngs):
        self.reduce = nnx.Linear(channels, reduced, dtype=dtype, rngs=rngs)
        self.expand = nnx.Linear(reduced, channels, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        return x * jax.nn.sigmoid(self.expand(jax.nn.silu(self.reduce(s))))


class MBConv(nnx.Module):
    """Pre-norm inverted bottleneck with squeeze-excitation; the first 1x1 conv strides."""

    def __init__(self, cin, cout, stride, *, expansion, se_ratio, stochastic_depth, dtype, rngs):
        hidden = expansion * cout  # expansion on the output channels (see the module docstring)
        self.stride = stride
        self.shortcut = nnx.data(
            _conv(cin, cout, 1, bias=True, dtype=dtype, rngs=rngs)
            if stride > 1 or cin != cout
            else None
        )
        self.norm0 = _batch_norm(cin, dtype, rngs)
        self.conv1 = _conv(cin, hidden, 1, stride=stride, dtype=dtype, rngs=rngs)
        self.norm1 = _batch_norm(hidden, dtype, rngs)
        self.conv2 = _conv(hidden, hidden, 3, groups=hidden, dtype=dtype, rngs=rngs)
        self.norm2 = _batch_norm(hidden, dtype, rngs)
        self.se = SqueezeExcite(hidden, max(1, int(se_ratio * cout)), dtype=dtype, rngs=rngs)
        self.conv3 = _conv(hidden, cout, 1, bias=True, dtype=dtype, rngs=rngs)
        self.drop_path = nnx.Dropout(stochastic_depth, broadcast_dims=(1, 2, 3), rngs=rngs)

    def __call__(self, x):
        shortcut = _pool(x) if self.stride > 1 else x
        if self.shortcut is not None:
            shortcut = self.shortcut(shortcut)
        y = _gelu(self.norm1(self.conv1(self.norm0(x))))
        y = self.se(_gelu(self.norm2(self.conv2(y))))
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
        dropout=0.0,
        attention_dropout=0.0,
        stochastic_depth=0.0,
        pre_logits=True,
        dtype=None,
        in_channels=3,
        rngs: nnx.Rngs,
    ):
        layout = check_layout(layout)
        vit_rel = layout == "VIT_REL"
        n = 1 if vit_rel else 5
        default_depths, default_dims = VIT_REL_DEFAULTS if vit_rel else SIZES[0]
        what = "for VIT_REL (one stage)" if vit_rel else "for S0-S4"
        depths = _positive_ints(default_depths if depths is None else depths, n, f"depths {what}")
        dims = _positive_ints(default_dims if dims is None else dims, n, f"dims {what}")
        for key, value in dict(
            image_size=image_size,
            num_classes=num_classes,
            head_size=head_size,
            expansion=expansion,
        ).items():
            if not isinstance(value, int) or value < 1:
                raise ScalingError(f"CoAtNet {key} must be a positive integer, got {value!r}")
        if not 0 < se_ratio <= 1:
            raise ScalingError(f"se_ratio must be in (0, 1], got {se_ratio}")
        for key, value in dict(
            dropout=dropout, attention_dropout=attention_dropout, stochastic_depth=stochastic_depth
        ).items():
            if not 0 <= value < 1:
                raise ScalingError(f"{key} must be in [0, 1), got {value}")
        self.layout, self.image_size, self.small_images = layout, image_size, small_images

        if vit_rel:
            patch = patch_size(small_images)
            if image_size % patch:
                raise ScalingError(
                    f"image_size {image_size} is not divisible by VIT_REL's patch size {patch}; "
                    f"valid sizes are multiples of {patch}"
                )
            embed = _conv(
                in_channels, dims[0], patch, stride=patch, bias=True, dtype=dtype, rngs=rngs
            )
            self.stem = nnx.List([embed])
            self.stem_norms = nnx.List([])
            plan = [("T", dims[0], 1, image_size // patch)] * depths[0]
        else:
            stem = [
                _conv(c, dims[0], 3, stride=1 if i or small_images else 2, dtype=dtype, rngs=rngs)
                for i, c in enumerate([in_channels] + [dims[0]] * (depths[0] - 1))
            ]
            self.stem = nnx.List(stem)
            # BN + GELU between stem convs; the first block's pre-norm follows the last conv.
            self.stem_norms = nnx.List(
                [_batch_norm(dims[0], dtype, rngs) for _ in range(depths[0] - 1)]
            )
            sizes = feature_sizes(image_size, small_images)
            stages = zip(layout, dims[1:], depths[1:], sizes[1:], strict=True)
            plan = [
                (kind, dim, 2 if j == 0 else 1, size)
                for kind, dim, depth, size in stages
                for j in range(depth)
            ]
        # Stochastic depth grows linearly from 0 to `stochastic_depth` over the blocks.
        rates = np.linspace(0, stochastic_depth, len(plan)) if len(plan) > 1 else [0.0]
        blocks, cin = [], dims[0]
        for (kind, cout, stride, size), rate in zip(plan, rates, strict=True):
            if kind == "C":
                block = MBConv(
                    cin,
                    cout,
                    stride,
                    expansion=expansion,
                    se_ratio=se_ratio,
                    stochastic_depth=float(rate),
                    dtype=dtype,
                    rngs=rngs,
                )
            else:
                block = TransformerBlock(
                    cin,
                    cout,
                    stride,
                    (size, size),
                    head_size=head_size,
                    stochastic_depth=float(rate),
                    dropout=attention_dropout,
                    dtype=dtype,
                    rngs=rngs,
                )
            blocks.append(block)
            cin = cout
        self.blocks = nnx.List(blocks)
        self.norm = nnx.LayerNorm(cin, epsilon=LN_EPSILON, dtype=dtype, rngs=rngs)
        # A dense + tanh "pre-logits" layer of the final width, as in the authors' MaxViT code
        # and timm's paper configs; the paper's parameter counts include it.
        self.pre_logits = nnx.data(
            nnx.Linear(cin, cin, kernel_init=dense_init, dtype=dtype, rngs=rngs)
            if pre_logits
            else None
        )
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(cin, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        if x.shape[1] != self.image_size or x.shape[2] != self.image_size:
            raise ScalingError(
                f"this CoAtNet was built for {self.image_size}x{self.image_size} images, got "
                f"{x.shape[1]}x{x.shape[2]}; build it with image_size={x.shape[1]} or use "
                "scaling.models.coatnet.resize"
            )
        x = self.stem[0](x)
        for conv, norm in zip(self.stem[1:], self.stem_norms, strict=True):
            x = conv(_gelu(norm(x)))
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


def match_params(layout, target_params, *, depths=None, num_classes=1000, head_size=32, **kw):
    """`depths` and `dims` for `layout` with about `target_params` trainable parameters.

    Depths stay fixed (CoAtNet-0's, or 12 blocks for VIT_REL, unless given); the widths keep
    CoAtNet-0's proportions 64:96:192:384:768 (one width for VIT_REL) and are scaled by one
    factor, found by a few secant steps on log(parameters), rounded to multiples of 8 (of
    `head_size` in T stages). Returns dict(layout, depths, dims, params).
    """
    from scaling.models import count_params

    layout = check_layout(layout)
    if not isinstance(target_params, (int, float)) or target_params < 1:
        raise ScalingError(f"target_params must be positive, got {target_params!r}")
    vit_rel = layout == "VIT_REL"
    ratios = (4,) if vit_rel else (2 / 3, 1, 2, 4, 8)
    kinds = "T" if vit_rel else "CC" + layout[1:]
    depths = tuple(depths or (VIT_REL_DEFAULTS if vit_rel else SIZES[0])[0])

    def dims_at(scale):
        return tuple(
            max(q, q * round(scale * r / q))
            for r, q in zip(ratios, [head_size if k == "T" else 8 for k in kinds], strict=True)
        )

    def params_at(dims):
        model = nnx.eval_shape(
            lambda: CoAtNet(
                layout=layout,
                depths=depths,
                dims=dims,
                num_classes=num_classes,
                head_size=head_size,
                rngs=nnx.Rngs(0),
                **kw,
            )
        )
        return count_params(model)

    scale = 96.0 * math.sqrt(target_params / 25e6)  # CoAtNet-0: S1 width 96 at 25M
    best = None
    for _ in range(8):
        dims = dims_at(scale)
        params = params_at(dims)
        if best is None or abs(math.log(params / target_params)) < abs(
            math.log(best[1] / target_params)
        ):
            best = (dims, params)
        if abs(params / target_params - 1) < 0.02:
            break
        scale *= math.sqrt(target_params / params)  # parameters grow ~ width squared
    return dict(layout=layout, depths=depths, dims=best[0], params=best[1])


def create(name, *, image_size=None, **settings):
    """Build `coatnet_{0..4}` or `coatnet` (any layout/depths/dims); None for other names."""
    image_size = 224 if image_size is None else image_size
    if name == "coatnet":
        return CoAtNet(image_size=image_size, **settings)
    m = re.fullmatch(r"coatnet_(\d+)", name)
    if not m:
        return None
    if int(m[1]) not in SIZES:
        raise ScalingError(f"unknown CoAtNet size {name}; valid: coatnet_0 ... coatnet_4")
    depths, dims = SIZES[int(m[1])]
    return CoAtNet(image_size=image_size, **{"depths": depths, "dims": dims, **settings})


def default_image_size(name):
    return 224 if re.fullmatch(r"coatnet(_[0-4])?", name) else None
