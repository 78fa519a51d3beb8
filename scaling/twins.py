"""PyTorch twins of five Flax models of `scaling.models`, for `scaling bench --compare torch`.

Needs PyTorch (the `torch` extra); `scaling.bench` imports this module only when it compares.

A twin is the same network as its Flax model: the same layers in the same order, the same
shapes and multiply-adds, and exactly as many trainable parameters (BatchNorm scale and bias
count; running statistics are buffers). Inputs are NCHW. Initialisation is PyTorch's default
(cost and shapes do not depend on it). Differences that are in the frameworks, not the networks:

- EfficientNet's Flax convolutions pad as TensorFlow's 'SAME' (one pixel more after than
  before for a strided conv on an even input); its twin pads k//2 on both sides, as PyTorch
  models do. Output shapes (ceil(in / stride)) and costs are the same.
- Attention runs through `F.scaled_dot_product_attention` (PyTorch's fused kernels; the
  relative-position bias as an additive mask) where Flax writes out einsum/softmax/einsum: the
  same computation.
- ViT's encoder blocks are a plain sequence (Flax scans over stacked blocks: compile time only).
"""

import torch
import torch.nn.functional as F
from torch import nn

from scaling.bench import MODELS
from scaling.models import efficientnet

# The benchmark's models (scaling.bench.MODELS), all at CIFAR size.
TWINS = {name: dict(model=m, settings=s, image_size=32) for name, (m, s) in MODELS.items()}


def conv(cin, cout, kernel, stride=1, groups=1, bias=False):
    return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=bias)


def mlp(width, hidden):
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


def pool(x):
    """2x2 average pool, stride 2, odd sizes rounded up (Flax 'SAME', padding not counted)."""
    return F.avg_pool2d(x, 2, ceil_mode=True, count_include_pad=False)


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a residual branch per example, rescale the kept."""

    def __init__(self, rate):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if not self.training or self.rate == 0:
            return x
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        keep = torch.rand(shape, device=x.device) >= self.rate
        return x * keep.to(x.dtype) / (1 - self.rate)


class SqueezeExcite(nn.Module):
    """Global average pool, dense reduce, SiLU, dense expand, sigmoid gate (dense with biases)."""

    def __init__(self, channels, reduced):
        super().__init__()
        self.reduce = nn.Linear(channels, reduced)
        self.expand = nn.Linear(reduced, channels)

    def forward(self, x):
        s = torch.sigmoid(self.expand(F.silu(self.reduce(x.mean((2, 3))))))
        return x * s[:, :, None, None]


class Attention(nn.Module):
    """Multi-head self-attention, one fused qkv projection; `cin` may differ from `width`
    (CoAtNet's first transformer block of a stage widens the tokens in its qkv projection)."""

    def __init__(self, cin, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(cin, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, bias=None):
        b, n, _ = x.shape
        # (B, N, 3, heads, head size) as in Flax, then (3, B, heads, N, head size).
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if bias is None else bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


# ResNet-20 (post-activation, option-A shortcuts) and WRN-16-4 (pre-activation, projections).


class Shortcut(nn.Module):
    """Identity when shapes match; else option A (subsample, zero-pad channels on both sides) or
    B (1x1 conv, plus BatchNorm in post-activation blocks)."""

    def __init__(self, cin, cout, stride, kind, preact):
        super().__init__()
        self.stride, self.pad = stride, cout - cin
        self.identity = stride == 1 and cin == cout
        self.proj = None
        if not self.identity and kind == "B":
            norm = [] if preact else [nn.BatchNorm2d(cout)]
            self.proj = nn.Sequential(conv(cin, cout, 1, stride), *norm)

    def forward(self, x):
        if self.identity:
            return x
        if self.proj is not None:
            return self.proj(x)
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    """Two 3x3 convs. Pre-activation: the shortcut (identity too) takes the activated input,
    as the Flax block does."""

    def __init__(self, cin, cout, stride, preact, shortcut):
        super().__init__()
        self.preact = preact
        self.conv1 = conv(cin, cout, 3, stride)
        self.conv2 = conv(cout, cout, 3)
        self.norm1 = nn.BatchNorm2d(cin if preact else cout)
        self.norm2 = nn.BatchNorm2d(cout)
        self.shortcut = Shortcut(cin, cout, stride, shortcut, preact)

    def forward(self, x):
        if self.preact:  # an identity shortcut adds the raw input
            pre = F.relu(self.norm1(x))
            y = self.conv2(F.relu(self.norm2(self.conv1(pre))))
            return y + self.shortcut(x if self.shortcut.identity else pre)
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """3x3 stem, three stages of basic blocks (stride 2 from the second), GAP, linear head."""

    def __init__(self, blocks_per_stage, widths, stem_width, *, preact, shortcut, num_classes):
        super().__init__()
        self.stem = conv(3, stem_width, 3)
        self.stem_norm = None if preact else nn.BatchNorm2d(stem_width)
        blocks, cin = [], stem_width
        for i, width in enumerate(widths):
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(cin, width, stride, preact, shortcut))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.final_norm = nn.BatchNorm2d(cin) if preact else None
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stem(x)
        if self.stem_norm is not None:
            x = F.relu(self.stem_norm(x))
        x = self.blocks(x)
        if self.final_norm is not None:
            x = F.relu(self.final_norm(x))
        return self.head(x.mean((2, 3)))


# EfficientNet-B0 (ImageNet strides: a 32x32 input ends at 1x1).
B0_STAGES = efficientnet.STAGES  # (expansion, kernel, stride, channels, blocks) per stage


def tf_batch_norm(channels):
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)  # Flax/TF momentum 0.99


