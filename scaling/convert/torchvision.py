"""torchvision's names: `resnet{18,34,50,101,152}` from the state dicts of torchvision's
`resnet18()` ..., `resnext*` and `wide_resnet*` from `resnext50_32x4d()` ... (the same names),
`alexnet` from `alexnet()`, `vgg{11,13,16,19}[_bn]` from `vgg11()` ...,
`googlenet` from `googlenet()` (its auxiliary heads too) and `densenet{121,169,201,161}` from
`densenet121()` ...."""

from scaling.convert.tables import SAME, Transform, conv_numbers, resnet_blocks, stages


def looks_like(names) -> bool:
    resnet = {"conv1.weight", "layer1.0.conv1.weight", "fc.weight"}
    alexnet_vgg = {"features.0.weight", "classifier.6.weight"}
    googlenet = {"conv1.conv.weight", "inception3a.branch1.conv.weight", "fc.weight"}
    densenet = {"features.conv0.weight", "features.denseblock1.denselayer1.conv2.weight"}
    if any(name.endswith(".se.fc1.weight") for name in names):  # timm's SE-ResNets (`timm`)
        return False
    return any(known <= names for known in (resnet, alexnet_vgg, googlenet, densenet))


def resnet_table(model, t):
    t.layer("conv1", "stem", "conv")
    t.layer("bn1", "stem_norm", "bn")
    blocks = resnet_blocks(model)
    for stage, j, ours, block in stages(blocks, lambda b: b.shortcut.stride > 1):
        ref = f"layer{stage + 1}.{j}"
        for i in conv_numbers(block):
            t.layer(f"{ref}.conv{i}", f"{ours}/conv{i}", "conv")
            t.layer(f"{ref}.bn{i}", f"{ours}/norm{i}", "bn")
        t.layer(f"{ref}.downsample.0", f"{ours}/shortcut/proj", "conv", optional=True)
        t.layer(f"{ref}.downsample.1", f"{ours}/shortcut/proj_norm", "bn", optional=True)
        if block.se is not None:  # timm's SE-ResNets: these names, and SE's 1x1 convs
            t.layer(f"{ref}.se.fc1", f"{ours}/se/reduce", "conv1x1_linear")
            t.layer(f"{ref}.se.fc2", f"{ours}/se/expand", "conv1x1_linear")
    t.layer("fc", "head", "linear")


def flattened(channels, side):
    """The first dense layer after a flatten: torch flattens a (C, H, W) map, we an (H, W, C)
    one, so its (out, C*H*W) weight holds our (H*W*C, out) kernel's rows in another order."""

    def to_ours(w):
        return w.reshape(-1, channels, side, side).transpose(2, 3, 1, 0).reshape(-1, w.shape[0])

    def to_ref(k):
        k = k.reshape(side, side, channels, -1).transpose(3, 2, 0, 1)
        return (k.reshape(k.shape[0], -1),)

    return Transform(to_ours, to_ref)


def _flattened_linear(t, ref, ours, channels, side):
    t.rule([f"{ref}.weight"], f"{ours}/kernel", flattened(channels, side))
    t.rule([f"{ref}.bias"], f"{ours}/bias", SAME)


def alexnet_table(model, t):
    # `features` numbers each conv, its ReLU and, after conv1, conv2 and the last, a pool.
    index, last = 0, len(model.convs) - 1
    for i in range(len(model.convs)):
        t.layer(f"features.{index}", f"convs/{i}", "conv")
        index += 3 if i < 2 or i == last else 2
    # `classifier`: dropout, fc6, ReLU, dropout, fc7, ReLU, fc8.
    _flattened_linear(t, "classifier.1", "fc6", model.convs[last].out_features, 6)
    t.layer("classifier.4", "fc7", "linear")
    t.layer("classifier.6", "head", "linear")


