"""ResNeXt (Xie et al. 2017) and torchvision's wide ResNets: bottleneck ResNets made wider inside.

A ResNeXt bottleneck aggregates `groups` (the cardinality C) paths of d channels each: its 1x1
reduction and 3x3 conv are C * d wide and the 3x3 is a grouped convolution (the paper's form (c),
equivalent to its forms (a) and (b)). d = floor(planes * base_width / 64), so `base_width` is d at
the first stage (64 planes) and doubles with the planes; the 1x1 expansion still gives 4 x planes.
These are `resnet.ResNet` with `groups` and `base_width` set, so every ResNet setting applies.

- ImageNet: `resnext{50,101,152}_{C}x{d}d`, torchvision's (the v1.5 ResNet, stride on the 3x3):
  resnext50_32x4d 25,028,904 parameters, resnext101_32x8d 88,791,336, resnext101_64x4d
  83,455,272 (1000 classes).
- CIFAR: `resnext{9n+2}_{C}x{d}d`, the authors' Torch code (facebookresearch/ResNeXt,
  models/resnext.lua): a 3x3 stem of 64 channels, three stages of n bottlenecks of 64/128/256
  planes (outputs 256/512/1024), projection shortcuts where the shape changes, bias-free convs.
  ResNeXt-29 (n = 3): resnext29_8x64d 34,426,698 and resnext29_16x64d 68,155,210 parameters for
  10 classes (the paper's Table 7: 34.4M and 68.1M). The paper trained pre-activation
  bottlenecks; the code, whose block this is, uses the original ones (its README: better).
- torchvision's wide ResNets `wide_resnet{50,101}_{k}`: base_width 64 k, one group, so only the
  inner width of each bottleneck grows k-fold (wide_resnet50_2 68,883,240 parameters,
  wide_resnet101_2 126,886,696); Zagoruyko & Komodakis's WRN-d-k (`wrn{d}_{k}`) instead widens
  every layer of pre-activation basic blocks.

The width multiplier scales the planes (by `scale.round_filters`), and d with them; the
cardinality is the `groups` setting, a scaling axis of its own (the paper's Table 3 holds the
complexity fixed while trading C against d).
"""

import re

from scaling import ScalingError
from scaling.models.registry import Family, register
from scaling.models.resnet import IMAGENET_SIZES, IMAGENET_WIDTHS, ResNet

# The CIFAR ResNeXt's planes per stage (the authors' code); bottlenecks expand them x4.
CIFAR_WIDTHS = (64, 128, 256)
IMAGENET_DEPTHS = tuple(d for d, (block, _) in IMAGENET_SIZES.items() if block == "bottleneck")


def imagenet(depth, **kw):
    """A bottleneck ResNet of the ImageNet table (50, 101, 152, 200), 1000 classes."""
    if depth not in IMAGENET_DEPTHS:
        raise ScalingError(
            f"ImageNet ResNeXt and wide ResNet depths are {', '.join(map(str, IMAGENET_DEPTHS))}; "
            f"got {depth}"
        )
    _, sizes = IMAGENET_SIZES[depth]
    kw = {"num_classes": 1000, **kw}
    return ResNet(sizes, IMAGENET_WIDTHS, block="bottleneck", stem="imagenet", **kw)


def cifar_resnext(depth, **kw):
    """ResNeXt-(9n+2) of the authors' CIFAR code: n bottlenecks a stage, 64-channel 3x3 stem."""
    n = (depth - 2) // 9
    kw = {"shortcut": "B", **kw}
    return ResNet((n, n, n), CIFAR_WIDTHS, block="bottleneck", stem="cifar", **kw)


def create(name, **kw):
    """Build `resnext{depth}_{C}x{d}d` or `wide_resnet{depth}_{k}` (the registry's patterns)."""
    if m := re.fullmatch(r"wide_resnet(\d+)_(\d+)", name):
        if int(m[2]) < 1:
            raise ScalingError(f"wide ResNet widening factor k must be >= 1, got {m[2]}")
        return imagenet(int(m[1]), **{"base_width": 64 * int(m[2]), **kw})
    m = re.fullmatch(r"resnext(\d+)_(\d+)x(\d+)d", name)
    depth, kw = int(m[1]), {"groups": int(m[2]), "base_width": int(m[3]), **kw}
    # The ImageNet table wins where a depth is also 9n+2 (101), as torchvision's names mean.
    if depth in IMAGENET_DEPTHS:
        return imagenet(depth, **kw)
    if depth < 11 or (depth - 2) % 9:
        raise ScalingError(
            f"ResNeXt depth must be 50, 101, 152, 200 (ImageNet) or 9n+2 (29, 38, 47... CIFAR), "
            f"got {depth}"
        )
    return cifar_resnext(depth, **kw)


def default_image_size(name):
    m = re.fullmatch(r"(?:resnext|wide_resnet)(\d+)_.*", name)
    return 224 if int(m[1]) in IMAGENET_DEPTHS else 32


register(
    Family(
        name="resnext",
        pattern=r"resnext\d+_\d+x\d+d",
        build=create,
        constructor=ResNet,
        examples=(
            "resnext29_8x64d",
            "resnext29_16x64d",
            "resnext50_32x4d",
            "resnext101_32x8d",
            "resnext101_64x4d",
        ),
        image_size=default_image_size,
        names="resnext{50,101,152}_{C}x{d}d (ImageNet), resnext{9n+2}_{C}x{d}d (CIFAR)",
        width="width_multiplier",
        depth="depth_multiplier",
    )
)
register(
    Family(
        name="wide_resnet",
        pattern=r"wide_resnet\d+_\d+",
        build=create,
        constructor=ResNet,
        examples=("wide_resnet50_2", "wide_resnet101_2"),
        image_size=default_image_size,
        names="wide_resnet{50,101,152}_{k} (torchvision's)",
        width="width_multiplier",
        depth="depth_multiplier",
    )
)