class EfficientMBConv(nn.Module):
    """1x1 expand (skipped at ratio 1), depthwise kxk (strided), SE to cin/4, 1x1 project;
    BN after each conv, swish after the first two; identity skip with stochastic depth."""

    def __init__(self, cin, cout, expand, kernel, stride, drop_rate):
        super().__init__()
        mid = cin * expand
        self.expand = nn.Identity()
        if expand != 1:
            self.expand = nn.Sequential(conv(cin, mid, 1), tf_batch_norm(mid), nn.SiLU())
        self.depthwise = nn.Sequential(
            conv(mid, mid, kernel, stride, groups=mid), tf_batch_norm(mid), nn.SiLU()
        )
        self.se = SqueezeExcite(mid, max(1, int(cin * 0.25)))
        self.project = nn.Sequential(conv(mid, cout, 1), tf_batch_norm(cout))
        self.skip = stride == 1 and cin == cout
        self.drop = DropPath(drop_rate)

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + self.drop(y) if self.skip else y


class EfficientNet(nn.Module):
    def __init__(self, num_classes, dropout=0.2, drop_connect_rate=0.2):
        super().__init__()
        self.stem = nn.Sequential(conv(3, 32, 3, 2), tf_batch_norm(32), nn.SiLU())
        num_blocks = sum(stage[4] for stage in B0_STAGES)
        blocks, cin = [], 32
        for expand, kernel, stride, cout, repeats in B0_STAGES:
            for j in range(repeats):
                rate = drop_connect_rate * len(blocks) / num_blocks
                blocks.append(
                    EfficientMBConv(cin, cout, expand, kernel, stride if j == 0 else 1, rate)
                )
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.top = nn.Sequential(conv(cin, 1280, 1), tf_batch_norm(1280), nn.SiLU())
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = self.top(self.blocks(self.stem(x)))
        return self.head(self.dropout(x.mean((2, 3))))


# ViT-S/4: class token, learned position embeddings, pre-norm blocks (LayerNorm epsilon 1e-6).


