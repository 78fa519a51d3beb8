"""Study: CoAtNet stage layouts at matched parameters, generalization vs capacity (Dai et al.).

C-C-C-C, C-C-C-T, C-C-T-T, C-T-T-T (and the all-attention VIT_REL with `vit_rel=True`), each
sized by `coatnet_sizing.match_params` to the same parameter count. Generalization: the
train-test gap when trained on a small subset. Capacity: training accuracy on the full set at a
fixed budget.

    scaling sweep --config configs/coatnet_layouts.py --workdir runs/layouts --dry-run
"""

from pathlib import Path

import ml_collections

from scaling import sweep
from scaling.config import parse_arg
from scaling.models import coatnet_sizing


def get_config(arg=None):
    arg = parse_arg(
        arg,
        dataset="digits",
        image_size=32,
        steps=200,
        batch_size=64,
        params=1_200_000,
        small_subset=280,  # examples for the generalization arm; the capacity arm uses all
        seeds=2,
        num_classes=10,
        vit_rel=False,
        depths="2+2+3+5+2",  # CoAtNet-0's blocks per stage S0..S4 (VIT_REL picks its own)
    )
    c = ml_collections.ConfigDict()
    c.base = sweep.base_config(
        Path(__file__).with_name("train.py"),
        model="coatnet",
        optimizer="adamw",
        lr=1e-3,
        **{k: arg[k] for k in ("dataset", "image_size", "steps", "batch_size")},
    )
    c.base.weight_decay = 0.05
    c.base.schedule.warmup_steps = arg["steps"] // 10
    layouts = ["CCCC", "CCCT", "CCTT", "CTTT"] + (["VIT_REL"] if arg["vit_rel"] else [])
    sized = [
        coatnet_sizing.match_params(
            layout, arg["params"], num_classes=arg["num_classes"], small_images=True,
            image_size=arg["image_size"],
            depths=None if layout == "VIT_REL" else [int(d) for d in arg["depths"].split("+")],
        )
        for layout in layouts
    ]  # fmt: skip
    c.trials = sweep.product(
        sweep.chain(*(sweep.fixed({"model.layout": s["layout"], "model.depths": s["depths"],
                                   "model.dims": s["dims"], "model.small_images": True})
                      for s in sized)),
        sweep.chain(sweep.fixed({"train_examples": arg["small_subset"]}),
                    sweep.fixed({"data_fraction": 1.0})),
        sweep.axis("seed", range(arg["seeds"])),
    )  # fmt: skip
    return c
