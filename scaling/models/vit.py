"""Vision Transformer (Dosovitskiy et al. 2021): `vit_{ti,s,b,l,h}{patch}`.

Patch embedding (a patch x patch convolution with stride patch), a class token or global average
pooling (`pool='token'` or `'gap'`), learned 1-D position embeddings, pre-norm encoder blocks
(LayerNorm, multi-head self-attention, LayerNorm, MLP with GELU), a final LayerNorm and a linear
head. One size table gives width, depth, MLP width and heads; the patch size is part of the name,
so `vit_b16` is ViT-B/16 and `vit_s4` a ViT-S on 4x4 patches (for 32x32 images).

The position embeddings have one row per patch, so the model is built for one resolution
(`image_size`, default 224); `resize(model, image_size)` returns the model at another resolution
with the embeddings interpolated in 2-D, as the paper does to fine-tune at higher resolution.

The identical encoder blocks are created with `nnx.vmap` (parameters stacked along a leading axis of
length depth) and applied with `nnx.scan` (`scan=True`, the default), so on CPU compile time does
not grow with depth (accelerators unroll the loop: `stack.scan_blocks`); `remat=True` rematerialises
each block in the backward pass. `scan=False` builds the same blocks unrolled, as an `nnx.List`
(`unrolled(model)` converts a scanned model).
`dropout` acts on the embeddings, the attention output and both MLP layers (the paper's places);
`stochastic_depth` drops a block's two residual branches per example (`layers.DropPath`), at a
rate growing linearly from 0 at the first block to `stochastic_depth` at the last (Huang et al.
2016's schedule, as timm's ViT and DeiT). Each block's rate is state of the block
(`layers.DropRate`), created by `nnx.vmap` over the rates: a scan input, so the scanned blocks
still compile as one.
"""

import re

import jax
import jax.numpy as jnp
from flax import nnx

from scaling import ScalingError
from scaling.models.layers import DropPath, Mlp, SelfAttention, linear_drop_rates
from scaling.models.registry import Family, register
from scaling.models.stack import apply_block, scan_blocks, unstack
from scaling.ops import dense
from scaling.scale import round_filters, round_repeats, round_resolution

# name -> (width, depth, MLP width, heads), Table 1 of the paper; Ti and S from DeiT.
SIZES = {
    "ti": (192, 12, 768, 3),
    "s": (384, 12, 1536, 6),
    "b": (768, 12, 3072, 12),
    "l": (1024, 24, 4096, 16),
    "h": (1280, 32, 5120, 16),
}
POOLS = ("token", "gap")

LN_EPSILON = 1e-6


