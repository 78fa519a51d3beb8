"""Width, depth and resolution scaling: the rounding rules and the arithmetic, in one place.

Every model family scales through these functions, so a width, depth or resolution multiplier
means the same thing for an EfficientNet and a ResNet:

- width: `round_filters`, the EfficientNet reference rule (Tan & Le 2019, tensorflow/tpu
  `efficientnet_model.round_filters`): channels times the multiplier, rounded to the nearest
  multiple of `divisor` (8), never below `divisor`, and bumped up one step when rounding went
  more than 10% below the unrounded value.
- depth: `round_repeats`, blocks per stage times the multiplier, rounded up (`ceil`).
- resolution: `round_resolution`, the image side times the multiplier, to the nearest integer
  (or multiple of `divisor`).
- compound scaling: `compound_coefficients(phi)`, depth alpha**phi, width beta**phi, resolution
  gamma**phi with the paper's alpha=1.2, beta=1.1, gamma=1.15 (alpha * beta**2 * gamma**2 = 1.92,
  so each unit of phi about doubles the multiply-adds; rounding blocks up adds more on short
  stages: EfficientNet-B0 grows 2.57x at phi=1, 4.69x at phi=2).

- scaling strategies (Dollar, Singh & Girshick 2021, "Fast and accurate model scaling"): a
  `Strategy` shares a FLOP increase s among the axes by weights; with e = weight / sum of
  weights, depth grows by s**e_d, width by s**(e_w/2) and resolution by s**(e_r/2) (FLOPs of a
  convolution grow with depth, width squared and resolution squared). `STRATEGIES` names the
  single axes, their pairs, `dwr` (equal shares), `dWr` (their fast compound scaling, e_w = 0.8)
  and `compound` (EfficientNet's alpha, beta, gamma as shares: s = 1.92**phi is phi).

`solve_for_macs` finds the multiplier along one axis, or a strategy's factor, that brings a model
to a multiply-add target, by bisection over the measured count (rounding makes it a step
function of the multiplier, so no closed form is exact); `solve_for_flops` does the same for
FLOPs (2 per multiply-add).
"""

import json
import math
from typing import NamedTuple

from scaling import ScalingError

ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15  # depth, width, resolution bases of compound scaling
AXES = ("depth", "width", "resolution", "phi")


class Coefficients(NamedTuple):
    depth: float
    width: float
    resolution: float


class Strategy(NamedTuple):
    """Relative shares of a FLOP increase given to depth, width and resolution."""

    depth: float
    width: float
    resolution: float

    def coefficients(self, factor: float) -> Coefficients:
        """The depth, width and resolution multipliers that scale FLOPs by about `factor` (exactly
        for a plain convolutional network before rounding)."""
        total = sum(self)
        return Coefficients(
            depth=factor ** (self.depth / total),
            width=factor ** (self.width / total / 2),
            resolution=factor ** (self.resolution / total / 2),
        )


STRATEGIES = {
    "d": Strategy(1, 0, 0),
    "w": Strategy(0, 1, 0),
    "r": Strategy(0, 0, 1),
    "dw": Strategy(1, 1, 0),
    "dr": Strategy(1, 0, 1),
    "wr": Strategy(0, 1, 1),
    "dwr": Strategy(1, 1, 1),
    "dWr": Strategy(1, 8, 1),  # Dollar et al.'s choice: width takes 80% of the increase
    "compound": Strategy(math.log(ALPHA), 2 * math.log(BETA), 2 * math.log(GAMMA)),
}


class Solution(NamedTuple):
    value: float  # the multiplier (or phi) found
    macs: int  # multiply-adds of the model it gives
    settings: dict  # model settings that build that model
    image_size: int  # and the image size to feed it


def check_sizes(num_classes, rates=(), **multipliers):
    """One line for a model setting out of range: `num_classes` and each multiplier (by name)
    positive, and not NaN; each (name, rate) of `rates` in [0, 1)."""
    if not (num_classes >= 1 and all(m > 0 for m in multipliers.values())):
        names = ", ".join([*multipliers, "num_classes"])
        raise ScalingError(f"{names} must be positive, got {[*multipliers.values(), num_classes]}")
    for name, rate in rates:
        if not 0 <= rate < 1:
            raise ScalingError(f"{name} must be in [0, 1), got {rate}")


def round_filters(filters: int, multiplier: float = 1.0, divisor: int = 8) -> int:
    """Channels scaled by `multiplier`, as the EfficientNet reference code rounds them."""
    if multiplier <= 0:
        raise ScalingError(f"width multiplier must be positive, got {multiplier}")
    scaled = filters * multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:  # never round down by more than 10%
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, multiplier: float = 1.0) -> int:
    """Blocks in a stage scaled by `multiplier`, rounded up (so never fewer than one)."""
    if multiplier <= 0:
        raise ScalingError(f"depth multiplier must be positive, got {multiplier}")
    return int(math.ceil(multiplier * repeats))


def round_resolution(size: int, multiplier: float = 1.0, divisor: int = 1) -> int:
    """An image side scaled by `multiplier`, to the nearest multiple of `divisor` (half up)."""
    if multiplier <= 0:
        raise ScalingError(f"resolution multiplier must be positive, got {multiplier}")
    return max(divisor, int(size * multiplier / divisor + 0.5) * divisor)