def vgg_table(model, t):
    # `features` numbers each conv, its BatchNorm (the _bn forms), its ReLU and a stage's pool.
    index = 0
    for i in range(len(model.convs)):
        t.layer(f"features.{index}", f"convs/{i}", "conv")
        if model.batch_norm:
            t.layer(f"features.{index + 1}", f"norms/{i}", "bn")
        index += (3 if model.batch_norm else 2) + (i in model.stage_ends)
    # `classifier`: fc1, ReLU, dropout, fc2, ReLU, dropout, the last dense layer.
    _flattened_linear(t, "classifier.0", "fc1", model.convs[-1].out_features, 7)
    t.layer("classifier.3", "fc2", "linear")
    t.layer("classifier.6", "head", "linear")


def _conv_bn(t, ref, ours):
    """torchvision's BasicConv2d (`.conv`, `.bn`) -> our ConvBN (`conv`, `norm`)."""
    t.layer(f"{ref}.conv", f"{ours}/conv", "conv")
    t.layer(f"{ref}.bn", f"{ours}/norm", "bn")


# An Inception module's branches: torchvision's Sequentials (branch4.0 is the pool) -> ours.
INCEPTION_BRANCHES = (
    ("branch1", "branch1"),
    ("branch2.0", "branch3_reduce"),
    ("branch2.1", "branch3"),
    ("branch3.0", "branch5_reduce"),
    ("branch3.1", "branch5"),
    ("branch4.1", "pool_proj"),
)


def googlenet_table(model, t):
    for i in (1, 2, 3):
        _conv_bn(t, f"conv{i}", f"conv{i}")
    for s, stage in enumerate(model.stages):  # inception3a ... inception5b
        for j in range(len(stage)):
            ref = f"inception{s + 3}{chr(ord('a') + j)}"
            for theirs, ours in INCEPTION_BRANCHES:
                _conv_bn(t, f"{ref}.{theirs}", f"stages/{s}/{j}/{ours}")
    for k, head in enumerate(model.aux):  # aux_logits=True
        _conv_bn(t, f"aux{k + 1}.conv", f"aux/{k}/conv")
        _flattened_linear(t, f"aux{k + 1}.fc1", f"aux/{k}/fc1", head.conv.conv.out_features, 4)
        t.layer(f"aux{k + 1}.fc2", f"aux/{k}/fc2", "linear")
    t.layer("fc", "head", "linear")


def densenet_table(model, t):
    t.layer("features.conv0", "stem", "conv")
    t.layer("features.norm0", "stem_norm", "bn")
    for b, block in enumerate(model.blocks):
        for i in range(len(block)):
            ref, ours = f"features.denseblock{b + 1}.denselayer{i + 1}", f"blocks/{b}/{i}"
            for n in (1, 2):
                t.layer(f"{ref}.norm{n}", f"{ours}/norm{n}", "bn")
                t.layer(f"{ref}.conv{n}", f"{ours}/conv{n}", "conv")
    for b in range(len(model.transitions)):
        t.layer(f"features.transition{b + 1}.norm", f"transitions/{b}/norm", "bn")
        t.layer(f"features.transition{b + 1}.conv", f"transitions/{b}/conv", "conv")
    t.layer("features.norm5", "final_norm", "bn")
    t.layer("classifier", "head", "linear")


# Our families this source fills: (their table, the reference's classifier: its name and the
# axis of its classes, which sets `num_classes` on import).
TABLES = {
    "resnet": (resnet_table, ("fc.weight", 0)),
    "resnext": (resnet_table, ("fc.weight", 0)),  # resnext50_32x4d() ...: ResNet's names
    "wide_resnet": (resnet_table, ("fc.weight", 0)),  # wide_resnet50_2() ...
    "alexnet": (alexnet_table, ("classifier.6.weight", 0)),
    "vgg": (vgg_table, ("classifier.6.weight", 0)),
    "googlenet": (googlenet_table, ("fc.weight", 0)),
    "densenet": (densenet_table, ("classifier.weight", 0)),
}