class EncoderBlock(nnx.Module):
    """x + Attention(LN(x)), then x + MLP(LN(x)); stochastic depth on both residual branches."""

    def __init__(self, width, mlp_dim, num_heads, *, dropout, drop_rate, dtype, rngs):
        self.norm1 = nnx.LayerNorm(width, epsilon=LN_EPSILON, dtype=dtype, rngs=rngs)
        self.attn = SelfAttention(width, width, num_heads, dropout=dropout, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, epsilon=LN_EPSILON, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(width, mlp_dim, dropout=dropout, dtype=dtype, rngs=rngs)
        # Per-example drop of a whole residual branch, rescaled (Huang et al. 2016), at this
        # block's rate; None (no stochastic depth): never, but the layer and its random stream
        # are kept, so that the other layers' initial values do not depend on the setting.
        self.drop_path = DropPath(drop_rate, rngs=rngs)

    def __call__(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def block_apply(remat):
    """How the encoder applies a block: `remat` recomputes the whole block in the backward pass;
    otherwise the block keeps what `scaling.ops.dense.remat_policy` says (on CPU the matrix
    products' outputs only)."""
    if remat:
        return nnx.remat(apply_block)
    policy = dense.remat_policy()
    return apply_block if policy is None else nnx.remat(apply_block, policy=policy)


class Encoder(nnx.Module):
    """`depth` identical encoder blocks: stacked and scanned, or unrolled.

    Scanned (the Flax NNX "scan over layers" pattern): the blocks are created by `nnx.vmap` over
    split RNG streams, so every parameter gains a leading axis of length `depth`, and `nnx.scan`
    applies them in turn with the tokens as the carry. XLA then compiles one block, not `depth`.
    """

    def __init__(self, depth, *, scan, remat, stochastic_depth, rngs, **block_settings):
        self.scan, self.remat = scan, remat
        rates = linear_drop_rates(stochastic_depth, depth)
        on = stochastic_depth > 0
        # Lower the scan fully unrolled: `flops.xla_flops` sets this while it asks XLA for its
        # cost analysis, which counts the body of a loop once, not once per iteration.
        if scan:

            @nnx.split_rngs(splits=depth)
            @nnx.vmap(in_axes=(0, 0), out_axes=0)
            def make_blocks(rngs, rate):  # `rate`: this block's, traced
                return EncoderBlock(rngs=rngs, drop_rate=rate if on else None, **block_settings)

            self.blocks = make_blocks(rngs, jnp.asarray(rates, jnp.float32))
        else:
            self.blocks = nnx.List(
                [
                    EncoderBlock(rngs=rngs, drop_rate=rate if on else None, **block_settings)
                    for rate in rates
                ]
            )

    def __call__(self, x):
        apply = block_apply(self.remat)
        if self.scan:
            return scan_blocks(apply, self.blocks, x)
        for block in self.blocks:
            x = apply(block, x)
        return x


class ViT(nnx.Module):
    """Vision Transformer for NHWC images of `image_size` x `image_size` pixels."""

    def __init__(
        self,
        *,
        patch_size,
        width,
        depth,
        mlp_dim,
        num_heads,
        image_size=224,
        num_classes=1000,
        pool="token",
        dropout=0.0,
        stochastic_depth=0.0,
        scan=True,
        remat=False,
        dtype=None,
        in_channels=3,
        rngs: nnx.Rngs,
    ):
        sizes = dict(
            patch_size=patch_size,
            width=width,
            depth=depth,
            mlp_dim=mlp_dim,
            num_heads=num_heads,
            image_size=image_size,
            num_classes=num_classes,
        )
        for key, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise ScalingError(f"ViT {key} must be a positive integer, got {value!r}")
        if pool not in POOLS:
            raise ScalingError(f"unknown pool {pool!r}; valid: {', '.join(POOLS)}")
        if not (0 <= dropout < 1 and 0 <= stochastic_depth < 1):
            raise ScalingError("dropout and stochastic_depth must be in [0, 1)")
        if width % num_heads:
            raise ScalingError(f"ViT width {width} is not divisible by num_heads {num_heads}")
        self.patch_size, self.pool = patch_size, pool
        self.grid = grid_size(image_size, patch_size)
        self.image_size = image_size

        self.patch_embed = nnx.Conv(
            in_channels,
            width,
            (patch_size, patch_size),
            strides=patch_size,
            padding="VALID",
            dtype=dtype,
            rngs=rngs,
        )
        self.cls_token = nnx.data(nnx.Param(jnp.zeros((1, 1, width))) if pool == "token" else None)
        tokens = self.grid**2 + (pool == "token")
        self.pos_embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, tokens, width)))
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.encoder = Encoder(
            depth,
            scan=scan,
            remat=remat,
            width=width,
            mlp_dim=mlp_dim,
            num_heads=num_heads,
            dropout=dropout,
            stochastic_depth=stochastic_depth,
            dtype=dtype,
            rngs=rngs,
        )
        self.norm = nnx.LayerNorm(width, epsilon=LN_EPSILON, dtype=dtype, rngs=rngs)
        # Zero-initialised classifier, as in the paper's code (big_vision).
        self.head = nnx.Linear(
            width, num_classes, kernel_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs
        )

    def __call__(self, x):
        if x.shape[1] != self.image_size or x.shape[2] != self.image_size:
            raise ScalingError(
                f"this ViT was built for {self.image_size}x{self.image_size} images, got "
                f"{x.shape[1]}x{x.shape[2]}; build it with image_size={x.shape[1]} or use "
                "scaling.models.vit.resize"
            )
        x = self.patch_embed(x)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        if self.cls_token is not None:
            cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, d))
            x = jnp.concatenate([cls, x], axis=1)
        x = self.dropout(x + self.pos_embed[...].astype(x.dtype))
        x = self.norm(self.encoder(x))
        x = x[:, 0] if self.pool == "token" else jnp.mean(x, axis=1)
        return self.head(x).astype(jnp.float32)


