"""Study: the lineage of image classifiers, each idea trained on the same data and budget.

    scaling sweep --config configs/lineage.py --workdir runs/lineage --dry-run
    scaling sweep --config configs/lineage.py:dataset=folder:PATH,steps=150 --workdir runs/lineage

One network per idea, from LeNet-5 (1998) to CoAtNet (2021), at CIFAR scale: the CIFAR forms
where the papers define them, scaled down to a few hundred thousand to a few million parameters
where the named form would not fit a CPU budget (the settings say how). Every trial takes the
same steps of the same batch; the recipe depends only on the kind of network (`RECIPES`).
"""

from pathlib import Path

import ml_collections

from scaling import sweep
from scaling.config import OPTIMIZER_DEFAULTS, parse_arg

# The base is SGD with Nesterov momentum 0.9 and weight decay 5e-4 (He et al.; WRN).
RECIPES = {
    # No normalisation layer: the papers' rate (LeNet-5 and AlexNet trained at 0.01); at 0.1
    # AlexNet's loss is NaN within 10 steps.
    "plain": {"lr": 0.01},
    # BatchNorm lets every conv net since 2015 train at He et al.'s 0.1.
    "batchnorm": {"lr": 0.1},
    # Attention: AdamW as ViT and CoAtNet are trained (SGD does not train a ViT from scratch).
    "attention": {"optimizer": dict(name="adamw"), "lr": 1e-3, "weight_decay": 0.05},
    # MBConv: EfficientNet's RMSProp (TensorFlow's form), its 0.016 per 256 images scaled to a
    # batch of 128, and its weight decay 1e-5. At SGD 0.1 it reached 20.5% with training
    # accuracy as low (measured): too fast through the squeeze-and-excitation gates.
    "mbconv": {
        "optimizer": dict(name="rmsprop", **OPTIMIZER_DEFAULTS["rmsprop"]),
        "lr": 0.008,
        "weight_decay": 1e-5,
    },
}

# (model settings, recipe) per idea, in the order the ideas came.
NETWORKS = [
    (dict(name="lenet5"), "plain"),  # 1998: convolution, pooling, a small dense head
    # 2012: depth, ReLU, dropout. Its 11x11/4 stem needs 63 pixels or more: CIFAR upsampled to
    # 64; half the width and 1024-wide dense layers (61M parameters would not fit).
    (dict(name="alexnet", width_multiplier=0.5, hidden=1024, image_size=64), "plain"),
    # 2013: ZFNet, AlexNet with a 7x7/2 stem and 5x5/2 second conv; the same cuts.
    (dict(name="zfnet", width_multiplier=0.5, hidden=1024, image_size=64), "plain"),
    (dict(name="vgg11_cifar", width_multiplier=0.5), "plain"),  # 2014: stacks of 3x3 convs
    # 2015: BatchNorm, at VGG-11's rate, so that the pair measures BatchNorm alone (at 0.1 its
    # loss rose to 4.6 in the warm-up and it tested at 16.5%, measured).
    (dict(name="vgg11_bn_cifar", width_multiplier=0.5), "plain"),
    (dict(name="googlenet", width_multiplier=0.5, aux_logits=True), "batchnorm"),  # 2014
    (dict(name="resnet20"), "batchnorm"),  # 2015: identity shortcuts
    (dict(name="preact_resnet20"), "batchnorm"),  # 2016: pre-activation
    (dict(name="resnet20", stochastic_depth=0.5), "batchnorm"),  # 2016: random depth, p_L 0.5
    (dict(name="wrn16_2"), "batchnorm"),  # 2016: width over depth
    (dict(name="densenet_bc40_12"), "batchnorm"),  # 2017: dense connectivity, the paper's L=40
    (dict(name="resnext29_8x16d", width_multiplier=0.25), "batchnorm"),  # 2017: cardinality 8
    (dict(name="se_resnet20"), "batchnorm"),  # 2018: squeeze-and-excitation
    # 2019: MBConv. BatchNorm momentum 0.9, not TensorFlow's 0.99: after 150 steps at 0.99 the
    # evaluation statistics are still 22% initial and the run tests at chance (10.3%, measured).
    (dict(name="efficientnet_cifar", width_coefficient=0.5, bn_momentum=0.9), "mbconv"),
    # 2020: ViT, patch 4 (64 tokens), the size of conv_vs_attention's (683,050 parameters).
    (dict(name="vit_ti4", width=96, depth=6, num_heads=3, mlp_dim=384, pool="gap"), "attention"),
    # 2021: CoAtNet C-C-T-T, conv_vs_attention's 687,730-parameter form.
    (
        dict(
            name="coatnet",
            layout="CCTT",
            depths=(1, 1, 2, 3, 1),
            dims=(16, 24, 40, 96, 160),
            small_images=True,
        ),
        "attention",
    ),  # fmt: skip
]


def trial(settings, recipe):
    settings = dict(settings)
    overrides = {f"model.{k}": v for k, v in settings.items() if k != "image_size"}
    if "image_size" in settings:
        overrides["image_size"] = settings["image_size"]
    return {**overrides, **RECIPES[recipe]}


def get_config(arg=None):
    arg = parse_arg(
        arg,
        dataset="digits",
        image_size=32,
        steps=150,  # 19,200 examples at batch 128: 0.38 CIFAR-10 epochs, what a CPU affords
        batch_size=128,
        seeds=2,
    )
    c = ml_collections.ConfigDict()
    c.base = sweep.base_config(
        Path(__file__).with_name("train.py"),
        **{k: arg[k] for k in ("dataset", "image_size", "steps", "batch_size")},
    )
    c.base.schedule.warmup_steps = arg["steps"] // 10  # one warmup and cosine for every recipe
    c.trials = sweep.product(
        sweep.chain(*(sweep.fixed(trial(s, r)) for s, r in NETWORKS)),
        sweep.axis("seed", range(arg["seeds"])),
    )
    return c
