"""Parameter counts and parameter-matched sizes of CoAtNets, for the experiments that compare
layouts at one parameter count (configs/conv_vs_attention.py, configs/coatnet_layouts.py).

`count_params` counts a CoAtNet without building it whole; `match_params` picks the widths that
give a layout about a target count. Both are also `scaling.models.coatnet`'s.
"""

import functools
import inspect
import math

from flax import nnx

from scaling import ScalingError
from scaling.models.coatnet import (
    BLOCK_SETTINGS,
    SIZES,
    VIT_REL_DEFAULTS,
    CoAtNet,
    Stem,
    check_layout,
    make_block,
    plan,
)


def count_params(layout="CCTT", depths=None, dims=None, **settings):
    """Trainable parameters of `CoAtNet(layout=..., ...)`, fast: each distinct block is built
    shape-only on its own (a whole deep network traced at once costs seconds), the rest summed.
    Equal to `models.count_params` of the whole model (a test checks). `settings` are CoAtNet's
    (its defaults where not given); dropout rates and dtype change no count but are accepted, so
    that any model's settings can be passed."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(CoAtNet.__init__).parameters.items()
        if p.kind is p.KEYWORD_ONLY and name not in ("layout", "depths", "dims", "rngs")
    }
    if unknown := sorted(set(settings) - set(defaults)):
        raise ScalingError(f"CoAtNet has no setting {unknown[0]!r}")
    every = {**defaults, **settings}
    image_size, small_images = every["image_size"], every["small_images"]
    in_channels, num_classes, padding = every["in_channels"], every["num_classes"], every["padding"]
    settings = {name: every[name] for name in BLOCK_SETTINGS}
    depths, dims, blocks = plan(layout, depths, dims, image_size, small_images, settings)
    settings.update(dropout=0.0, attention_dropout=0.0, stochastic_depth=0.0)  # validated above
    key = tuple(sorted(settings.items()))
    blocks_total = sum(_block_params(block, key) for block in blocks)
    vit_rel = layout == "VIT_REL"
    stem = functools.partial(
        Stem,
        in_channels,
        dims[0],
        depths[0],
        vit_rel=vit_rel,
        small_images=small_images,
        padding=padding,
        dtype=None,
    )
    width = blocks[-1][2]
    pre_logits = width * width + width if every["pre_logits"] else 0
    head = 2 * width + pre_logits + (width + 1) * num_classes
    return _params(stem) + blocks_total + head


def _params(make):
    from scaling.models import count_params as count
    from scaling.models import unexplained_tracer_errors

    with unexplained_tracer_errors():
        return count(nnx.eval_shape(lambda: make(rngs=nnx.Rngs(0))))


@functools.lru_cache(maxsize=4096)
def _block_params(block, settings):
    make = functools.partial(make_block, *block, rate=0.0, settings=dict(settings), dtype=None)
    return _params(make)


def match_params(layout, target_params, *, depths=None, num_classes=1000, head_size=32, **settings):
    """`depths` and `dims` for `layout` with about `target_params` trainable parameters.

    Depths stay fixed (CoAtNet-0's unless given); the widths keep CoAtNet-0's proportions
    64:96:192:384:768, rounded to multiples of 8 (of `head_size` in T stages), scaled by one
    factor: a few secant steps on log(parameters), then the nearest of the factors within 25%.
    VIT_REL without `depths` takes the width (a multiple of `head_size`) nearest the target at
    ViT's 12 blocks, then the depth that fits best, since its width steps are coarse.
    `settings` are other CoAtNet settings (image_size, small_images, expansion, ...).
    Returns dict(layout, depths, dims, params).
    """
    layout = check_layout(layout)
    if not isinstance(target_params, (int, float)) or target_params < 1:
        raise ScalingError(f"target_params must be positive, got {target_params!r}")
    vit_rel = layout == "VIT_REL"
    ratios = (4,) if vit_rel else (2 / 3, 1, 2, 4, 8)
    kinds = "T" if vit_rel else "C" + layout
    free_depth = vit_rel and depths is None
    depths = tuple(depths or (VIT_REL_DEFAULTS if vit_rel else SIZES[0])[0])
    error = lambda params: abs(math.log(params / target_params))  # noqa: E731

    def dims_at(scale):
        steps = [head_size if k == "T" else 8 for k in kinds]
        return tuple(max(q, q * round(scale * r / q)) for r, q in zip(ratios, steps, strict=True))

    @functools.cache  # the scan below rounds many scales to the same widths
    def params_at(dims, depths=depths):
        return count_params(
            layout, depths, dims, num_classes=num_classes, head_size=head_size, **settings
        )

    def best_depth(dims):
        """VIT_REL: the depth that brings `dims` closest to the target, and its count."""
        one, two = params_at(dims, (1,)), params_at(dims, (2,))
        blocks = max(1, round((target_params - one) / (two - one)) + 1)
        return (blocks,), params_at(dims, (blocks,))

    if free_depth:  # ViT's 12 blocks at the nearest width, then the depth that fits it best
        widths = [(w,) for w in range(head_size, 4097, head_size)]
        low, high = 0, len(widths) - 1
        while low < high:  # the narrowest width reaching the target (counts grow with width)
            middle = (low + high) // 2
            if params_at(widths[middle], (12,)) < target_params:
                low = middle + 1
            else:
                high = middle
        nearest = [widths[i] for i in sorted({max(low - 1, 0), low})]
        dims = min(nearest, key=lambda d: error(params_at(d, (12,))))
        depths, params = best_depth(dims)
        return dict(layout=layout, depths=depths, dims=dims, params=params)

    def candidate(scale):
        dims = dims_at(scale)
        return depths, params_at(dims), dims

    scale = 96.0 * math.sqrt(target_params / 25e6)  # CoAtNet-0: S1 width 96 at 25M
    for _ in range(6):  # parameters grow ~ width squared
        params = candidate(scale)[1]
        if error(params) < 0.01:
            break
        scale *= math.sqrt(target_params / params)
    # Rounding to 8 (32 in T stages) makes the count a step function of the scale: scan
    # around it and keep the nearest. Stages keep their proportions; none is nudged alone.
    found = [candidate(scale * (1 + f / 100)) for f in range(-25, 26)]
    depths, params, dims = min(found, key=lambda c: error(c[1]))
    return dict(layout=layout, depths=depths, dims=dims, params=params)
