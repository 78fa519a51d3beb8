"""timm's names: `preact_resnet*` from `resnetv2_*`, `efficientnet_b*` from
`tf_efficientnet_b*`, `vit_*` from `vit_*_patch*_*`, `coatnet_*` from `coatnet_*_224`,
`seresnet*` and `seresnext*` from timm's own (torchvision's names, and `se.fc1`/`se.fc2`)."""

import numpy as np

from scaling import ScalingError
from scaling.convert import torchvision
from scaling.convert.tables import (
    Transform,
    conv_numbers,
    resnet_blocks,
    stages,
    vit_depth,
)
from scaling.models import coatnet

STEMS = ("stem.conv.weight", "stem.conv1.weight", "patch_embed.proj.weight", "conv_stem.weight")


def looks_like(names) -> bool:
    se_resnet = any(name.endswith(".se.fc1.weight") for name in names) and "conv1.weight" in names
    return se_resnet or any(stem in names for stem in STEMS)


def _qkv_per_head(heads: int, kernel: bool) -> Transform:
    """timm's Attention2d (head_first) lays its qkv conv's outputs out as (heads, 3, head_dim);
    ours (models.layers.SelfAttention) as (3, heads, head_dim)."""

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
    (2H-1, 2W-1, heads), indexed [dy, dx] (models.layers.relative_position_index)."""
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


def resnetv2_table(model, t):
    t.layer("stem.conv", "stem", "conv")
    blocks = resnet_blocks(model)
    for stage, j, ours, block in stages(blocks, lambda b: b.shortcut.stride > 1):
        ref = f"stages.{stage}.blocks.{j}"
        for i in conv_numbers(block):
            t.layer(f"{ref}.norm{i}", f"{ours}/norm{i}", "bn")  # pre-activation: of the input
            t.layer(f"{ref}.conv{i}", f"{ours}/conv{i}", "conv")
        t.layer(f"{ref}.downsample.conv", f"{ours}/shortcut/proj", "conv", optional=True)
    t.layer("norm", "final_norm", "bn")
    t.layer("head.fc", "head", "conv1x1_linear")


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


def efficientnet_table(model, t):
    t.layer("conv_stem", "stem", "conv")
    t.layer("bn1", "stem_norm", "bn")
    blocks = [(f"blocks/{k}", block) for k, block in enumerate(model.blocks)]
    # A stage's first block is the one without the identity skip (it strides or widens).
    for stage, j, ours, block in stages(blocks, lambda b: not b.skip):
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


def vit_table(model, t):
    t.layer("patch_embed.proj", "patch_embed", "conv")
    t.layer("cls_token", "cls_token", "param", optional=True)
    t.layer("pos_embed", "pos_embed", "param")
    for i in range(vit_depth(model)):
        for theirs, mine, kind in VIT_BLOCK:
            t.layer(f"blocks.{i}.{theirs}", f"encoder/blocks/{i}/{mine}", kind)
    t.layer("norm", "norm", "ln")
    t.layer("head", "head", "linear")


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


def coatnet_table(model, t):
    for i in range(len(model.stem.convs)):
        t.layer(f"stem.conv{i + 1}", f"stem/convs/{i}", "conv")
    for i in range(len(model.stem.norms)):
        t.layer(f"stem.norm{i + 1}", f"stem/norms/{i}", "bn")
    blocks = [(f"blocks/{k}", block) for k, block in enumerate(model.blocks)]
    for stage, j, ours, block in stages(blocks, lambda b: b.stride > 1):
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


# Our families this source fills: (their table, the reference's classifier: its name and the
# axis of its classes).
TABLES = {
    "preact_resnet": (resnetv2_table, ("head.fc.weight", 0)),
    "efficientnet": (efficientnet_table, ("classifier.weight", 0)),
    "vit": (vit_table, ("head.weight", 0)),
    "coatnet": (coatnet_table, ("head.fc.weight", 0)),
    # timm's ResNet keeps torchvision's names; its SE layers are two 1x1 convs with bias.
    "seresnet": (torchvision.resnet_table, ("fc.weight", 0)),
}
