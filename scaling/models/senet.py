"""Squeeze-and-excitation networks (Hu et al. 2018): `se` + a ResNet-family name.

Every residual block ends its branch with an SE layer before the sum: global average pool, a 1x1
(dense) layer to channels / 16, ReLU, a 1x1 layer back, a sigmoid gate on the branch's channels
(the paper's Fig. 3 and timm's `SEModule`, whose rounding of the reduced width, to a multiple of
8 and at least 8, is `resnet.se_channels`). It is the ResNet setting `se_ratio` (1/16 here, 0
none), so any ResNet, ResNeXt or wide ResNet takes it; these names only set its default:

- `seresnet{18,34,50,101,152}` and `seresnext{50,101}_{C}x{d}d`: timm's SE-ResNets, which are
  torchvision's ResNets (the v1.5 bottleneck) with SE: seresnet50 28,088,024 parameters,
  seresnet18 11,779,624, seresnet34 21,960,416, seresnet101 49,326,872, seresnet152 66,821,848,
  seresnext50_32x4d 27,559,896, seresnext101_32x8d 93,569,048 (1000 classes).
- `se_` + any other name of the family: `se_resnet20`, `se_preact_resnet18`, `se_wrn16_4`,
  `se_resnext29_8x64d`, `se_wide_resnet50_2`.
"""

import re

from scaling.models.registry import Family, family_of, register
from scaling.models.resnet import ResNet

SE_RATIO = 1 / 16  # the paper's reduction ratio r = 16 (its Table 10: the best trade-off)
PATTERN = r"se(resnet\d+|resnext\d+_\d+x\d+d)|se_(resnet\d+|preact_resnet\d+|wrn\d+_\d+|resnext\d+_\d+x\d+d|wide_resnet\d+_\d+)"  # noqa: E501


def base_name(name):
    """The ResNet-family name that `name` adds SE to."""
    m = re.fullmatch(PATTERN, name)
    return m[1] or m[2]


def create(name, **kw):
    """Build an SE form: its base name's network with `se_ratio` 1/16 unless given."""
    base = base_name(name)
    return family_of(base).build(base, **{"se_ratio": SE_RATIO, **kw})


def default_image_size(name):
    base = base_name(name)
    return family_of(base).image_size(base)


register(
    Family(
        name="senet",
        pattern=PATTERN,
        build=create,
        constructor=ResNet,
        examples=(
            "seresnet18",
            "seresnet34",
            "seresnet50",
            "seresnet101",
            "seresnet152",
            "seresnext50_32x4d",
            "se_resnet20",
            "se_wrn16_4",
        ),
        image_size=default_image_size,
        names="seresnet{18,34,50,101,152}, seresnext{d}_{C}x{d}d, se_{any ResNet-family name}",
        width="width_multiplier",
        depth="depth_multiplier",
    )
)