def compound_coefficients(phi: float, alpha=ALPHA, beta=BETA, gamma=GAMMA) -> Coefficients:
    """(depth, width, resolution) multipliers of compound scaling by `phi`."""
    return Coefficients(depth=alpha**phi, width=beta**phi, resolution=gamma**phi)


def axis_setting(name, axis, **settings) -> str:
    """The setting through which model `name` takes its `axis` ('width' or 'depth') multiplier,
    as its family registers it."""
    from scaling.models import registry

    if (key := getattr(registry.family_of(name), axis)) is None:
        raise ScalingError(f"{name} has no {axis} multiplier setting")
    return key


def coefficients(axis, value) -> Coefficients:
    """The multipliers `value` stands for along `axis`: a single axis's multiplier, compound
    scaling's phi, or a strategy's (by name) FLOP factor."""
    if axis in STRATEGIES:
        return STRATEGIES[axis].coefficients(value)
    if axis == "phi":
        return compound_coefficients(value)
    if axis not in Coefficients._fields:
        valid = ", ".join([*AXES, *STRATEGIES])
        raise ScalingError(f"unknown scaling axis or strategy {axis!r}; valid: {valid}")
    return Coefficients(**{a: value if a == axis else 1.0 for a in Coefficients._fields})


def apply(name, c: Coefficients, image_size, settings) -> tuple[dict, int]:
    """(settings, image_size) of model `name` grown by the multipliers `c`. A family with
    multiplier settings takes them (times any the settings already give); one whose widths and
    depths are absolute (ViT, CoAtNet) rounds its own (its registered `scale`)."""
    from scaling.models import registry

    family = registry.family_of(name)
    if family.scale is not None:
        return family.scale(name, dict(settings), image_size, c)
    settings = dict(settings)
    for axis in ("depth", "width"):
        if getattr(c, axis) != 1.0:
            key = axis_setting(name, axis)
            settings[key] = settings.get(key, 1.0) * getattr(c, axis)
    return settings, round_resolution(image_size, c.resolution)


def solve_for_macs(name, axis, target, image_size, *, tol=1e-3, **settings) -> Solution:
    """The multiplier along `axis` that brings model `name` closest to `target` multiply-adds.

    `axis` is 'depth', 'width', 'resolution' (multipliers of the model as `settings` give it,
    1.0), 'phi' (compound scaling of depth, width and resolution together, from phi = 0) or a
    strategy of `STRATEGIES` (its FLOP factor, from 1.0); `settings` are the model's other
    settings. Multiply-adds are measured on the abstract model (`scaling.flops`) at the scaled
    image size, so even huge candidates allocate nothing. The count is a non-decreasing step
    function of the multiplier (channels, blocks and pixels are rounded), so this brackets the
    target, bisects to `tol` (relative; absolute for phi) for the first step at or above it, and
    returns whichever of the two steps around the target is closer, as a `Solution` (value, macs,
    settings, image_size). The result is as close as the steps allow: ~1% for width on
    EfficientNet-B0 at 224, but coarser for narrow networks (8 channels more on a 16-channel
    stage), for depth where stages are short (one more block in a 1-block stage), and for
    resolution where the size crosses a multiple of the network's stride ('SAME' padding rounds
    up: B0 gains 21% from 320 to 321 px).
    """
    from scaling import flops, models

    coefficients(axis, 1.0)  # the axis is known
    if target <= 0:
        raise ScalingError(f"target multiply-adds must be positive, got {target}")
    built, counted = {}, {}

    def measure(value):
        s, size = apply(name, coefficients(axis, value), image_size, settings)
        key = json.dumps(s, sort_keys=True, default=str)
        if (key, size) not in counted:
            built_for = size if models.family_of(name).resolution_dependent else None
            if (key, built_for) not in built:
                built[key, built_for] = models.abstract(name, image_size=built_for, **s)
            counted[key, size] = flops.macs_and_activations(built[key, built_for], size)[0]
        return counted[key, size]

    # Bracket the target (phi steps by 1, multipliers and factors by 2), then bisect.
    phi = axis == "phi"
    low_end, high_end = (-20, 20) if phi else (1e-3, 1e3) if axis in AXES else (1e-6, 1e6)
    lo = hi = 0.0 if phi else 1.0
    while measure(lo) > target:
        lo = lo - 1 if phi else lo / 2
        if lo < low_end:
            raise ScalingError(f"{name}: no {axis} brings it as low as {target:.3g} multiply-adds")
    while measure(hi) < target:
        hi = hi + 1 if phi else hi * 2
        if hi > high_end:
            raise ScalingError(f"{name}: no {axis} brings it as high as {target:.3g} multiply-adds")
    while hi - lo > tol * (1.0 if phi else hi):
        mid = (lo + hi) / 2
        if measure(mid) < target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda v: abs(measure(v) - target))
    s, size = apply(name, coefficients(axis, best), image_size, settings)
    return Solution(best, measure(best), s, size)


def solve_for_flops(name, axis, target, image_size, *, tol=1e-3, **settings) -> Solution:
    """`solve_for_macs` for a FLOPs target (2 FLOPs per multiply-add, as `scaling.flops`)."""
    return solve_for_macs(name, axis, target / 2, image_size, tol=tol, **settings)