class EncoderBlock(nn.Module):
    def __init__(self, width, mlp_dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = mlp(width, mlp_dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, image_size, patch, width, depth, mlp_dim, heads, num_classes):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        tokens = (image_size // patch) ** 2 + 1
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(width, mlp_dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D), patches row-major
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


# CoAtNet: conv stem (S0), MBConv (C) and relative-attention (T) stages S1-S4, each starting
# with a stride-2 block; BatchNorm epsilon 1e-5, LayerNorm epsilon 1e-6, GELU.


class CoAtMBConv(nn.Module):
    """Pre-norm MBConv: shortcut = proj(pool(x)); branch = BN, 1x1 to 4 x cout, BN, GELU,
    depthwise 3x3 (strided), BN, GELU, SE to cout/4, 1x1 with bias."""

    def __init__(self, cin, cout, stride, expansion=4, se_ratio=0.25):
        super().__init__()
        hidden = expansion * cout
        self.stride = stride
        resize = stride > 1 or cin != cout
        self.shortcut = conv(cin, cout, 1, bias=True) if resize else nn.Identity()
        self.norm0 = nn.BatchNorm2d(cin)
        self.conv1 = conv(cin, hidden, 1)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.conv2 = conv(hidden, hidden, 3, stride, groups=hidden)
        self.norm2 = nn.BatchNorm2d(hidden)
        self.se = SqueezeExcite(hidden, max(1, int(se_ratio * cout)))
        self.conv3 = conv(hidden, cout, 1, bias=True)

    def forward(self, x):
        shortcut = self.shortcut(pool(x) if self.stride > 1 else x)
        y = F.gelu(self.norm1(self.conv1(self.norm0(x))))
        y = self.se(F.gelu(self.norm2(self.conv2(y))))
        return shortcut + self.conv3(y)


class RelTransformerBlock(nn.Module):
    """x <- proj(pool(x)) + attention(pool(LN(x))) with a learned bias per head and relative
    offset over the grid x grid map; x <- x + MLP(LN(x)). NCHW in and out."""

    def __init__(self, cin, cout, stride, grid, head_size=32):
        super().__init__()
        heads = cout // head_size
        self.stride = stride
        resize = stride > 1 or cin != cout
        self.shortcut = conv(cin, cout, 1, bias=True) if resize else nn.Identity()
        self.norm1 = nn.LayerNorm(cin, eps=1e-6)
        self.attn = Attention(cin, cout, heads)
        self.rel_bias = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(2 * grid - 1, 2 * grid - 1, heads), std=0.02)
        )
        # Table row/column of the offset from token j to token i (row-major tokens).
        ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        self.register_buffer("dy", ys[:, None] - ys[None, :] + grid - 1, persistent=False)
        self.register_buffer("dx", xs[:, None] - xs[None, :] + grid - 1, persistent=False)
        self.norm2 = nn.LayerNorm(cout, eps=1e-6)
        self.mlp = mlp(cout, 4 * cout)

    def forward(self, x):
        shortcut, y = x, self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if self.stride > 1:
            shortcut, y = pool(shortcut), pool(y)
        shortcut = self.shortcut(shortcut)
        b, _, h, w = y.shape
        bias = self.rel_bias[self.dy, self.dx].permute(2, 0, 1)  # (heads, HW, HW)
        x = shortcut.flatten(2).transpose(1, 2) + self.attn(y.flatten(2).transpose(1, 2), bias)
        x = x + self.mlp(self.norm2(x))
        return x.transpose(1, 2).reshape(b, -1, h, w)


class CoAtNet(nn.Module):
    def __init__(self, *, layout, depths, dims, image_size, small_images, num_classes):
        super().__init__()
        # S0: depths[0] 3x3 convs (the first strided unless small_images), BN + GELU between.
        stem = [conv(3, dims[0], 3, 1 if small_images else 2)]
        for _ in range(depths[0] - 1):
            stem += [nn.BatchNorm2d(dims[0]), nn.GELU(), conv(dims[0], dims[0], 3)]
        self.stem = nn.Sequential(*stem)
        size = image_size if small_images else -(-image_size // 2)
        blocks, cin = [], dims[0]
        for kind, cout, depth in zip(layout, dims[1:], depths[1:], strict=True):
            size = -(-size // 2)
            for j in range(depth):
                stride = 2 if j == 0 else 1
                if kind == "C":
                    blocks.append(CoAtMBConv(cin, cout, stride))
                else:
                    blocks.append(RelTransformerBlock(cin, cout, stride, size))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(cin, eps=1e-6)
        self.pre_logits = nn.Linear(cin, cin)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.norm(self.blocks(self.stem(x)).mean((2, 3)))
        return self.head(torch.tanh(self.pre_logits(x)))


def _coatnet(num_classes, image_size):
    return CoAtNet(
        num_classes=num_classes, image_size=image_size, **TWINS["coatnet_cctt"]["settings"]
    )


BUILDERS = {
    "resnet20": lambda n, size: ResNet(
        3, (16, 32, 64), 16, preact=False, shortcut="A", num_classes=n
    ),
    "wrn16_4": lambda n, size: ResNet(
        2, (64, 128, 256), 16, preact=True, shortcut="B", num_classes=n
    ),
    "efficientnet_b0": lambda n, size: EfficientNet(n),
    "vit_s4": lambda n, size: ViT(size, 4, 384, 12, 1536, 6, n),
    "coatnet_cctt": _coatnet,
}


def build(name, num_classes=10):
    """The PyTorch twin of `TWINS[name]`, built for its image size."""
    if name not in TWINS:
        raise KeyError(f"unknown twin {name!r}; valid: {', '.join(TWINS)}")
    return BUILDERS[name](num_classes, TWINS[name]["image_size"])


def count_params(module):
    """Trainable parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