def grid_size(image_size, patch_size):
    """Patches per side; a resolution that the patch size does not divide is an error."""
    if image_size % patch_size:
        raise ScalingError(
            f"image_size {image_size} is not divisible by the patch size {patch_size}; valid "
            f"sizes are multiples of {patch_size}"
        )
    return image_size // patch_size


def resize_position_embedding(pos_embed, new_grid, num_prefix_tokens=1):
    """Position embeddings (1, prefix + g*g, D) bilinearly resized to (1, prefix + n*n, D).

    The prefix (class token) rows are kept; the g x g grid of patch embeddings is interpolated in
    2-D. The same grid size returns the embeddings unchanged.
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = round(patches.shape[1] ** 0.5)
    if old * old != patches.shape[1]:
        raise ScalingError(f"{patches.shape[1]} position embeddings are not a square grid")
    if old == new_grid:
        return pos_embed
    d = patches.shape[-1]
    grid = patches.reshape(old, old, d)
    grid = jax.image.resize(grid, (new_grid, new_grid, d), method="bilinear")
    return jnp.concatenate([prefix, grid.reshape(1, new_grid * new_grid, d)], axis=1)


def resize(model: ViT, image_size: int) -> ViT:
    """A copy of a (trained) ViT for `image_size` inputs, position embeddings interpolated.

    Every other parameter is shared in value. To resize a saved parameter state, merge it into
    a model first (`nnx.update(models.create(name, image_size=old), params)`).
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise ScalingError(f"image_size must be a positive integer, got {image_size!r}")
    new_grid = grid_size(image_size, model.patch_size)
    new = nnx.clone(model)
    prefix = int(model.cls_token is not None)
    new.pos_embed = nnx.Param(resize_position_embedding(model.pos_embed[...], new_grid, prefix))
    new.grid, new.image_size = new_grid, image_size
    return new


def unrolled(model: ViT) -> ViT:
    """A copy of `model` with its scanned encoder blocks unrolled into a list, same parameters.

    The stacked state of the scanned blocks is sliced along its leading (layer) axis and merged
    into one block per layer, so both forms compute the same function.
    """
    new = nnx.clone(model)
    encoder = new.encoder
    if encoder.scan:
        encoder.blocks = nnx.List(unstack(encoder.blocks))
        encoder.scan = False
    return new


def create(name, *, image_size=None, **settings):
    """Build `vit_{size}{patch}`."""
    m = re.fullmatch(r"vit_([a-z]+)(\d+)", name)
    if m[1] not in SIZES:
        raise ScalingError(f"unknown ViT size {m[1]!r} in {name}; valid: {', '.join(SIZES)}")
    width, depth, mlp_dim, heads = SIZES[m[1]]
    defaults = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads)
    image_size = 224 if image_size is None else image_size
    return ViT(patch_size=int(m[2]), image_size=image_size, **{**defaults, **settings})


def default_image_size(name):
    return 224


def scale(name, settings, image_size, c):
    """ViT grown by the multipliers `c` (scaling.scale.apply): width and MLP width times
    c.width with the head count kept (each head wider, by multiples of 8 channels), blocks times
    c.depth rounded up, the image side to a multiple of the patch."""
    m = re.fullmatch(r"vit_([a-z]+)(\d+)", name)
    width, depth, mlp_dim, heads = SIZES.get(m[1], SIZES["b"])  # a bad size fails in create
    s = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads) | settings
    s["width"] = round_filters(s["width"], c.width, divisor=8 * s["num_heads"])
    s["mlp_dim"] = max(1, round(s["mlp_dim"] * c.width))
    s["depth"] = round_repeats(s["depth"], c.depth)
    return s, round_resolution(image_size, c.resolution, divisor=int(m[2]))


register(
    Family(
        name="vit",
        pattern=r"vit_[a-z]+\d+",
        build=create,
        constructor=ViT,
        examples=("vit_ti16", "vit_s16", "vit_b16", "vit_b32", "vit_l16", "vit_h14", "vit_s4"),
        image_size=default_image_size,
        names="vit_{ti,s,b,l,h}{patch} (e.g. vit_b16, vit_h14, vit_s4)",
        resolution_dependent=True,  # position embeddings: one per patch
        scale=scale,
    )
)
